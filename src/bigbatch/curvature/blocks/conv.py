"""``nn.Conv2d`` (``groups=1``, zero padding) as a Kronecker block over im2col patches.

``A`` is over the patches ``a`` (feature order ``(c, i, j)`` of
``weight.reshape(out, -1)``, a trailing 1 with a bias), ``G`` over the output gradient's
channels; the output pixels are the weight-sharing positions (K-FAC-expand or -reduce, see
:mod:`.kronecker`). For stride-1 "same" convolutions the expand-``A`` comes from
:func:`~bigbatch.curvature.blocks.conv_gram.same_conv2d_gram` (no patches); others gather
the patches from a strided view of the padded input with one reshape (faster than
``F.unfold`` on the CPU). Only computed when due (the patches are the expensive part).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from bigbatch.curvature.blocks.base import Claim, LinearUser, ParamSlice, Recorder, Refusal
from bigbatch.curvature.blocks.conv_gram import same_conv2d_gram
from bigbatch.curvature.blocks.kronecker import KroneckerBlock, gram_with_ones
from bigbatch.curvature.blocks.precision import autocast_off, to_stat
from bigbatch.curvature.keys import BlockKind, Factor, KFACApprox

__all__ = [
    "Conv2dBlock",
    "conv2d_grad_sum",
    "conv2d_input_sum",
    "conv2d_patches",
    "conv2d_refusal",
]


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[-1]))


def conv2d_refusal(conv: nn.Conv2d) -> str | None:
    """Why this convolution has no K-FAC block here, or ``None`` when it has one."""
    if conv.groups != 1:
        return f"Conv2d with groups={conv.groups} (only groups=1 has K-FAC here)"
    if conv.padding_mode != "zeros":
        return f"Conv2d with padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str) and conv.padding not in ("same", "valid"):
        return f"Conv2d with padding={conv.padding!r}"
    return None


def _explicit_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` zero padding that the module applies to its input."""
    kernel, dilation = _pair(conv.kernel_size), _pair(conv.dilation)
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        # "same", as PyTorch: total = dilation * (k - 1), the odd extra on the right/bottom
        total_h, total_w = dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1)
        top, left = total_h // 2, total_w // 2
        return (left, total_w - left, top, total_h - top)
    ph, pw = _pair(conv.padding)
    return (pw, pw, ph, ph)


def _batched(x: Tensor) -> Tensor:
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"Conv2d input must be (N, C, H, W) or (C, H, W), got {tuple(x.shape)}")
    return x


