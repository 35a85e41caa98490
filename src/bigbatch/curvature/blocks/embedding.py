"""``nn.Embedding`` as a Fisher block with a diagonal ``A``, and its tied head.

An embedding of ``V`` rows and ``D`` columns is a linear map on one-hot inputs, so its
K-FAC factors are ``A = diag(index frequencies)`` (``V``, one entry per row; the padding
row counts zero: PyTorch never gives it a gradient) and a dense ``G`` (``D x D``), and its
preconditioned gradient is ``diag(A + d_a)^-1 W' (G + d_g I)^-1``.

A tied head (the same weight also used as a linear layer, ``logits = h W^T``: an
``nn.Linear`` holding the embedding's ``Parameter``, or ``F.linear(h, emb.weight)`` /
``h @ emb.weight.T`` in the forward) gives the weight a second Kronecker term in the same
``(V, D)`` orientation: ``HEAD_G (x) HEAD_A`` with ``HEAD_G`` over the logits' gradients
(``V x V``) and ``HEAD_A`` over the head's inputs (``D x D``). The block is then ONE block
whose curvature is the sum of both uses' terms (the cross-use terms are dropped, as K-FAC
drops cross-layer ones) and whose inverse is exact for that sum: with the embedding term
damped as for an untied embedding, ``P2 = diag(A) + d_a``, ``Q2 = G + d_g I``, and the head
term ``P1 (x) Q1`` added undamped, whitening by ``P2 (x) Q2`` and one eigendecomposition of
each whitened head factor give ``M^-1 X = T_V [(T_V^T X T_D) / (1 + alpha beta^T)] T_D^T``.
A head's own bias is not part of the block (it falls back). A functional head use seen
after construction turns the head term on from the next step.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from bigbatch.curvature.blocks.base import (
    Claim,
    FisherBlock,
    LinearUser,
    ParamSlice,
    Recorder,
    Refusal,
)
from bigbatch.curvature.blocks.kronecker import grad_sum, input_sum
from bigbatch.curvature.blocks.precision import autocast_off
from bigbatch.curvature.keys import BlockKind, Factor
from bigbatch.curvature.linalg import InversionError

__all__ = ["EmbeddingBlock", "embedding_input_sum", "two_term_inverse"]


def embedding_input_sum(idx: Tensor, num_embeddings: int, padding_idx: int | None = None) -> Tensor:
    """Counts of every index in ``idx`` (any shape), float32, shape ``(num_embeddings,)``:
    the diagonal of ``sum a a^T`` for one-hot ``a``. Counted in int64 (exact); the
    ``padding_idx`` row counts zero. An index out of range raises (as the lookup would)."""
    flat = idx.detach().reshape(-1).to(torch.long)
    counts = torch.zeros(num_embeddings, dtype=torch.long, device=flat.device)
    counts.index_add_(0, flat, torch.ones_like(flat))
    if padding_idx is not None:
        counts[padding_idx] = 0
    return counts.to(torch.float32)


def _pi_split(a_mean: float, g_mean: float, damping: float) -> tuple[float, float]:
    pi = math.sqrt(a_mean / g_mean) if a_mean > 0 and g_mean > 0 else 1.0
    if not (math.isfinite(pi) and pi > 0):
        pi = 1.0
    root = math.sqrt(damping)
    return pi * root, root / pi


def two_term_inverse(
    p1: Tensor, q1: Tensor, p2_diag: Tensor, q2: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(T_V, T_D, S)`` with ``(P1 (x) Q1 + diag(p2) (x) Q2)^-1 X = T_V [(T_V^T X T_D) * S]
    T_D^T`` for a ``(V, D)`` matrix ``X``; ``p2 > 0`` and ``Q2`` positive definite, ``P1``
    and ``Q1`` positive semi-definite. Computed in float64; raises ``ValueError`` on a
    non-finite result."""
    dt = torch.float64
    p1, q1, p2, q2 = (t.to(dt) for t in (p1, q1, p2_diag, q2))
    r = torch.rsqrt(p2)  # P2^-1/2, diagonal
    e, vecs = torch.linalg.eigh(0.5 * (q2 + q2.mT))
    k_inv = (vecs * torch.rsqrt(e.clamp_min(torch.finfo(dt).tiny))) @ vecs.mT  # Q2^-1/2
    p_white = r[:, None] * p1 * r[None, :]
    q_white = k_inv @ q1 @ k_inv
    alpha, u = torch.linalg.eigh(0.5 * (p_white + p_white.mT))
    beta, w = torch.linalg.eigh(0.5 * (q_white + q_white.mT))
    t_v = r[:, None] * u
    t_d = k_inv @ w
    s = 1.0 / (1.0 + alpha.clamp_min(0.0)[:, None] * beta.clamp_min(0.0)[None, :])
    if not all(bool(torch.isfinite(t).all()) for t in (t_v, t_d, s)):
        raise ValueError("the two-term inverse is not finite")
    return t_v, t_d, s


