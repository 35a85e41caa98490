"""Kronecker-factored blocks ``A (x) G``: what Linear, Conv2d and attention projections share.

The weight's gradient matrix ``W'`` (``(out, in [+ 1])``, the bias as the last column) is
preconditioned as ``G^-1 W' A^-1`` with pi-corrected damping (:func:`kron_damping`); blocks
whose inverses have the same shapes are preconditioned in one batched product.

Weight sharing (a layer applied at ``P`` positions of each sample: tokens of a sequence,
output pixels of a convolution) follows Eschenhagen et al. (2023):

- ``"expand"`` (the positions act as extra samples): ``A = sum_{n,p} a a^T / (N P)``,
  ``G = M sum_{n,p} gy gy^T``; exact for deep linear networks when every position has its
  own loss term (a language model);
- ``"reduce"`` (positions are reduced first): ``A = sum_n abar abar^T / N`` with ``abar``
  the mean input over the positions, ``G = M sum_n gsum gsum^T`` with ``gsum`` the output
  gradient summed over them; exact for deep linear networks when the positions are reduced
  before the loss (pooling), and cheaper (N rows instead of N P).

``M`` and the Monte Carlo variant are explained in :mod:`.base`. This module holds the
shared math; the kinds add how they are found and captured.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from bigbatch.curvature.blocks.base import FisherBlock, ParamSlice, Recorder
from bigbatch.curvature.blocks.precision import autocast_off, to_stat
from bigbatch.curvature.keys import Factor, KFACApprox
from bigbatch.curvature.linalg import kron_damping

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

__all__ = ["KroneckerBlock", "grad_sum", "gram_with_ones", "input_sum"]


def gram_with_ones(a: Tensor, has_bias: bool) -> Tensor:
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


def _positions(t: Tensor, sample_dim: int) -> list[int]:
    """The dims of a features-last tensor that are neither the sample dim nor the features."""
    return [d for d in range(t.dim() - 1) if d != sample_dim % t.dim()]


def input_sum(
    x: Tensor, has_bias: bool, approx: KFACApprox, sample_dim: int = 0
) -> tuple[Tensor, int]:
    """``(sum a a^T, rows)`` of a features-last layer input (``a = [x, 1]`` with a bias).

    ``"expand"``: over every sample and position (rows = N P); ``"reduce"``: over the
    samples of the input averaged over its positions (rows = N). A 1-D or 2-D input has no
    positions, so both agree. Float32 (float64 for float64 input).
    """
    a = to_stat(x)
    if a.dim() == 0:
        a = a.reshape(1, 1)
    d = a.shape[-1]
    with autocast_off(a.device):
        if approx == "expand" or a.dim() <= 2:
            rows = a.reshape(-1, d)
        else:
            rows = a.mean(dim=_positions(a, sample_dim))
        return gram_with_ones(rows, has_bias), int(rows.shape[0])


def grad_sum(gy: Tensor, approx: KFACApprox, sample_dim: int = 0) -> tuple[Tensor, int]:
    """``(sum g g^T, rows)`` of a features-last output gradient: over every sample and
    position (``"expand"``) or over samples of the gradient summed over positions."""
    g = to_stat(gy)
    if g.dim() == 0:
        g = g.reshape(1, 1)
    d = g.shape[-1]
    with autocast_off(g.device):
        if approx == "expand" or g.dim() <= 2:
            rows = g.reshape(-1, d)
        else:
            rows = g.sum(dim=_positions(g, sample_dim))
        return rows.T @ rows, int(rows.shape[0])


class KroneckerBlock(FisherBlock):
    """A weight (or rows of one) and its optional bias as one ``A (x) G`` block."""

    def __init__(self, name: str, weight: ParamSlice, bias: ParamSlice | None) -> None:
        super().__init__(name, (weight,) if bias is None else (weight, bias))
        self.weight = weight
        self.bias = bias
        self.out_dim = int(weight.shape[0])
        self.in_dim = int(weight.shape[1:].numel()) + (bias is not None)

    # ------------------------------------------------------------------ statistics
    def factors(self) -> tuple[Factor, ...]:
        return (Factor.A, Factor.G)

    def layout(self, factor: Factor) -> tuple[tuple[int, ...], bool]:
        n = self.in_dim if factor is Factor.A else self.out_dim
        return (n, n), True

    def cost(self) -> float:
        i, o = self.in_dim, self.out_dim
        return float(i**3 + o**3 + o * i * (i + o))

    def record_input(self, rec: Recorder, x: Tensor, sample_dim: int = 0) -> None:
        """Add this input's ``A`` sums when ``A`` is due."""
        if rec.wants(self.name, Factor.A):
            total, rows = input_sum(x, self.bias is not None, rec.approx, sample_dim)
            rec.sums(self.name).add(Factor.A, total, rows)

    def record_output(
        self, rec: Recorder, out: Tensor, sample_dim: int = 0
    ) -> RemovableHandle | None:
        """Hook ``out`` so its gradient adds to ``G`` when ``G`` is due."""
        if not (rec.wants(self.name, Factor.G) and out.requires_grad):
            return None
        sums, approx = rec.sums(self.name), rec.approx

        def hook(gy: Tensor) -> None:
            if rec.grads_now():
                total, rows = grad_sum(gy.detach(), approx, sample_dim)
                sums.add(Factor.G, total, rows)

        handle: RemovableHandle = out.register_hook(hook)
        return handle

    # ------------------------------------------------------------------ inversion
    def inversion_inputs(
        self, stats: Mapping[Factor, Tensor], damping: float
    ) -> dict[str, tuple[Tensor, float | Tensor]]:
        a, g = stats[Factor.A], stats[Factor.G]
        da, dg = kron_damping(a, g, damping)
        return {"A": (a, da), "G": (g, dg)}

    # ------------------------------------------------------------------ preconditioning
    def batch_key(self, inverses: Mapping[str, Tensor]) -> Hashable:
        a, g = inverses["A"], inverses["G"]
        return ("kron", tuple(a.shape), tuple(g.shape), a.dtype, a.device, len(self.slices))

    def grad_matrix(self, grads: Mapping[Tensor, Tensor]) -> Tensor:
        """``(out, in [+ 1])`` gradient matrix, the bias as the last column."""
        w = self.weight.of(grads[self.weight.param]).reshape(self.out_dim, -1)
        if self.bias is None:
            return w
        b = self.bias.of(grads[self.bias.param]).reshape(-1, 1)
        return torch.cat([w, b.to(w.dtype)], dim=1)

    def split_matrix(self, mat: Tensor) -> list[Tensor]:
        """Inverse of :meth:`grad_matrix`: one tensor per slice."""
        if self.bias is None:
            return [mat.reshape(self.weight.shape)]
        return [mat[:, :-1].reshape(self.weight.shape), mat[:, -1].reshape(self.bias.shape)]

    @classmethod
    def precondition_group(
        cls,
        blocks: Sequence[FisherBlock],
        stacked: Mapping[str, Tensor],
        grads: Mapping[Tensor, Tensor],
    ) -> list[list[Tensor]]:
        kron = [b for b in blocks if isinstance(b, KroneckerBlock)]
        a_inv, g_inv = stacked["A"], stacked["G"]
        mats = torch.stack([b.grad_matrix(grads).to(a_inv.dtype) for b in kron])
        with autocast_off(a_inv.device):
            pre = torch.matmul(torch.matmul(g_inv, mats), a_inv)
        return [b.split_matrix(m) for b, m in zip(kron, pre, strict=True)]
