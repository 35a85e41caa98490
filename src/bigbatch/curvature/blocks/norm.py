"""Normalisation layers as unit-wise Fisher blocks (SP-NGD's BatchNorm Fisher).

Per channel ``c`` a ``k x k`` matrix ``F_c = M sum_n v_nc v_nc^T`` (see :mod:`.base` for
``M``) with ``v_nc = (sum_p gy_npc xhat_npc, sum_p gy_npc)``: the per-sample gradients of
``gamma_c`` and ``beta_c`` (``k = 2``), or of ``gamma_c`` alone (``k = 1``) for layers
without a shift (``LayerNorm(bias=False)``, ``RMSNorm``). Covers ``BatchNorm1d/2d/3d`` (and
``SyncBatchNorm``, whose ``xhat`` is recovered from its output), ``LayerNorm`` and
``RMSNorm`` with affine weights.

``xhat`` is recovered from the layer output as ``(y - beta) / gamma`` in the forward hook
(one pass, before any in-place op on it), or re-normalised from the input where gamma is
too small, a parameter is not finite, or the output is half precision (autocast).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from bigbatch.curvature.blocks.base import (
    Claim,
    FisherBlock,
    LinearUser,
    ParamSlice,
    Recorder,
    Refusal,
)
from bigbatch.curvature.blocks.precision import stat_dtype, to_stat
from bigbatch.curvature.keys import BlockKind, Factor

__all__ = [
    "XHAT_FROM_OUTPUT_MAX_RATIO",
    "UnitwiseNormBlock",
    "batchnorm_normalized_input",
    "layernorm_normalized_input",
    "normalized_from_output",
    "rmsnorm_normalized_input",
    "unitwise_precondition",
    "unitwise_sum",
]

_RMSNorm: type[nn.Module] | None = getattr(nn, "RMSNorm", None)

#: ``x_hat`` is recovered from the output only where ``|beta_c| <= ratio * |gamma_c|``:
#: the rounding error of ``y`` is amplified by ``(|x_hat| + |beta / gamma|)``, so this keeps
#: it below ~1e-5 relative in float32 (and catches gamma == 0, where it is undefined).
XHAT_FROM_OUTPUT_MAX_RATIO = 100.0


def batchnorm_normalized_input(bn: _BatchNorm, x: Tensor) -> Tensor:
    """``x_hat`` exactly as ``bn`` normalises ``x`` in its current mode (float32/64):
    batch statistics (mean and biased variance over every dim but dim 1) when training or
    without running statistics, the running statistics otherwise (a ``SyncBatchNorm``'s
    global statistics are not reproduced: the local batch's are used)."""
    xs = to_stat(x)
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


def layernorm_normalized_input(ln: nn.LayerNorm, x: Tensor) -> Tensor:
    """``x_hat`` as ``ln`` normalises ``x`` (mean and biased variance over the trailing
    ``len(ln.normalized_shape)`` dims), in float32/64."""
    xs = to_stat(x)
    nd = len(ln.normalized_shape)
    if tuple(xs.shape[xs.dim() - nd :]) != tuple(ln.normalized_shape):
        raise ValueError(
            f"input of shape {tuple(xs.shape)} does not end with normalized_shape "
            f"{tuple(ln.normalized_shape)}"
        )
    dims = list(range(xs.dim() - nd, xs.dim()))
    var, mean = torch.var_mean(xs, dim=dims, correction=0, keepdim=True)
    return (xs - mean) * torch.rsqrt(var + ln.eps)


def rmsnorm_normalized_input(norm: nn.Module, x: Tensor) -> Tensor:
    """``x / sqrt(mean(x^2) + eps)`` over the trailing normalised dims, as ``nn.RMSNorm``."""
    xs = to_stat(x)
    nd = len(tuple(getattr(norm, "normalized_shape", ())))
    eps_value = getattr(norm, "eps", None)
    eps = float(eps_value) if eps_value is not None else torch.finfo(x.dtype).eps
    dims = list(range(xs.dim() - nd, xs.dim()))
    return xs * torch.rsqrt(xs.square().mean(dim=dims, keepdim=True) + eps)


def normalized_from_output(
    y: Tensor, weight: Tensor, bias: Tensor | None, channel_dims: int | None = None
) -> Tensor | None:
    """``x_hat = (y - beta) / gamma`` recovered from an affine normalisation's OUTPUT ``y``.

    ``channel_dims=None``: BatchNorm, gamma/beta of shape ``(C,)`` act on dim 1 of ``y``;
    an int ``k``: LayerNorm/RMSNorm, gamma (and beta) have the shape of the trailing ``k``
    dims. Returns ``None`` (the caller re-normalises the input) where some
    ``|gamma| * ratio <= |beta|`` (including ``gamma == 0``), a parameter is not finite, or
    the output is half precision (see :data:`XHAT_FROM_OUTPUT_MAX_RATIO`). Float32/64.
    """
    if y.dtype not in (torch.float32, torch.float64):
        return None  # a bf16/fp16 output (autocast) has lost too many digits for this
    ys = to_stat(y)
    gamma = weight.detach().to(ys.dtype)
    beta = torch.zeros_like(gamma) if bias is None else bias.detach().to(ys.dtype)
    if not bool((gamma.abs() * XHAT_FROM_OUTPUT_MAX_RATIO > beta.abs()).all()):
        return None
    scale = torch.reciprocal(gamma)
    if not bool(torch.isfinite(scale).all() and torch.isfinite(beta).all()):
        return None
    shift = -beta * scale
    if channel_dims is None:
        shape = [1] * ys.dim()
        shape[1] = -1
        scale, shift = scale.reshape(shape), shift.reshape(shape)
    return torch.addcmul(shift, ys, scale)


def unitwise_sum(
    x_hat: Tensor,
    gy: Tensor,
    channel_dims: Sequence[int],
    sample_dim: int = 0,
    with_shift: bool = True,
) -> Tensor:
    """Sum over samples of ``v_i v_i^T`` per channel, shape ``(C, k, k)``.

    ``v_ic = (sum_p gy_ipc * x_hat_ipc, sum_p gy_ipc)`` (``k = 2``), or its first entry only
    (``with_shift=False``, ``k = 1``): for every sample ``i`` (index along ``sample_dim``)
    and channel ``c`` (a multi-index over ``channel_dims``, flattened in row-major order so
    that ``C = prod(shape[channel_dims])`` matches ``gamma.reshape(-1)``), the sums run over
    all remaining dims (the positions). BatchNorm: ``channel_dims=(1,)``; LayerNorm: the
    trailing normalised dims. Float32 (float64 for float64 input).
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
    dtype = torch.promote_types(stat_dtype(x_hat), stat_dtype(gy))
    g = gy.detach().to(dtype)
    xh = x_hat.detach().to(dtype)
    positions = [d for d in range(ndim) if d != s and d not in chans]
    parts = [g * xh, g] if with_shift else [g * xh]
    if positions:
        parts = [p.sum(dim=positions) for p in parts]
    # after the reduction the remaining dims keep their relative order; bring the sample
    # dim to the front and flatten the channel dims
    remaining = sorted([s, *chans])
    order = [remaining.index(s)] + [remaining.index(c) for c in sorted(chans)]
    n = x_hat.shape[s]
    v = torch.stack([p.permute(order).reshape(n, -1) for p in parts], dim=-1)
    return torch.einsum("nci,ncj->cij", v, v)


def unitwise_precondition(
    grad_gamma: Tensor, grad_beta: Tensor | None, f_inv: Tensor
) -> tuple[Tensor, Tensor | None]:
    """``[gamma'_c, beta'_c] = f_inv[c] @ [grad_gamma_c, grad_beta_c]`` for every channel
    (``f_inv`` of shape ``(C, k, k)``; ``k = 1`` without a shift). Batched; results in the
    promoted dtype of the inputs."""
    c = grad_gamma.numel()
    k = 1 if grad_beta is None else 2
    if tuple(f_inv.shape) != (c, k, k) or (grad_beta is not None and grad_beta.numel() != c):
        raise ValueError(
            f"shapes do not match: gamma {tuple(grad_gamma.shape)}, beta "
            f"{None if grad_beta is None else tuple(grad_beta.shape)}, F^-1 "
            f"{tuple(f_inv.shape)}"
        )
    dtype = torch.promote_types(grad_gamma.dtype, f_inv.dtype)
    cols = [grad_gamma.reshape(-1)] + ([] if grad_beta is None else [grad_beta.reshape(-1)])
    v = torch.stack([t.to(dtype) for t in cols], dim=-1)
    out = torch.einsum("cij,cj->ci", f_inv.to(dtype), v)
    gamma = out[:, 0].reshape(grad_gamma.shape)
    beta = None if grad_beta is None else out[:, 1].reshape(grad_beta.shape)
    return gamma, beta


class UnitwiseNormBlock(FisherBlock):
    """The affine parameters of one BatchNorm, LayerNorm or RMSNorm layer."""

    kind = BlockKind.NORM

    def __init__(self, name: str, module: nn.Module, sample_dim: int = 0) -> None:
        weight = module.weight
        bias = getattr(module, "bias", None)
        assert isinstance(weight, Tensor)
        assert bias is None or isinstance(bias, Tensor)
        slices = [ParamSlice(weight)] + ([] if bias is None else [ParamSlice(bias)])
        super().__init__(name, slices)
        self.module = module
        self.weight: Tensor = weight
        self.bias: Tensor | None = bias
        self.with_shift = bias is not None
        self.k = 2 if self.with_shift else 1
        self.channels = int(weight.numel())
        self.batchnorm = isinstance(module, _BatchNorm)
        #: trailing normalised dims (LayerNorm/RMSNorm); None for BatchNorm (channel dim 1)
        self.norm_ndim: int | None = (
            None if self.batchnorm else len(tuple(getattr(module, "normalized_shape", ())))
        )
        self.sample_dim = 0 if self.batchnorm else sample_dim

    @classmethod
    def claim(cls, name: str, module: nn.Module, sample_dim: int) -> Claim | Refusal | None:
        if isinstance(module, _BatchNorm):
            if not module.affine:
                return None  # no parameters
        elif isinstance(module, nn.LayerNorm) or (_RMSNorm and isinstance(module, _RMSNorm)):
            if getattr(module, "weight", None) is None:
                return None
        else:
            return None
        params = [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]
        if not all(isinstance(p, Tensor) and p.requires_grad for p in params):
            return Refusal("part of its parameters is frozen")
        block = cls(name, module, sample_dim)
        return Claim([block], [block])

    # ------------------------------------------------------------------ capture
    def install(self, recorder: Recorder) -> list[RemovableHandle]:
        return [self.module.register_forward_hook(partial(self._on_forward, recorder))]

    def functional_weights(self) -> Mapping[Tensor, LinearUser]:
        return {}

    def _x_hat(self, x: Tensor, output: Tensor) -> Tensor:
        module, nd = self.module, self.norm_ndim
        x_hat = normalized_from_output(output, self.weight, self.bias, nd)
        if x_hat is not None:
            return x_hat
        if isinstance(module, _BatchNorm):
            return batchnorm_normalized_input(module, x)
        if isinstance(module, nn.LayerNorm):
            return layernorm_normalized_input(module, x)
        return rmsnorm_normalized_input(module, x)

    def _on_forward(self, rec: Recorder, module: nn.Module, inputs: Any, output: Any) -> None:
        if not rec.recording() or not isinstance(output, Tensor):
            return
        x = inputs[0]
        sums = rec.sums(self.name)
        nd = self.norm_ndim
        batched = x.dim() > (nd if nd is not None else 1)
        sums.saw_samples(rec.micro, int(x.shape[self.sample_dim]) if batched else 1)
        if not (rec.wants(self.name, Factor.F) and output.requires_grad):
            return
        # from the output (one pass) while this hook runs before any in-place op on it
        x_hat = self._x_hat(x, output)
        if not batched:
            x_hat = x_hat.unsqueeze(0)
        channel_dims = (1,) if nd is None else tuple(range(x_hat.dim() - nd, x_hat.dim()))

        def hook(gy: Tensor) -> None:
            if rec.grads_now():
                g = gy.detach() if batched else gy.detach().unsqueeze(0)
                f = unitwise_sum(x_hat, g, channel_dims, self.sample_dim, self.with_shift)
                sums.add(Factor.F, f, int(x_hat.shape[self.sample_dim]))

        output.register_hook(hook)

    # ------------------------------------------------------------------ statistics
    def factors(self) -> tuple[Factor, ...]:
        return (Factor.F,)

    def layout(self, factor: Factor) -> tuple[tuple[int, ...], bool]:
        return (self.channels, self.k, self.k), True

    def cost(self) -> float:
        return float(4 * self.k * self.k * self.channels)

    # ------------------------------------------------------------------ inversion
    def inversion_inputs(
        self, stats: Mapping[Factor, Tensor], damping: float
    ) -> dict[str, tuple[Tensor, float | Tensor]]:
        return {"F": (stats[Factor.F], damping)}

    # ------------------------------------------------------------------ preconditioning
    def batch_key(self, inverses: Mapping[str, Tensor]) -> Hashable:
        f = inverses["F"]
        return ("norm", self.k, f.dtype, f.device)

    @classmethod
    def stack_inverses(
        cls, blocks: Sequence[FisherBlock], inverses: Sequence[Mapping[str, Tensor]]
    ) -> dict[str, Tensor]:
        return {"F": torch.cat([inv["F"] for inv in inverses])}

    @classmethod
    def precondition_group(
        cls,
        blocks: Sequence[FisherBlock],
        stacked: Mapping[str, Tensor],
        grads: Mapping[Tensor, Tensor],
    ) -> list[list[Tensor]]:
        norms = [b for b in blocks if isinstance(b, UnitwiseNormBlock)]
        f_inv = stacked["F"]
        gw = torch.cat([grads[b.slices[0].param].reshape(-1) for b in norms]).to(f_inv.dtype)
        gb = None
        if norms[0].with_shift:
            gb = torch.cat([grads[b.slices[1].param].reshape(-1) for b in norms])
            gb = gb.to(f_inv.dtype)
        pw, pb = unitwise_precondition(gw, gb, f_inv)
        sizes = [b.channels for b in norms]
        out: list[list[Tensor]] = []
        for k, (block, w) in enumerate(zip(norms, pw.split(sizes), strict=True)):
            parts = [w.reshape(block.slices[0].shape)]
            if pb is not None:
                parts.append(pb.split(sizes)[k].reshape(block.slices[1].shape))
            out.append(parts)
        return out