class EmbeddingBlock(FisherBlock):
    """The weight of one ``nn.Embedding``, with the head term of its tied uses."""

    kind = BlockKind.EMBEDDING

    def __init__(self, name: str, module: nn.Embedding, heads: Sequence[nn.Module] = ()) -> None:
        super().__init__(name, (ParamSlice(module.weight),))
        self.module = module
        self.heads = tuple(heads)
        self.tied = bool(self.heads)
        self.vocab, self.dim = int(module.num_embeddings), int(module.embedding_dim)

    @classmethod
    def claim(cls, name: str, module: nn.Module, sample_dim: int) -> Claim | Refusal | None:
        if not isinstance(module, nn.Embedding):
            return None
        if module.sparse:
            return Refusal("Embedding with sparse gradients")
        if not module.weight.requires_grad:
            return Refusal("its weight is frozen")
        block = cls(name, module)
        return Claim([block], [block])

    def tie(self, heads: Sequence[nn.Module]) -> None:
        """Add ``nn.Linear`` modules that hold this weight as head uses (before install)."""
        self.heads = self.heads + tuple(heads)
        self.tied = True

    # ------------------------------------------------------------------ capture
    def install(self, recorder: Recorder) -> list[RemovableHandle]:
        handles = [self.module.register_forward_hook(partial(self._on_forward, recorder))]
        for head in self.heads:  # their F.linear on this weight reaches on_linear
            handles.append(head.register_forward_pre_hook(lambda m, a: recorder.enter_functional()))
            handles.append(
                head.register_forward_hook(
                    lambda m, a, o: recorder.exit_functional(), always_call=True
                )
            )
        return handles

    def functional_weights(self) -> Mapping[Tensor, LinearUser]:
        return {self.module.weight: self}

    def _on_forward(self, rec: Recorder, module: nn.Module, inputs: Any, output: Any) -> None:
        if not rec.recording() or not isinstance(output, Tensor):
            return
        idx = inputs[0]
        sums = rec.sums(self.name)
        sums.saw_samples(rec.micro, int(idx.shape[0]) if idx.dim() >= 1 else 1)
        if rec.wants(self.name, Factor.A):
            counts = embedding_input_sum(idx, self.vocab, self.module.padding_idx)
            if self.module.weight.dtype == torch.float64:  # statistics follow G's precision
                counts = counts.double()
            sums.add(Factor.A, counts, idx.numel())
        if rec.wants(self.name, Factor.G) and output.requires_grad:

            def hook(gy: Tensor) -> None:
                if rec.grads_now():
                    total, rows = grad_sum(gy.detach(), "expand")
                    sums.add(Factor.G, total, rows)

            output.register_hook(hook)

    def on_linear(
        self, recorder: Recorder, x: Tensor, param: Tensor, start: int, stop: int, out: Tensor
    ) -> None:
        """A head use ``x W^T`` of this weight (``x`` batch-first, features last)."""
        if not self.tied:
            self.tied = True  # statistics from the next step on (the engine registers them)
            return
        rec = recorder
        if rec.wants(self.name, Factor.HEAD_A):
            total, rows = input_sum(x, False, rec.approx, 0)
            rec.sums(self.name).add(Factor.HEAD_A, total, rows)
        if rec.wants(self.name, Factor.HEAD_G) and out.requires_grad:
            sums, approx = rec.sums(self.name), rec.approx

            def hook(gy: Tensor) -> None:
                if rec.grads_now():
                    total, rows = grad_sum(gy.detach(), approx, 0)
                    sums.add(Factor.HEAD_G, total, rows)

            out.register_hook(hook)

    # ------------------------------------------------------------------ statistics
    def factors(self) -> tuple[Factor, ...]:
        if self.tied:
            return (Factor.A, Factor.G, Factor.HEAD_A, Factor.HEAD_G)
        return (Factor.A, Factor.G)

    def layout(self, factor: Factor) -> tuple[tuple[int, ...], bool]:
        if factor is Factor.A:
            return (self.vocab,), False
        if factor is Factor.HEAD_G:
            return (self.vocab, self.vocab), True
        return (self.dim, self.dim), True

    def cost(self) -> float:
        v, d = self.vocab, self.dim
        cost = float(d**3 + v * d * d + v)
        if self.tied:
            cost += float(v**3 + 2 * d**3 + 2 * v * d * (v + d))
        return cost

    # ------------------------------------------------------------------ inversion
    def _damping(self, stats: Mapping[Factor, Tensor], damping: float) -> tuple[float, float]:
        a, g = stats[Factor.A], stats[Factor.G]
        return _pi_split(float(a.mean()), float(torch.diagonal(g).mean()), damping)

    def inversion_inputs(
        self, stats: Mapping[Factor, Tensor], damping: float
    ) -> dict[str, tuple[Tensor, float | Tensor]]:
        if self.tied:
            return {}  # exact two-term inverse in finish_inverse
        _, dg = self._damping(stats, damping)
        return {"G": (stats[Factor.G], dg)}

    def finish_inverse(
        self, stats: Mapping[Factor, Tensor], damping: float, inverted: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        da, dg = self._damping(stats, damping)
        a = stats[Factor.A]
        if not self.tied:
            return {"A": 1.0 / (a + da), "G": inverted["G"]}
        g = stats[Factor.G]
        eye = torch.eye(self.dim, dtype=g.dtype, device=g.device)
        try:
            t_v, t_d, s = two_term_inverse(
                stats[Factor.HEAD_G], stats[Factor.HEAD_A], a + da, g + dg * eye
            )
        except (ValueError, RuntimeError) as err:
            raise InversionError({self.name: f"tied embedding: {err}"}) from err
        dtype = g.dtype
        return {"TV": t_v.to(dtype), "TD": t_d.to(dtype), "S": s.to(dtype)}

    # ------------------------------------------------------------------ preconditioning
    def batch_key(self, inverses: Mapping[str, Tensor]) -> Hashable:
        return ("embedding", id(self), "TV" in inverses)

    @classmethod
    def precondition_group(
        cls,
        blocks: Sequence[FisherBlock],
        stacked: Mapping[str, Tensor],
        grads: Mapping[Tensor, Tensor],
    ) -> list[list[Tensor]]:
        out: list[list[Tensor]] = []
        for k, block in enumerate(blocks):
            assert isinstance(block, EmbeddingBlock)
            grad = grads[block.module.weight]
            if "TV" in stacked:
                t_v, t_d, s = stacked["TV"][k], stacked["TD"][k], stacked["S"][k]
                x = grad.to(t_v.dtype)
                with autocast_off(x.device):
                    out.append([t_v @ ((t_v.mT @ x @ t_d) * s) @ t_d.mT])
                continue
            a_inv, g_inv = stacked["A"][k], stacked["G"][k]
            x = grad.to(g_inv.dtype)
            with autocast_off(x.device):
                out.append([(a_inv.unsqueeze(1) * x) @ g_inv])
        return out
