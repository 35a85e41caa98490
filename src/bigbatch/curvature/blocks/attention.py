"""``nn.MultiheadAttention``: one Kronecker block per projection (query, key, value, output).

MHA calls its projections functionally (``F.linear`` inside
``F.multi_head_attention_forward``), so module hooks on ``out_proj`` never fire and the
packed ``in_proj_weight`` is no module at all. The capture therefore watches the
``F.linear`` calls made on these weights while the module's forward runs (a
``__torch_function__`` mode, see :mod:`bigbatch.curvature.functional`), with the module's
batch size taken from a forward pre-hook. Why this design: it sees exactly the products
PyTorch computes, for every layout MHA has (packed self-attention, encoder-decoder with
packed key/value, separate ``q/k/v_proj_weight`` with other ``kdim``/``vdim``, masks,
``batch_first`` either way, unbatched input), without re-implementing attention; hooks on
the module alone cannot see the projections' output gradients.

The packed ``in_proj_weight`` gets three blocks, one per row range (query, key, value),
each with the input and output gradient of its own projection: the same blocks as a
hand-written attention with three ``nn.Linear`` projections of these weights (in
self-attention their ``A`` factors are equal; it is computed once). ``out_proj`` gets its
own block. ``bias_k``/``bias_v`` (``add_bias_kv=True``) have no block and fall back.
Inside MHA the projections' inputs are sequence-first: positions are the sequence, the
samples its batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from bigbatch.curvature.blocks.base import Claim, LinearUser, ParamSlice, Recorder, Refusal
from bigbatch.curvature.blocks.kronecker import KroneckerBlock, grad_sum, input_sum
from bigbatch.curvature.functional import AVAILABLE
from bigbatch.curvature.keys import BlockKind, Factor

__all__ = ["AttentionProjectionBlock", "MultiheadAttentionBlocks"]

ROLES = ("q", "k", "v")


class AttentionProjectionBlock(KroneckerBlock):
    """One projection of an ``nn.MultiheadAttention``: rows of ``in_proj_weight`` (or a
    ``*_proj_weight``) with their bias rows, or ``out_proj``."""

    kind = BlockKind.ATTENTION

    def __init__(self, name: str, role: str, weight: ParamSlice, bias: ParamSlice | None) -> None:
        super().__init__(name, weight, bias)
        self.role = role


class MultiheadAttentionBlocks:
    """Finds the projection blocks of one ``nn.MultiheadAttention`` and captures them."""

    def __init__(self, name: str, module: nn.MultiheadAttention) -> None:
        self.module = module
        self.blocks: list[AttentionProjectionBlock] = []
        self.unsupported: list[tuple[str, str]] = []
        e = module.embed_dim
        bias = module.in_proj_bias
        bias_ok = isinstance(bias, nn.Parameter) and bias.requires_grad
        # (weight parameter, first row, rows) -> block, for the F.linear calls
        self._ranges: dict[int, list[tuple[int, int, AttentionProjectionBlock]]] = {}
        if module._qkv_same_embed_dim:
            weights = [(module.in_proj_weight, k * e) for k in range(3)]
        else:
            weights = [
                (module.q_proj_weight, 0),
                (module.k_proj_weight, 0),
                (module.v_proj_weight, 0),
            ]
        for k, (role, (w, start)) in enumerate(zip(ROLES, weights, strict=True)):
            if not w.requires_grad:
                continue
            wslice = ParamSlice(w, start, start + e)
            bslice = ParamSlice(bias, k * e, (k + 1) * e) if bias_ok else None
            self._add(AttentionProjectionBlock(f"{name}.{role}", role, wslice, bslice), w, start)
        out = module.out_proj
        if out.weight.requires_grad:
            ob = out.bias if isinstance(out.bias, nn.Parameter) and out.bias.requires_grad else None
            block = AttentionProjectionBlock(
                f"{name}.out", "out", ParamSlice(out.weight), None if ob is None else ParamSlice(ob)
            )
            self._add(block, out.weight, 0)
        elif out.bias is not None and out.bias.requires_grad:
            self.unsupported.append((f"{name}.out_proj.bias", "its weight is frozen"))
        frozen_in = all(not w.requires_grad for w, _ in weights)
        if bias_ok and frozen_in:
            self.unsupported.append((f"{name}.in_proj_bias", "its weights are frozen"))
        for extra in ("bias_k", "bias_v"):
            p = getattr(module, extra, None)
            if isinstance(p, nn.Parameter) and p.requires_grad:
                self.unsupported.append(
                    (f"{name}.{extra}", "MultiheadAttention add_bias_kv has no Fisher block")
                )
        self._batch: list[int] = []  # batch size of each forward in progress

    def _add(self, block: AttentionProjectionBlock, weight: Tensor, start: int) -> None:
        self.blocks.append(block)
        self._ranges.setdefault(id(weight), []).append((start, start + block.out_dim, block))

    @classmethod
    def claim(cls, name: str, module: nn.Module, sample_dim: int) -> Claim | Refusal | None:
        if not isinstance(module, nn.MultiheadAttention):
            return None
        if not AVAILABLE:
            return Refusal("capturing MultiheadAttention needs torch.overrides.redispatch_function")
        found = cls(name, module)
        return Claim(list(found.blocks), [found], (module.out_proj,), tuple(found.unsupported))

    # ------------------------------------------------------------------ capture
    def install(self, recorder: Recorder) -> list[RemovableHandle]:
        def before(module: nn.Module, args: Any, kwargs: Any) -> None:
            query = args[0] if args else kwargs["query"]
            batched = query.dim() == 3
            first = self.module.batch_first
            self._batch.append(int(query.shape[0 if first else 1]) if batched else 1)
            recorder.enter_functional()

        def after(module: nn.Module, args: Any, output: Any) -> None:
            if self._batch:
                self._batch.pop()
            recorder.exit_functional()

        return [
            self.module.register_forward_pre_hook(before, with_kwargs=True),
            self.module.register_forward_hook(after, always_call=True),
        ]

    def functional_weights(self) -> Mapping[Tensor, LinearUser]:
        weights: dict[Tensor, LinearUser] = {}
        for block in self.blocks:
            weights[block.weight.param] = self
        return weights

    def on_linear(
        self, recorder: Recorder, x: Tensor, param: Tensor, start: int, stop: int, out: Tensor
    ) -> None:
        """``out = F.linear(x, param[start:stop], ...)`` inside this module's forward."""
        if not self._batch:
            return  # called outside the module's forward: not one of its projections
        rec = recorder
        n = self._batch[-1]
        blocks = [
            (s - start, e - start, b)
            for s, e, b in self._ranges.get(id(param), [])
            if start <= s and e <= stop
        ]
        if not blocks:
            return
        if x.dim() == 2:  # the output projection's input: (L * N, E) in (position, sample) order
            x = x.reshape(-1, n, x.shape[-1])
        shared = None
        for _, _, block in blocks:
            sums = rec.sums(block.name)
            sums.saw_samples(rec.micro, n)
            if rec.wants(block.name, Factor.A):
                if shared is None:
                    shared = input_sum(x, block.bias is not None, rec.approx, sample_dim=1)
                    total, rows = shared
                else:
                    total, rows = shared[0].clone(), shared[1]
                sums.add(Factor.A, total, rows)
        wanted = [(s, e, b) for s, e, b in blocks if rec.wants(b.name, Factor.G)]
        if not wanted or not out.requires_grad:
            return
        approx = rec.approx
        targets = [(s, e, rec.sums(b.name)) for s, e, b in wanted]

        def hook(gy: Tensor) -> None:
            if not rec.grads_now():
                return
            g = gy.detach()
            if g.dim() == 2:
                g = g.reshape(-1, n, g.shape[-1])
            for s, e, sums in targets:
                total, rows = grad_sum(g[..., s:e], approx, sample_dim=1)
                sums.add(Factor.G, total, rows)

        out.register_hook(hook)
