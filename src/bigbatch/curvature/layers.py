"""Per-layer curvature statistics for SP-NGD (K-FAC and unit-wise Fisher), as pure functions.

This module holds the mathematics of the per-layer Fisher blocks used by SP-NGD
(Osawa et al., 2020) and nothing else: no hooks, no state, no distributed logic. Every
function takes a module (for its hyper-parameters only), the layer input and/or the
gradient with respect to the layer output, and returns a tensor. The hooks that call
these functions live elsewhere in :mod:`bigbatch.curvature`.

Notation
--------
``N`` is the number of samples, ``P`` the number of positions that share one weight per
sample (output pixels of a convolution, tokens of a sequence; ``P = 1`` for a plain
``(N, in)`` linear layer). ``a`` is a layer input row (im2col patch for convolutions)
with a trailing ``1`` appended when the layer has a bias, ``g`` the *per-sample*
gradient of the loss with respect to the layer output. The K-FAC factors are::

    A = (1 / N)     sum_i sum_p a_ip a_ip^T
    G = (1 / (N P)) sum_i sum_p g_ip g_ip^T

and the preconditioned gradient of the ``(out, in [+1])`` gradient matrix ``W'`` is
``G^-1 W' A^-1``. Normalisation layers use the unit-wise Fisher: per channel ``c`` a
``2 x 2`` matrix ``F_c = (1 / N) sum_i v_ic v_ic^T`` with
``v_ic = (sum_p g_ipc * xhat_ipc, sum_p g_ipc)`` (the per-sample gradients of gamma_c and
beta_c). Embeddings use a diagonal ``A`` (index counts) and a dense ``G``.

Sums, not means
---------------
Statistics must accumulate *exactly* over micro-batches, so the ``*_sum`` functions
return plain sums over samples and positions of whatever gradient they are given
(``gy``, usually the gradient of a micro-batch loss, not the per-sample gradient).
The caller adds the sums of all micro-batches and normalises once at the end with
:func:`finalize_kronecker` / :func:`finalize_unitwise`. The link between ``gy`` and the
per-sample gradient is one scalar ``c`` with ``g_i = c * gy_i``; the finalisers take
``grad_scale = c**2 / N``:

* ``gy`` from the batch-MEAN loss ``(1/N) sum_i L_i`` (the usual training backward;
  also gradient accumulation where each micro-batch mean is divided by the number of
  micro-batches): ``c = N`` so ``grad_scale = N`` (the default);
* ``gy`` from a SUM of per-sample losses (e.g. a Monte-Carlo Fisher backward on
  sampled labels): ``c = 1`` so ``grad_scale = 1 / N``.

Precision
---------
Statistics are computed in float64 when the input is float64 and in float32 otherwise
(bf16/fp16 activations from autocast are upcast first, and autocast is switched off
around the matmuls so they really run in float32).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "UnsupportedLayerError",
    "batchnorm_normalized_input",
    "batchnorm_unitwise_sum",
    "conv2d_input_sum",
    "conv2d_patches",
    "embedding_input_sum",
    "embedding_precondition",
    "finalize_kronecker",
    "finalize_unitwise",
    "kronecker_precondition",
    "layernorm_normalized_input",
    "layernorm_unitwise_sum",
    "linear_input_sum",
    "normalized_from_output",
    "output_grad_sum",
    "same_conv2d_gram",
    "split_grad_matrix",
    "unitwise_precondition",
    "unitwise_sum",
    "weight_grad_matrix",
]


class UnsupportedLayerError(ValueError):
    """A layer configuration that the K-FAC statistics here cannot represent.

    Callers are expected to catch it and fall back (e.g. to a plain gradient or a
    diagonal preconditioner for that layer).
    """


# --------------------------------------------------------------------------- helpers


def _stat_dtype(t: Tensor) -> torch.dtype:
    """The dtype statistics of ``t`` are computed in: float64 stays, everything else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _to_stat(t: Tensor) -> Tensor:
    """``t`` detached and cast to its statistics dtype (no copy when already there)."""
    return t.detach().to(_stat_dtype(t))


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """A context that disables autocast on ``device`` (a no-op where autocast does not exist)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):
        return contextlib.nullcontext()


def _gram_with_ones(a: Tensor, has_bias: bool) -> Tensor:
    """``[a, 1]^T [a, 1]`` for a 2-D ``a`` of shape (M, d), without materialising ``[a, 1]``."""
    gram = a.T @ a
    if not has_bias:
        return gram
    m, d = a.shape
    out = gram.new_empty((d + 1, d + 1))
    out[:d, :d] = gram
    col = a.sum(dim=0)
    out[:d, d] = col
    out[d, :d] = col
    out[d, d] = float(m)
    return out


def _pair(v: int | tuple[int, ...], name: str) -> tuple[int, int]:
    """A conv hyper-parameter as a pair of ints."""
    if isinstance(v, int):
        return (v, v)
    if len(v) != 2:
        raise UnsupportedLayerError(f"Conv2d {name}={v!r} is not a pair of ints")
    return (int(v[0]), int(v[1]))


# --------------------------------------------------------------- Kronecker (Linear, Conv2d)


def linear_input_sum(x: Tensor, has_bias: bool) -> Tensor:
    """Sum of ``a a^T`` over all leading dims of ``x``, with ``a = [x, 1]`` when ``has_bias``.

    Args:
        x: the layer input, shape ``(N, ..., in)`` (also accepts a 1-D ``(in,)`` vector).
        has_bias: append a constant ``1`` to every row (the bias column of the weight).

    Returns:
        A ``(in + has_bias, in + has_bias)`` matrix in float32 (float64 for float64
        input). One matmul; the bias row/column is filled from the column sums.
    """
    a = _to_stat(x)
    a = a.reshape(-1, a.shape[-1]) if a.dim() > 0 else a.reshape(1, 1)
    with _autocast_off(a.device):
        return _gram_with_ones(a, has_bias)


def output_grad_sum(gy: Tensor, channel_dim: int = -1) -> Tensor:
    """Sum of ``g g^T`` over every dim except ``channel_dim`` (linear: last; conv: 1).

    Returns a ``(C, C)`` matrix in float32 (float64 for float64 input).
    """
    g = _to_stat(gy)
    cd = channel_dim % g.dim() if g.dim() else 0
    if g.dim() >= 3 and cd == 1 and g.is_contiguous():
        # (N, C, positions...): per-sample (C, P) @ (P, C) products, no transposed copy
        g3 = g.reshape(g.shape[0], g.shape[1], -1)
        with _autocast_off(g.device):
            return torch.matmul(g3, g3.mT).sum(dim=0)
    g = g.movedim(channel_dim, -1)
    g = g.reshape(-1, g.shape[-1])
    with _autocast_off(g.device):
        return g.T @ g


def _check_conv2d(conv: nn.Conv2d) -> None:
    """Raise :class:`UnsupportedLayerError` for conv configurations K-FAC here can't handle."""
    if conv.groups != 1:
        raise UnsupportedLayerError(
            f"Conv2d with groups={conv.groups} is not supported by the Kronecker-factored "
            "statistics (its weight is block-diagonal over groups); this layer falls back "
            "to the unpreconditioned gradient"
        )
    if conv.padding_mode != "zeros":
        raise UnsupportedLayerError(
            f"Conv2d with padding_mode={conv.padding_mode!r} is not supported (only "
            "'zeros'); this layer falls back to the unpreconditioned gradient"
        )