def _patch_view(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``(N, H_out, W_out, C, kh, kw)`` strided view of the padded input (no copy)."""
    kernel, dilation, stride = _pair(conv.kernel_size), _pair(conv.dilation), _pair(conv.stride)
    xp = F.pad(x.detach(), _explicit_padding(conv)).contiguous()
    n, c, h, w = xp.shape
    out_h = max((h - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1, 0)
    out_w = max((w - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1, 0)
    s_n, s_c, s_h, s_w = xp.stride()
    return xp.as_strided(
        (n, out_h, out_w, c, kernel[0], kernel[1]),
        (s_n, s_h * stride[0], s_w * stride[1], s_c, s_h * dilation[0], s_w * dilation[1]),
    )


def conv2d_patches(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """im2col patches of ``x`` for ``conv``: ``(N, P, C kh kw)``, ``P = H_out W_out`` in
    row-major order, features in the ``(c, i, j)`` order of ``weight.reshape(out, -1)``.
    Honours kernel size, stride, padding (ints, pairs, "same", "valid") and dilation; an
    unbatched ``(C, H, W)`` input is ``N = 1``; keeps ``x``'s dtype."""
    view = _patch_view(_batched(x), conv)
    n, oh, ow = view.shape[:3]
    return view.reshape(n, oh * ow, -1)


def _is_same_stride1(conv: nn.Conv2d) -> bool:
    """Stride 1, dilation 1, odd kernel with padding ``(k - 1) / 2`` on every side."""
    kh, kw = _pair(conv.kernel_size)
    if _pair(conv.stride) != (1, 1) or _pair(conv.dilation) != (1, 1) or kh % 2 == 0:
        return False
    if kw % 2 == 0:
        return False
    return _explicit_padding(conv) == (kw // 2, kw // 2, kh // 2, kh // 2)


def conv2d_input_sum(
    x: Tensor, conv: nn.Conv2d, has_bias: bool, approx: KFACApprox = "expand"
) -> tuple[Tensor, int]:
    """``(sum a a^T, rows)`` over the patches (expand: rows = N P) or over the per-sample
    mean patches (reduce: rows = N), float32 (float64 for float64 input)."""
    xs = _batched(to_stat(x))
    with autocast_off(xs.device):
        if approx == "reduce":
            mean = _patch_view(xs, conv).mean(dim=(1, 2)).reshape(xs.shape[0], -1)
            return gram_with_ones(mean, has_bias), int(xs.shape[0])
        if _is_same_stride1(conv):
            kh, kw = _pair(conv.kernel_size)
            rows = int(xs.shape[0] * xs.shape[-1] * xs.shape[-2])
            return same_conv2d_gram(xs, kh, kw, has_bias), rows
        patches = conv2d_patches(xs, conv)
        flat = patches.reshape(-1, patches.shape[-1])
        return gram_with_ones(flat, has_bias), int(flat.shape[0])


def conv2d_grad_sum(gy: Tensor, approx: KFACApprox = "expand") -> tuple[Tensor, int]:
    """``(sum g g^T, rows)`` over the channels (dim 1) of a conv output gradient: every
    sample and pixel (expand), or per sample summed over the pixels (reduce)."""
    g = to_stat(gy)
    if g.dim() == 3:
        g = g.unsqueeze(0)
    with autocast_off(g.device):
        if approx == "reduce":
            s = g.sum(dim=(2, 3))
            return s.T @ s, int(g.shape[0])
        g3 = g.reshape(g.shape[0], g.shape[1], -1)
        if not g3.is_contiguous():
            g3 = g3.contiguous()
        # per-sample (C, P) @ (P, C) products: no transposed copy of the gradient
        return torch.matmul(g3, g3.mT).sum(dim=0), int(g3.shape[0] * g3.shape[2])


class Conv2dBlock(KroneckerBlock):
    """The weight (and trainable bias) of one ``nn.Conv2d`` with ``groups=1``."""

    kind = BlockKind.CONV2D

    def __init__(self, name: str, module: nn.Conv2d, bias: bool) -> None:
        b = module.bias if bias else None
        super().__init__(name, ParamSlice(module.weight), None if b is None else ParamSlice(b))
        self.module = module

    @classmethod
    def claim(cls, name: str, module: nn.Module, sample_dim: int) -> Claim | Refusal | None:
        if not isinstance(module, nn.Conv2d):
            return None
        reason = conv2d_refusal(module)
        if reason is not None:
            return Refusal(reason)
        if not module.weight.requires_grad:
            return Refusal("its weight is frozen")
        bias = isinstance(module.bias, nn.Parameter) and module.bias.requires_grad
        block = cls(name, module, bias)
        return Claim([block], [block])

    def install(self, recorder: Recorder) -> list[RemovableHandle]:
        return [self.module.register_forward_hook(partial(self._on_forward, recorder))]

    def functional_weights(self) -> Mapping[Tensor, LinearUser]:
        return {}

    def _on_forward(self, rec: Recorder, module: nn.Module, inputs: Any, output: Any) -> None:
        if not rec.recording() or not isinstance(output, Tensor):
            return
        x = inputs[0]
        sums = rec.sums(self.name)
        sums.saw_samples(rec.micro, int(x.shape[0]) if x.dim() == 4 else 1)
        if rec.wants(self.name, Factor.A):
            total, rows = conv2d_input_sum(x, self.module, self.bias is not None, rec.approx)
            sums.add(Factor.A, total, rows)
        if rec.wants(self.name, Factor.G) and output.requires_grad:
            approx = rec.approx

            def hook(gy: Tensor) -> None:
                if rec.grads_now():
                    total, rows = conv2d_grad_sum(gy.detach(), approx)
                    sums.add(Factor.G, total, rows)

            output.register_hook(hook)
