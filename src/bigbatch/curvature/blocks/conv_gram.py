"""The input factor of a stride-1 "same" convolution without im2col patches.

:func:`same_conv2d_gram` computes ``sum_{n, p} a a^T`` over the im2col patches of an odd
``kh x kw`` convolution with stride 1, dilation 1 and zero padding ``(k - 1) / 2`` from
correlations of the input with itself, several times faster than building the patches.
It is the expand-``A`` of :class:`~bigbatch.curvature.blocks.conv.Conv2dBlock` for those
convolutions; nothing else lives here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["same_conv2d_gram"]


def _line_groups(size: int, half: int) -> list[tuple[int, int]]:
    """Rows (or columns) ``[0, size)`` cut into ``[start, stop)`` ranges: every line within
    ``half`` of an edge alone, the lines in between as one range."""
    edge = sorted({s for s in range(size) if s < half or s >= size - half})
    groups = [(s, s + 1) for s in edge if s < half]
    if half < size - half:
        groups.append((half, size - half))
    groups += [(s, s + 1) for s in edge if s >= half and s >= size - half]
    return groups


def _kept(groups: list[tuple[int, int]], k: int, size: int, half: int) -> Tensor:
    """``(k, len(groups))`` 0/1: whether line group ``g`` lies in kernel row ``i``'s window.

    Kernel row ``i`` sees input lines ``[i - half, i - half + size)`` (clipped to the image)
    over the output positions; every group is entirely inside or outside it.
    """
    out = torch.zeros(k, len(groups), dtype=torch.float64)
    for i in range(k):
        lo, hi = i - half, i - half + size
        for g, (start, stop) in enumerate(groups):
            out[i, g] = float(start >= lo and stop <= hi)
    return out


def same_conv2d_gram(x: Tensor, kh: int, kw: int, has_bias: bool) -> Tensor:
    """``sum_{n, p} a a^T`` of the im2col patches of a stride-1 "same" convolution, by
    correlations of the input with itself (no patches are built).

    For an odd ``kh x kw`` kernel with zero padding ``(kh // 2, kw // 2)`` the patch entry
    ``(c, i, j)`` at output position ``(y, z)`` is ``x[c, y + i - kh//2, z + j - kw//2]``, so
    ``A[(c, i, j), (c', i', j')] = sum_{(s, t) in W_ij} x[c, s, t] x[c', s + d, t + e]`` with
    ``(d, e) = (i' - i, j' - j)`` and ``W_ij`` the input pixels kernel tap ``(i, j)`` visits
    (the whole image except up to ``kh//2`` edge rows and ``kw//2`` edge columns). The image is
    cut into regions (each edge row/column alone, the interior as one block) that lie
    entirely inside or outside every ``W_ij``; the correlation of each region with the
    zero-padded input at the ``kh x (2 kw - 1)`` offsets with ``d >= 0`` (``A`` is symmetric)
    is a convolution weight gradient (one ``convolution_backward`` per region; the regions
    partition the image, so together they cost one such call over the image), and ``A`` is
    assembled from the region sums each tap sees. Equal to the im2col Gram up to round-off.

    Args:
        x: ``(N, C, H, W)`` input in float32 or float64.
        kh, kw: odd kernel sizes.
        has_bias: append the bias row/column (patch sums and the position count).

    Returns:
        ``(C kh kw [+ 1], C kh kw [+ 1])`` in ``x``'s dtype, in the ``(c, i, j)`` order of
        ``conv.weight.reshape(out_channels, -1)``.
    """
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"same_conv2d_gram needs odd kernel sizes, got {kh}x{kw}")
    n, c, h, w = x.shape
    ph, pw = kh // 2, kw // 2
    oh, ow = 2 * ph, 2 * pw  # largest offsets between two taps
    x = x.detach().contiguous()
    # A is symmetric: only row offsets d = i' - i >= 0 are computed (the others are the
    # transposed blocks), so the partner pixel is never above the first one
    xp = F.pad(x, (ow, ow, 0, oh))
    rows, cols = _line_groups(h, ph), _line_groups(w, pw)
    weight_shape = [c, c, oh + 1, 2 * ow + 1]
    # corr[r, q, c, c', d, b] = sum over region (r, q) of x[c, s, t] x[c', s + d, t + b - ow]
    corr = x.new_empty((len(rows), len(cols), c, c, oh + 1, 2 * ow + 1))
    for ri, (r0, r1) in enumerate(rows):
        for qi, (q0, q1) in enumerate(cols):
            grad_out = x[:, :, r0:r1, q0:q1]
            inp = xp[:, :, r0 : r1 + oh, q0 : q1 + 2 * ow]
            corr[ri, qi] = torch.ops.aten.convolution_backward(
                grad_out,
                inp,
                x.new_empty(weight_shape),
                None,
                [1, 1],
                [0, 0],
                [1, 1],
                False,
                [0, 0],
                1,
                [False, True, False],
            )[1]
    kept_r = _kept(rows, kh, h, ph).to(x)
    kept_c = _kept(cols, kw, w, pw).to(x)
    # per tap (i, j): the correlations over the pixels it visits, as tap[i, j, d, b, c, c']
    seen = torch.kron(kept_r, kept_c)  # (kh kw, R Q): tap (i, j) sees region (r, q)
    tap = seen @ corr.reshape(len(rows) * len(cols), -1)
    tap = tap.reshape(kh, kw, c, c, oh + 1, 2 * ow + 1).permute(0, 1, 4, 5, 2, 3)
    i = torch.arange(kh).view(kh, 1, 1, 1)
    j = torch.arange(kw).view(1, kw, 1, 1)
    i2 = torch.arange(kh).view(1, 1, kh, 1)
    j2 = torch.arange(kw).view(1, 1, 1, kw)
    lower = (i2 < i).expand(kh, kw, kh, kw)
    # blocks[i, j, i', j'] = tap[i, j, i' - i, j' - j + ow] for i' >= i, else the transpose
    # of blocks[i', j', i, j]
    first_i = torch.where(lower, i2, i)
    first_j = torch.where(lower, j2, j)
    offset_d = (i2 - i).abs().expand(kh, kw, kh, kw)
    offset_b = torch.where(lower, j - j2, j2 - j) + ow
    gathered = tap[first_i, first_j, offset_d, offset_b]  # (kh, kw, kh, kw, c, c)
    blocks = torch.where(lower[..., None, None], gathered.mT, gathered)
    d = c * kh * kw
    gram = blocks.permute(4, 0, 1, 5, 2, 3).reshape(d, d)
    if not has_bias:
        return gram.contiguous()
    out = gram.new_empty((d + 1, d + 1))
    out[:d, :d] = gram
    # patch sums: region sums of x seen by each tap
    xsum = x.sum(dim=0)
    region_sums = torch.stack(
        [torch.stack([xsum[:, r0:r1, q0:q1].sum(dim=(1, 2)) for q0, q1 in cols]) for r0, r1 in rows]
    )  # (R, Q, C)
    col = torch.einsum("ir,jq,rqc->cij", kept_r, kept_c, region_sums).reshape(d)
    out[:d, d] = col
    out[d, :d] = col
    out[d, d] = float(n * h * w)
    return out