def _conv2d_explicit_padding(
    conv: nn.Conv2d, kernel: tuple[int, int], dilation: tuple[int, int]
) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` zero padding that the module applies to its input."""
    padding = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            # Same rule as PyTorch: total = dilation * (k - 1), the odd extra on the
            # right/bottom.
            total_h = dilation[0] * (kernel[0] - 1)
            total_w = dilation[1] * (kernel[1] - 1)
            top, left = total_h // 2, total_w // 2
            return (left, total_w - left, top, total_h - top)
        raise UnsupportedLayerError(f"Conv2d padding={padding!r} is not supported")
    ph, pw = _pair(padding, "padding")
    return (pw, pw, ph, ph)


def conv2d_patches(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """im2col patches of ``x`` for ``conv``: shape ``(N, P, C * kh * kw)``.

    The feature order ``(c, i, j)`` (channel-major, then kernel row, then kernel
    column) matches ``conv.weight.reshape(out_channels, -1)``, and ``P = H_out * W_out``
    in row-major order over the output positions. Honours ``kernel_size``, ``stride``,
    ``padding`` (ints, pairs, ``"same"`` and ``"valid"``) and ``dilation``. An unbatched
    ``(C, H, W)`` input is treated as ``N = 1``. The patches keep ``x``'s dtype.

    Raises:
        UnsupportedLayerError: for ``groups > 1`` or a ``padding_mode`` other than
            ``"zeros"`` (the caller should fall back for that layer).
    """
    _check_conv2d(conv)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"Conv2d input must be (N, C, H, W) or (C, H, W), got {tuple(x.shape)}")
    kernel = _pair(conv.kernel_size, "kernel_size")
    dilation = _pair(conv.dilation, "dilation")
    stride = _pair(conv.stride, "stride")
    left, right, top, bottom = _conv2d_explicit_padding(conv, kernel, dilation)
    # A strided view of the padded input gathered by one reshape: the same patches as
    # F.unfold, which is several times slower on the CPU at large batch.
    xp = F.pad(x.detach(), (left, right, top, bottom)).contiguous()
    n, c, h, w = xp.shape
    out_h = (h - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (w - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    s_n, s_c, s_h, s_w = xp.stride()
    view = xp.as_strided(
        (n, max(out_h, 0), max(out_w, 0), c, kernel[0], kernel[1]),
        (s_n, s_h * stride[0], s_w * stride[1], s_c, s_h * dilation[0], s_w * dilation[1]),
    )
    return view.reshape(n, max(out_h, 0) * max(out_w, 0), c * kernel[0] * kernel[1])


def conv2d_input_sum(
    x: Tensor, conv: nn.Conv2d, has_bias: bool | None = None, method: str = "auto"
) -> tuple[Tensor, int]:
    """Sum over samples and positions of ``a a^T`` for a Conv2d, and ``P``.

    ``a`` is an im2col patch (:func:`conv2d_patches`) with a ``1`` appended when the
    block has a bias column: ``has_bias`` defaults to ``conv.bias is not None``; pass
    ``False`` when the bias is not part of the Kronecker block (e.g. a frozen bias).
    Returns ``(sum, P)`` with ``P`` the number of output positions per sample (needed
    by :func:`finalize_kronecker` for ``G``).

    ``method``: ``"im2col"`` builds the patches and their Gram matrix; ``"correlation"``
    (stride 1, dilation 1, odd kernel with its "same" zero padding, see
    :func:`same_conv2d_gram`) computes the same matrix from correlations of the input with
    itself, without patches (several times faster); ``"auto"`` (default) picks
    ``"correlation"`` where it applies and ``"im2col"`` elsewhere.
    """
    if method not in ("auto", "im2col", "correlation"):
        raise ValueError(f"method must be 'auto', 'im2col' or 'correlation', got {method!r}")
    bias = conv.bias is not None if has_bias is None else has_bias
    xs = _to_stat(x)
    use_corr = method == "correlation" or (method == "auto" and _same_conv2d(conv))
    if use_corr:
        _check_conv2d(conv)
        if not _same_conv2d(conv):
            raise UnsupportedLayerError(
                "the correlation method needs stride 1, dilation 1, odd kernel sizes and "
                f"padding (k - 1) / 2 on every side; got {conv}"
            )
        if xs.dim() == 3:
            xs = xs.unsqueeze(0)
        if xs.dim() != 4:
            raise ValueError(
                f"Conv2d input must be (N, C, H, W) or (C, H, W), got {tuple(xs.shape)}"
            )
        kh, kw = _pair(conv.kernel_size, "kernel_size")
        with _autocast_off(xs.device):
            return same_conv2d_gram(xs, kh, kw, bias), int(xs.shape[-1] * xs.shape[-2])
    patches = conv2d_patches(xs, conv)
    return linear_input_sum(patches, bias), int(patches.shape[1])


def _same_conv2d(conv: nn.Conv2d) -> bool:
    """Whether ``conv`` is stride 1, dilation 1, groups 1, zero padding ``(k - 1) / 2`` with
    odd ``k`` on every side (the configurations :func:`same_conv2d_gram` covers)."""
    if conv.groups != 1 or conv.padding_mode != "zeros":
        return False
    kernel = _pair(conv.kernel_size, "kernel_size")
    if _pair(conv.stride, "stride") != (1, 1) or _pair(conv.dilation, "dilation") != (1, 1):
        return False
    if kernel[0] % 2 == 0 or kernel[1] % 2 == 0:
        return False
    left, right, top, bottom = _conv2d_explicit_padding(conv, kernel, (1, 1))
    return (top, bottom, left, right) == (kernel[0] // 2,) * 2 + (kernel[1] // 2,) * 2


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


def weight_grad_matrix(module: nn.Module) -> Tensor:
    """The ``(out, in * kh * kw [+ 1])`` gradient matrix of a Linear/Conv2d.

    Built from ``module.weight.grad`` reshaped to ``(out, -1)`` with ``module.bias.grad``
    appended as the last column when the module has a bias.

    Raises:
        UnsupportedLayerError: for modules other than ``nn.Linear`` / ``nn.Conv2d``.
        ValueError: when a gradient is missing.
    """
    weight, bias = _weight_and_bias(module)
    if weight.grad is None:
        raise ValueError(f"{type(module).__name__}.weight has no gradient")
    mat = weight.grad.reshape(weight.shape[0], -1)
    if bias is None:
        return mat
    if bias.grad is None:
        raise ValueError(
            f"{type(module).__name__}.bias has no gradient (a bias without gradient "
            "cannot be part of the Kronecker block)"
        )
    return torch.cat([mat, bias.grad.reshape(-1, 1).to(mat.dtype)], dim=1)


def split_grad_matrix(module: nn.Module, mat: Tensor) -> tuple[Tensor, Tensor | None]:
    """Inverse of :func:`weight_grad_matrix`: ``(weight-shaped, bias-shaped or None)``."""
    weight, bias = _weight_and_bias(module)
    n_in = weight[0].numel()
    expected = (weight.shape[0], n_in + (bias is not None))
    if tuple(mat.shape) != expected:
        raise ValueError(
            f"gradient matrix of shape {tuple(mat.shape)} does not match "
            f"{type(module).__name__} (expected {expected})"
        )
    w = mat[:, :n_in].reshape(weight.shape)
    b = mat[:, n_in].reshape(bias.shape) if bias is not None else None
    return w, b


def _weight_and_bias(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """``(weight, bias)`` of a Linear/Conv2d (bias may be ``None``)."""
    if not isinstance(module, nn.Linear | nn.Conv2d):
        raise UnsupportedLayerError(
            f"{type(module).__name__} has no Kronecker-factored gradient matrix "
            "(only Linear and Conv2d)"
        )
    bias: Tensor | None = module.bias
    return module.weight, bias


def kronecker_precondition(grad_mat: Tensor, a_inv: Tensor, g_inv: Tensor) -> Tensor:
    """``g_inv @ grad_mat @ a_inv`` (the K-FAC natural gradient ``G^-1 W' A^-1``).

    Computed in the promoted dtype of the three inputs and returned in
    ``grad_mat.dtype``.
    """
    out_dim, in_dim = grad_mat.shape
    if tuple(a_inv.shape) != (in_dim, in_dim) or tuple(g_inv.shape) != (out_dim, out_dim):
        raise ValueError(
            f"shapes do not match: grad {tuple(grad_mat.shape)}, A^-1 {tuple(a_inv.shape)}, "
            f"G^-1 {tuple(g_inv.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(grad_mat.dtype, a_inv.dtype), g_inv.dtype)
    with _autocast_off(grad_mat.device):
        out = g_inv.to(dtype) @ grad_mat.to(dtype) @ a_inv.to(dtype)
    return out.to(grad_mat.dtype)


def finalize_kronecker(
    a_sum: Tensor,
    g_sum: Tensor,
    n_samples: int,
    positions: int = 1,
    grad_scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Turn accumulated sums into the K-FAC factors ``(A, G)``.

    ``A = a_sum / n_samples`` and ``G = g_sum * grad_scale / positions``.

    With ``g_i = c * gy_i`` the per-sample output gradient,
    ``G = (1 / (N P)) sum (c gy)(c gy)^T = (c**2 / N) / P * sum gy gy^T``, so
    ``grad_scale = c**2 / N``:

    * ``None`` (default) means ``gy`` came from the batch-MEAN loss: ``c = N`` and
      ``grad_scale = n_samples``, i.e. ``G = (N / P) sum gy gy^T``;
    * pass ``1 / n_samples`` when ``gy`` came from a SUM of per-sample losses
      (``c = 1``; e.g. the Monte-Carlo Fisher backward): ``G = (1 / (N P)) sum gy gy^T``.

    Args:
        a_sum: sum of :func:`linear_input_sum` / :func:`conv2d_input_sum` /
            :func:`embedding_input_sum` over micro-batches.
        g_sum: sum of :func:`output_grad_sum` over the same micro-batches.
        n_samples: total number of samples ``N`` behind the sums.
        positions: weight-sharing positions per sample ``P`` (conv output pixels,
            sequence length; 1 for a plain linear layer).
        grad_scale: see above.
    """
    if n_samples <= 0 or positions <= 0:
        raise ValueError(f"n_samples ({n_samples}) and positions ({positions}) must be positive")
    scale = float(n_samples) if grad_scale is None else float(grad_scale)
    return a_sum / n_samples, g_sum * (scale / positions)


# --------------------------------------------------------------- unit-wise (BN, LayerNorm)


def batchnorm_normalized_input(bn: _BatchNorm, x: Tensor) -> Tensor:
    """``x_hat`` exactly as ``bn`` normalises ``x`` in its current mode (float32/64).

    Mirrors ``_BatchNorm.forward``: batch statistics (mean and *biased* variance over
    every dim but the channel dim 1) when the module is training or has no running
    statistics, the running statistics otherwise. Running statistics are not
    updated. (A ``SyncBatchNorm`` normalises with statistics over all processes; this
    function uses the local batch.)
    """
    xs = _to_stat(x)
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    shape = [1] * xs.dim()
    shape[1] = xs.shape[1]
    if use_batch_stats:
        dims = [d for d in range(xs.dim()) if d != 1]
        var, mean = torch.var_mean(xs, dim=dims, correction=0, keepdim=True)
    else:
        if bn.running_mean is None or bn.running_var is None:  # pragma: no cover - guarded
            raise ValueError("BatchNorm has only one of running_mean / running_var")
        mean = bn.running_mean.detach().to(xs.dtype).reshape(shape)
        var = bn.running_var.detach().to(xs.dtype).reshape(shape)
    return (xs - mean) * torch.rsqrt(var + bn.eps)


#: ``x_hat`` is recovered from the output only where ``|beta_c| <= ratio * |gamma_c|``:
#: the rounding error of ``y`` is amplified by ``(|x_hat| + |beta / gamma|)``, so this keeps
#: it below ~1e-5 relative in float32 (and catches gamma == 0, where it is undefined).
XHAT_FROM_OUTPUT_MAX_RATIO = 100.0


def normalized_from_output(
    y: Tensor, weight: Tensor, bias: Tensor, channel_dims: int | None = None
) -> Tensor | None:
    """``x_hat = (y - beta) / gamma`` recovered from an affine normalisation's OUTPUT ``y``.

    One elementwise pass instead of re-normalising the input (no reduction over the batch).
    ``channel_dims=None``: BatchNorm, gamma/beta of shape ``(C,)`` act on dim 1 of ``y``;
    an int ``k``: LayerNorm, gamma/beta have the shape of the trailing ``k`` dims of ``y``.
    Returns ``None`` (the caller falls back to :func:`batchnorm_normalized_input` /
    :func:`layernorm_normalized_input`) when some ``|gamma| <= |beta| / ratio`` (including
    ``gamma == 0``) or a parameter is not finite, see :data:`XHAT_FROM_OUTPUT_MAX_RATIO`,
    and for a half-precision output (autocast), whose rounding would be amplified.
    The result is float32 (float64 for float64 ``y``).
    """
    if y.dtype not in (torch.float32, torch.float64):
        return None  # a bf16/fp16 output (autocast) has lost too many digits for this
    ys = _to_stat(y)
    gamma = weight.detach().to(ys.dtype)
    beta = bias.detach().to(ys.dtype)
    safe = gamma.abs() * XHAT_FROM_OUTPUT_MAX_RATIO > beta.abs()
    if not bool(safe.all()):
        return None
    scale = torch.reciprocal(gamma)
    if not bool(torch.isfinite(scale).all()):
        return None
    shift = -beta * scale
    if channel_dims is None:
        shape = [1] * ys.dim()
        shape[1] = -1
        scale, shift = scale.reshape(shape), shift.reshape(shape)
    return torch.addcmul(shift, ys, scale)


def layernorm_normalized_input(ln: nn.LayerNorm, x: Tensor) -> Tensor:
    """``x_hat`` as ``ln`` normalises ``x`` (mean and biased variance over the trailing
    ``len(ln.normalized_shape)`` dims), in float32/64."""
    xs = _to_stat(x)
    nd = len(ln.normalized_shape)
    if tuple(xs.shape[xs.dim() - nd :]) != tuple(ln.normalized_shape):
        raise ValueError(
            f"input of shape {tuple(xs.shape)} does not end with normalized_shape "
            f"{tuple(ln.normalized_shape)}"
        )
    dims = list(range(xs.dim() - nd, xs.dim()))
    var, mean = torch.var_mean(xs, dim=dims, correction=0, keepdim=True)
    return (xs - mean) * torch.rsqrt(var + ln.eps)


def unitwise_sum(
    x_hat: Tensor, gy: Tensor, channel_dims: Sequence[int], sample_dim: int = 0
) -> Tensor:
    """Sum over samples of ``v_i v_i^T`` per channel, shape ``(C, 2, 2)``.

    ``v_ic = (sum_p gy_ipc * x_hat_ipc, sum_p gy_ipc)``: for every sample ``i`` (index
    along ``sample_dim``) and channel ``c`` (a multi-index over ``channel_dims``,
    flattened in row-major order so that ``C = prod(shape[channel_dims])`` matches
    ``gamma.reshape(-1)``), the sums run over all remaining dims (the positions).

    BatchNorm: ``channel_dims=(1,)``; LayerNorm: the trailing normalised dims (see
    :func:`batchnorm_unitwise_sum` and :func:`layernorm_unitwise_sum`).
    Returned in float32 (float64 for float64 input).
    """
    if x_hat.shape != gy.shape:
        raise ValueError(f"x_hat {tuple(x_hat.shape)} and gy {tuple(gy.shape)} differ")
    ndim = x_hat.dim()
    s = sample_dim % ndim
    chans = [d % ndim for d in channel_dims]
    if not chans or s in chans or len(set(chans)) != len(chans):
        raise ValueError(
            f"invalid channel_dims={tuple(channel_dims)} / sample_dim={sample_dim} "
            f"for a {ndim}-D input"
        )
    dtype = torch.promote_types(_stat_dtype(x_hat), _stat_dtype(gy))
    g = gy.detach().to(dtype)
    xh = x_hat.detach().to(dtype)
    positions = [d for d in range(ndim) if d != s and d not in chans]
    g_gamma = (g * xh).sum(dim=positions) if positions else g * xh
    g_beta = g.sum(dim=positions) if positions else g
    # After the reduction the remaining dims keep their relative order; bring the sample
    # dim to the front and flatten the channel dims.
    remaining = sorted([s, *chans])
    order = [remaining.index(s)] + [remaining.index(c) for c in sorted(chans)]
    n = x_hat.shape[s]
    v = torch.stack(
        [g_gamma.permute(order).reshape(n, -1), g_beta.permute(order).reshape(n, -1)], dim=-1
    )
    return torch.einsum("nci,ncj->cij", v, v)


def batchnorm_unitwise_sum(x_hat: Tensor, gy: Tensor) -> Tensor:
    """:func:`unitwise_sum` for BatchNorm1d/2d/3d inputs ``(N, C, *)`` (channel dim 1)."""
    return unitwise_sum(x_hat, gy, channel_dims=(1,), sample_dim=0)


def layernorm_unitwise_sum(x_hat: Tensor, gy: Tensor, normalized_ndim: int) -> Tensor:
    """:func:`unitwise_sum` for LayerNorm: channels = the trailing ``normalized_ndim`` dims,
    samples = dim 0, positions = the dims in between; ``C = prod(normalized_shape)``."""
    ndim = x_hat.dim()
    if not 1 <= normalized_ndim < ndim:
        raise ValueError(
            f"normalized_ndim={normalized_ndim} needs a sample dim in front (input is {ndim}-D)"
        )
    return unitwise_sum(x_hat, gy, channel_dims=tuple(range(ndim - normalized_ndim, ndim)))


def finalize_unitwise(f_sum: Tensor, n_samples: int, grad_scale: float | None = None) -> Tensor:
    """Turn an accumulated :func:`unitwise_sum` into the unit-wise Fisher ``F`` (C, 2, 2).

    With ``g_i = c * gy_i``, ``v_i = c * v_i(gy)`` and
    ``F = (1 / N) sum_i v_i v_i^T = (c**2 / N) sum v(gy) v(gy)^T = grad_scale * f_sum``,
    the same ``grad_scale = c**2 / N`` as :func:`finalize_kronecker`:

    * ``None`` (default): ``gy`` from the batch-MEAN loss, ``grad_scale = n_samples``,
      so ``F = N * f_sum``;
    * ``1 / n_samples``: ``gy`` from a SUM of per-sample losses, ``F = f_sum / N``.
    """
    if n_samples <= 0:
        raise ValueError(f"n_samples ({n_samples}) must be positive")
    scale = float(n_samples) if grad_scale is None else float(grad_scale)
    return f_sum * scale


def unitwise_precondition(
    grad_gamma: Tensor, grad_beta: Tensor, f_inv: Tensor
) -> tuple[Tensor, Tensor]:
    """Apply the per-channel ``2 x 2`` inverse Fisher to the BN/LayerNorm gradients.

    ``[gamma'_c, beta'_c] = f_inv[c] @ [grad_gamma_c, grad_beta_c]`` for every channel.

    ``grad_gamma`` and ``grad_beta`` have the parameter shape (``C`` elements in total);
    ``f_inv`` is ``(C, 2, 2)``. Batched, no loops; results in the gradients' dtypes.
    """
    c = grad_gamma.numel()
    if grad_beta.numel() != c or tuple(f_inv.shape) != (c, 2, 2):
        raise ValueError(
            f"shapes do not match: gamma {tuple(grad_gamma.shape)}, beta "
            f"{tuple(grad_beta.shape)}, F^-1 {tuple(f_inv.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(grad_gamma.dtype, grad_beta.dtype), f_inv.dtype)
    v = torch.stack([grad_gamma.reshape(-1).to(dtype), grad_beta.reshape(-1).to(dtype)], dim=-1)
    out = torch.einsum("cij,cj->ci", f_inv.to(dtype), v)
    return (
        out[:, 0].reshape(grad_gamma.shape).to(grad_gamma.dtype),
        out[:, 1].reshape(grad_beta.shape).to(grad_beta.dtype),
    )


# ------------------------------------------------------------------------------ Embedding


def embedding_input_sum(idx: Tensor, num_embeddings: int, padding_idx: int | None = None) -> Tensor:
    """Counts of every index in ``idx`` (any shape), float32, shape ``(num_embeddings,)``.

    This is the diagonal of ``sum_i sum_p a a^T`` for one-hot ``a``. Counting is done in
    int64 (exact) and converted at the end. An index out of range raises (it would
    also make the embedding lookup fail).

    ``padding_idx``: PyTorch never gives the padding row a gradient, so its count is
    set to ZERO here (the row is then preconditioned by whatever damping the inverse
    uses, and its zero gradient stays zero). Pass the module's ``padding_idx``.
    """
    flat = idx.detach().reshape(-1).to(torch.long)
    counts = torch.zeros(num_embeddings, dtype=torch.long, device=flat.device)
    counts.index_add_(0, flat, torch.ones_like(flat))
    if padding_idx is not None:
        counts[padding_idx] = 0
    return counts.to(torch.float32)


def embedding_precondition(grad_w: Tensor, a_inv_diag: Tensor, g_inv: Tensor) -> Tensor:
    """``diag(a_inv_diag) @ grad_w @ g_inv`` for an Embedding weight gradient ``(V, D)``.

    The output dim ``D`` is on the COLUMNS of an embedding weight, so ``G^-1`` acts from
    the right and the diagonal ``A^-1`` scales the rows. Computed in the promoted dtype
    and returned in ``grad_w.dtype``.
    """
    v, d = grad_w.shape
    if tuple(a_inv_diag.shape) != (v,) or tuple(g_inv.shape) != (d, d):
        raise ValueError(
            f"shapes do not match: grad {tuple(grad_w.shape)}, A^-1 diag "
            f"{tuple(a_inv_diag.shape)}, G^-1 {tuple(g_inv.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(grad_w.dtype, a_inv_diag.dtype), g_inv.dtype)
    with _autocast_off(grad_w.device):
        out = (a_inv_diag.to(dtype).unsqueeze(1) * grad_w.to(dtype)) @ g_inv.to(dtype)
    return out.to(grad_w.dtype)
