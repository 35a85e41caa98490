"""One distributed curvature step of :class:`~bigbatch.curvature.engine.KFACEngine`.

Forward and backward are data-parallel (every rank holds the whole model and a shard of the
batch; each rank's loss is the MEAN over its own shard, as with DistributedDataParallel, so
the average of the ranks' gradients is the gradient of the global batch mean when the shards
have equal sizes). Per step, with ``W`` ranks:

1. every rank packs its local gradients and the due statistics of this step (nothing else:
   statistics not due are neither computed nor sent). Statistics are sent as their local
   value times a sample weight, with the weight (A and unit-wise F: samples; G: sample
   positions), so that the summed values divided by the summed weights are exactly the
   single-process statistic of the whole global batch. Symmetric matrices travel as one
   triangle. One extra element counts ranks with a non-finite local gradient, so that every
   rank takes the same skip decision without another collective.
2. ``"simple"``: one all-reduce of everything; every rank then refreshes, inverts and
   preconditions every block. ``"hybrid"``: a reduce-scatter delivers to each owner the sums
   for its own blocks (see :mod:`bigbatch.distributed.assignment`); the owner refreshes,
   inverts and preconditions them; one all-gather returns the preconditioned gradients,
   the new refresh intervals of the statistics it refreshed and its share of the KL-clip sum.

Every rank ends the step with identical parameters, momentum and refresh schedule; in
hybrid mode the statistics and inverses of a block live only on its owner (the engine's
``state_dict`` gathers them, so it is a collective there). Parameters outside any Fisher
block are owned by the least-loaded rank and passed through unpreconditioned.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from bigbatch.curvature.capture import Block
from bigbatch.distributed.assignment import assign_owners, block_cost, loads
from bigbatch.distributed.comm import (
    Communicator,
    pack_symmetric,
    symmetric_numel,
    unpack_symmetric,
)
from bigbatch.distributed.config import DistributedConfig

if TYPE_CHECKING:
    from bigbatch.curvature.engine import KFACEngine

__all__ = ["CurvatureSync", "SyncOutcome"]

KLTerms = Callable[[Mapping[Tensor, Tensor], Mapping[Tensor, Tensor]], float]


@dataclass
class SyncOutcome:
    """What one distributed step produced (identical on every rank)."""

    directions: dict[Tensor, Tensor] = field(default_factory=dict)
    grads: dict[Tensor, Tensor] = field(default_factory=dict)  # averaged; hybrid: owned only
    refreshed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    inverted: list[str] = field(default_factory=list)  # on this rank
    kl_total: float = 0.0
    nonfinite: bool = False  # some rank had a non-finite gradient: skip the step


def stat_layout(block: Block, stat: str) -> tuple[tuple[int, ...], bool]:
    """Shape of statistic ``stat`` of ``block`` and whether it is symmetric (sent as a triangle)."""
    kind = stat.rsplit(".", 1)[1]
    if kind == "F":
        return (block.params[0].numel(), 2, 2), True
    module = block.module
    if block.kind == "embedding" and isinstance(module, nn.Embedding):
        if kind == "A":
            return (module.num_embeddings,), False
        return (module.embedding_dim, module.embedding_dim), True
    out_dim = block.params[0].shape[0]
    in_dim = block.params[0].numel() // out_dim + (1 if len(block.params) == 2 else 0)
    n = in_dim if kind == "A" else out_dim
    return (n, n), True


def _packed_numel(shape: tuple[int, ...], symmetric: bool) -> int:
    if not symmetric:
        return math.prod(shape)
    return math.prod(shape[:-2]) * symmetric_numel(shape[-1])


class CurvatureSync:
    """Runs the distributed step for one engine (see the module docstring)."""

    def __init__(self, engine: KFACEngine, config: DistributedConfig) -> None:
        self.engine = engine
        self.config = config
        self.comm = Communicator(config.group)
        self.hybrid = config.mode == "hybrid"
        blocks = engine.blocks
        self.costs = {name: block_cost(b) for name, b in blocks.items()}
        world = self.comm.world_size
        self.owner = assign_owners(self.costs, world) if self.hybrid else dict.fromkeys(blocks, 0)
        load = loads(self.owner, self.costs, world)
        self.fallback_owner = min(range(world), key=lambda r: (load[r], r))
        self._param_owner: dict[Tensor, int] = {}
        for name, b in blocks.items():
            for p in b.params:
                self._param_owner[p] = self.owner[name]
        self.last_bytes: dict[str, int] = {}  # bytes this rank sent in the last step, by tag
        self.last_stat_bytes = 0  # the statistics' share of them (see _stat_share)

    @property
    def rank(self) -> int:
        return self.comm.rank

    def owns(self, block_name: str) -> bool:
        return not self.hybrid or self.owner[block_name] == self.rank

    def _owner_of(self, p: Tensor) -> int:
        return self._param_owner.get(p, self.fallback_owner)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(
        self,
        grads: Mapping[Tensor, Tensor],
        damping_of: Callable[[Block], float],
        kl_terms: KLTerms | None = None,
    ) -> SyncOutcome:
        engine, comm = self.engine, self.comm
        world = comm.world_size
        before = dict(comm.counter.bytes_sent)
        counts = engine.local_counts()
        captured = engine.capture.collect()
        armed = engine.capture.armed
        due = [(b, s) for b in engine.blocks.values() for s in b.stat_names if s in armed]
        params = list(grads)
        dtype = _buffer_dtype(params)
        device = params[0].device if params else torch.device("cpu")
        local_bad = 0.0 if _all_finite(list(grads.values())) else 1.0
        owners = range(world) if self.hybrid else range(1)
        owner_of_param = (lambda p: self._owner_of(p)) if self.hybrid else (lambda p: 0)
        owner_of_block = (lambda b: self.owner[b.name]) if self.hybrid else (lambda b: 0)
        seg_params = {k: [p for p in params if owner_of_param(p) == k] for k in owners}
        seg_stats = {k: [(b, s) for b, s in due if owner_of_block(b) == k] for k in owners}
        segments: list[Tensor] = []
        for k in owners:
            parts = [grads[p].reshape(-1).to(dtype) for p in seg_params[k]]
            for b, s in seg_stats[k]:
                shape, sym = stat_layout(b, s)
                n_samples, rows = counts.get(b.name, (0, 0))
                weight = float(rows if s.endswith(".G") else n_samples)
                value = captured.values.get(s)
                if value is None or weight == 0.0:
                    parts.append(
                        torch.zeros(_packed_numel(shape, sym) + 1, dtype=dtype, device=device)
                    )
                    continue
                value = value.to(device=device, dtype=dtype) * weight
                parts.append((pack_symmetric(value) if sym else value).reshape(-1))
                parts.append(torch.tensor([weight], dtype=dtype, device=device))
            parts.append(torch.tensor([local_bad], dtype=dtype, device=device))
            segments.append(torch.cat(parts))
        self.last_stat_bytes = self._stat_share(
            [sum(_packed_numel(*stat_layout(b, s)) + 1 for b, s in seg_stats[k]) for k in owners],
            torch.empty((), dtype=dtype).element_size(),
        )
        if self.hybrid:
            mine = self.comm.reduce_scatter(segments, "grads+stats")
            todo = self.rank
        else:
            flat = comm.all_reduce(segments[0], "grads+stats")
            mine, todo = flat, 0

        out = SyncOutcome()
        offset = 0
        for p in seg_params[todo]:
            n = p.numel()
            out.grads[p] = (mine[offset : offset + n] / world).reshape(p.shape).to(p.dtype)
            offset += n
        values: dict[str, Tensor] = {}
        missing: list[str] = []
        for b, s in seg_stats[todo]:
            shape, sym = stat_layout(b, s)
            n = _packed_numel(shape, sym)
            total, weight = mine[offset : offset + n], float(mine[offset + n])
            offset += n + 1
            if weight <= 0.0:
                missing.append(s)
                continue
            mean = total / weight
            value = unpack_symmetric(mean.reshape(*shape[:-2], -1), shape[-1]) if sym else mean
            values[s] = value.reshape(shape).to(_stat_dtype(b.params[0]))
        if float(mine[offset]) > 0.0:
            out.nonfinite = True
            self._record_bytes(before)
            return out

        report = engine.absorb(values, missing, damping_of, owned=self.owns)
        out.inverted = list(report.inverted)
        local_dirs = engine.precondition(out.grads)
        for p, g in out.grads.items():
            local_dirs.setdefault(p, g)
        kl_part = kl_terms(local_dirs, out.grads) if kl_terms is not None else 0.0
        if not self.hybrid:
            engine.schedule.record_step(len(report.refreshed))
            out.directions = local_dirs
            out.refreshed, out.missing = list(report.refreshed), list(report.missing)
            out.kl_total = kl_part
            self._record_bytes(before)
            return out

        # hybrid: gather the preconditioned gradients and the schedule decisions
        refreshed = set(report.refreshed)
        parts = [local_dirs[p].reshape(-1).to(dtype) for p in seg_params[todo]]
        decisions: list[float] = []
        for _, s in seg_stats[todo]:
            if s in refreshed:
                sched = engine.schedule
                decisions += [float(sched.intervals[s]), float(sched.measured[s])]
            else:
                decisions += [-1.0, -1.0]
        decisions.append(kl_part)
        parts.append(torch.tensor(decisions, dtype=torch.float64).to(dtype=dtype, device=device))
        payload = torch.cat(parts)
        sizes = [sum(p.numel() for p in seg_params[k]) + 2 * len(seg_stats[k]) + 1 for k in owners]
        gathered = comm.all_gather(payload, sizes, "directions")
        step = engine.step
        total_refreshed = 0
        for k, seg in zip(owners, gathered, strict=True):
            offset = 0
            for p in seg_params[k]:
                n = p.numel()
                out.directions[p] = seg[offset : offset + n].reshape(p.shape).to(p.dtype)
                offset += n
            tail = seg[offset:].double().tolist()
            for j, (_, s) in enumerate(seg_stats[k]):
                interval, measured = int(tail[2 * j]), int(tail[2 * j + 1])
                if interval < 0:
                    out.missing.append(s)
                    engine.schedule.next_due[s] = step + 1
                    continue
                out.refreshed.append(s)
                total_refreshed += 1
                engine.schedule.intervals[s] = interval
                engine.schedule.next_due[s] = step + interval
                engine.schedule.measured[s] = measured
            out.kl_total += tail[-1]
        engine.schedule.record_step(total_refreshed)
        self._record_bytes(before)
        return out

    def _stat_share(self, stat_numel: list[int], itemsize: int) -> int:
        """Bytes of statistics this rank sends this step under the byte model of
        :mod:`bigbatch.distributed.comm`: all-reduce ``2 (W-1)/W S``; per-owner reduce: the
        other owners' statistics (the padded NCCL reduce-scatter is counted the same way)."""
        world = self.comm.world_size
        if world == 1:
            return 0
        if not self.hybrid:
            return 2 * (world - 1) * stat_numel[0] * itemsize // world
        return sum(n for k, n in enumerate(stat_numel) if k != self.rank) * itemsize

    def _record_bytes(self, before: Mapping[str, int]) -> None:
        now = self.comm.counter.bytes_sent
        self.last_bytes = {k: v - before.get(k, 0) for k, v in now.items()}

    # ------------------------------------------------------------------ checkpoint
    def gather_state(self, local: dict[str, Any]) -> dict[str, Any]:
        """The full curvature state on every rank from each owner's share (a collective)."""
        if not self.hybrid or self.comm.world_size == 1:
            return local
        share = {
            "stats": local["stats"],
            "inverses": local["inverses"],
            "damping_used": local["damping_used"],
            "inverter": local["inverter"],
        }
        shares: list[Any] = [None] * self.comm.world_size
        dist.all_gather_object(shares, share, group=self.config.group)
        merged = dict(local)
        merged["stats"], merged["inverses"], merged["damping_used"] = {}, {}, {}
        merged["inverter"] = {"inverses": {}, "failures": {}}
        for sh in shares:
            merged["stats"].update(sh["stats"])
            merged["inverses"].update(sh["inverses"])
            merged["damping_used"].update(sh["damping_used"])
            merged["inverter"]["inverses"].update(sh["inverter"]["inverses"])
            merged["inverter"]["failures"].update(sh["inverter"]["failures"])
        return merged

    def owned_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """``state`` restricted to the blocks this rank owns (what it keeps after loading)."""
        if not self.hybrid:
            return dict(state)

        def keep(name: str) -> bool:
            block = name.rsplit(".", 1)[0] if name not in self.owner else name
            return block in self.owner and self.owns(block)

        out = dict(state)
        out["stats"] = {k: v for k, v in state["stats"].items() if keep(k)}
        out["inverses"] = {k: v for k, v in state["inverses"].items() if keep(k)}
        out["damping_used"] = {k: v for k, v in state["damping_used"].items() if keep(k)}
        inv = state["inverter"]
        out["inverter"] = {
            "inverses": {k: v for k, v in inv["inverses"].items() if keep(k)},
            "failures": {k: v for k, v in inv["failures"].items() if keep(k)},
        }
        return out


def _stat_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _buffer_dtype(params: list[Tensor]) -> torch.dtype:
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


def _all_finite(tensors: list[Tensor]) -> bool:
    if not tensors:
        return True
    norms = torch._foreach_norm(tensors)
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())
