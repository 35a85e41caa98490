"""Data-parallel curvature: the distributed strategy of the curvature engine.

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

:class:`DistributedCurvature` implements :class:`~bigbatch.curvature.strategy.CurvatureStrategy`;
the layout of every statistic comes from its block (:meth:`FisherBlock.layout`), the owners'
balance from its cost, so a new block kind needs nothing here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from bigbatch.curvature.blocks.base import FactorValue
from bigbatch.curvature.keys import StatKey
from bigbatch.curvature.strategy import (
    CurvatureStrategy,
    DampingOf,
    KLTerms,
    RefreshReport,
    StepOutcome,
    all_finite,
)
from bigbatch.distributed.assignment import assign_owners, block_cost, loads
from bigbatch.distributed.comm import (
    Communicator,
    pack_symmetric,
    symmetric_numel,
    unpack_symmetric,
)
from bigbatch.distributed.config import DistributedConfig
from bigbatch.distributed.data_parallel import GradientAgreement

__all__ = ["DistributedCurvature"]


def _packed_numel(shape: tuple[int, ...], symmetric: bool) -> int:
    if not symmetric:
        return math.prod(shape)
    return math.prod(shape[:-2]) * symmetric_numel(shape[-1])


class DistributedCurvature(CurvatureStrategy):
    """Runs the distributed step for one engine (see the module docstring)."""

    def __init__(self, config: DistributedConfig, averaged: bool | None = None) -> None:
        """``averaged``: whether the gradients arrive averaged over the ranks already
        (``DistributedDataParallel``); ``None`` decides at the first step, by comparing a
        checksum of every rank's gradients (:class:`GradientAgreement`)."""
        if not isinstance(config, DistributedConfig):
            raise ValueError(f"distributed must be a DistributedConfig, got {config!r}")
        self.config = config
        self.comm = Communicator(config.group)
        self.hybrid = config.mode == "hybrid"
        self.agreement = GradientAgreement(config.group if config.group is not None else None)
        self.agreement.averaged = averaged
        self.last_bytes: dict[str, int] = {}  # bytes this rank sent in the last step, by tag
        self.last_stat_bytes = 0  # the statistics' share of them (see _stat_share)

    def bind(self, engine: Any) -> None:
        super().bind(engine)
        blocks = engine.blocks
        self.costs = {name: block_cost(b) for name, b in blocks.items()}
        world = self.comm.world_size
        # blocks covering rows of one parameter (attention's q/k/v) share an owner: the
        # owner receives the whole parameter's gradient
        groups = _parameter_groups(blocks)
        group_costs = {g: sum(self.costs[n] for n in members) for g, members in groups.items()}
        group_owner = assign_owners(group_costs, world) if self.hybrid else dict.fromkeys(groups, 0)
        self.owner = {n: group_owner[g] for g, members in groups.items() for n in members}
        load = loads(self.owner, self.costs, world)
        self.fallback_owner = min(range(world), key=lambda r: (load[r], r))
        self._param_owner: dict[Tensor, int] = {}
        for name, b in blocks.items():
            for p in b.params:
                self._param_owner.setdefault(p, self.owner[name])

    @property
    def rank(self) -> int:
        return self.comm.rank

    def owns(self, block: str) -> bool:
        return not self.hybrid or self.owner.get(block) == self.rank

    def _owner_of(self, p: Tensor) -> int:
        return self._param_owner.get(p, self.fallback_owner)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(
        self,
        grads: Mapping[Tensor, Tensor],
        damping_of: DampingOf,
        kl_terms: KLTerms | None = None,
    ) -> StepOutcome:
        engine, comm = self.engine, self.comm
        world = comm.world_size
        before = dict(comm.counter.bytes_sent)
        captured = engine.capture.collect()
        armed = engine.capture.armed
        blocks = engine.blocks
        due: list[StatKey] = [
            (b.name, f) for b in blocks.values() for f in b.factors() if (b.name, f) in armed
        ]
        params = list(grads)
        dtype = _buffer_dtype(params)
        device = params[0].device if params else torch.device("cpu")
        local_bad = 0.0 if all_finite(list(grads.values())) else 1.0
        averaged = self.agreement.decide(list(grads.values()))  # a collective at step 0
        owners = range(world) if self.hybrid else range(1)
        owner_of_param = (lambda p: self._owner_of(p)) if self.hybrid else (lambda p: 0)
        owner_of_block = (lambda name: self.owner[name]) if self.hybrid else (lambda name: 0)
        seg_params = {k: [p for p in params if owner_of_param(p) == k] for k in owners}
        seg_stats = {k: [key for key in due if owner_of_block(key[0]) == k] for k in owners}
        segments: list[Tensor] = []
        for k in owners:
            parts = [] if averaged else [grads[p].reshape(-1).to(dtype) for p in seg_params[k]]
            parts += self._pack(seg_stats[k], captured.values, dtype, device)
            parts.append(torch.tensor([local_bad], dtype=dtype, device=device))
            segments.append(torch.cat(parts))
        self.last_stat_bytes = self._stat_share(
            [
                sum(_packed_numel(*blocks[key[0]].layout(key[1])) + 1 for key in seg_stats[k])
                for k in owners
            ],
            torch.empty((), dtype=dtype).element_size(),
        )
        if self.hybrid:
            mine = self.comm.reduce_scatter(segments, "grads+stats")
            todo = self.rank
        else:
            mine, todo = comm.all_reduce(segments[0], "grads+stats"), 0

        out = StepOutcome()
        offset = 0
        for p in seg_params[todo]:
            if averaged:  # DDP did it: every rank holds the average
                out.grads[p] = grads[p]
                continue
            n = p.numel()
            out.grads[p] = (mine[offset : offset + n] / world).reshape(p.shape).to(p.dtype)
            offset += n
        values, missing, offset = self._unpack(seg_stats[todo], mine, offset)
        if float(mine[offset]) > 0.0:
            out.nonfinite = True
            self._record_bytes(before)
            return out

        report = engine.absorb(values, missing, damping_of, owned=self.owns)
        local_dirs = engine.precondition(out.grads)
        for p, g in out.grads.items():
            local_dirs.setdefault(p, g)
        kl_part = kl_terms(local_dirs, out.grads) if kl_terms is not None else 0.0
        if not self.hybrid:
            engine.schedule.record_step(len(report.refreshed))
            out.directions = local_dirs
            out.report = report
            out.kl_total = kl_part
            self._record_bytes(before)
            return out

        # hybrid: gather the preconditioned gradients and the schedule decisions
        refreshed = set(report.refreshed)
        sched = engine.schedule
        parts = [local_dirs[p].reshape(-1).to(dtype) for p in seg_params[todo]]
        decisions: list[float] = []
        for key in seg_stats[todo]:
            if key in refreshed:
                decisions += [float(sched.intervals[key]), float(sched.measured[key])]
            else:
                decisions += [-1.0, -1.0]
        decisions.append(kl_part)
        parts.append(torch.tensor(decisions, dtype=torch.float64).to(dtype=dtype, device=device))
        payload = torch.cat(parts)
        sizes = [sum(p.numel() for p in seg_params[k]) + 2 * len(seg_stats[k]) + 1 for k in owners]
        gathered = comm.all_gather(payload, sizes, "directions")
        step = engine.step
        total_refreshed = 0
        summary = RefreshReport(inverted=list(report.inverted))
        for k, seg in zip(owners, gathered, strict=True):
            offset = 0
            for p in seg_params[k]:
                n = p.numel()
                out.directions[p] = seg[offset : offset + n].reshape(p.shape).to(p.dtype)
                offset += n
            tail = seg[offset:].double().tolist()
            for j, key in enumerate(seg_stats[k]):
                interval, measured = int(tail[2 * j]), int(tail[2 * j + 1])
                if interval < 0:
                    summary.missing.append(key)
                    sched.retry(key, step)
                    continue
                summary.refreshed.append(key)
                total_refreshed += 1
                sched.adopt(key, step, interval, measured)
            out.kl_total += tail[-1]
        sched.record_step(total_refreshed)
        out.report = summary
        self._record_bytes(before)
        return out

    def _pack(
        self,
        keys: list[StatKey],
        values: Mapping[StatKey, FactorValue],
        dtype: torch.dtype,
        device: torch.device,
    ) -> list[Tensor]:
        """The due statistics as ``value * weight`` (symmetric ones as a triangle) and the
        weight, so that sums over ranks divided by summed weights are exact means."""
        parts: list[Tensor] = []
        blocks = self.engine.blocks
        for key in keys:
            shape, sym = blocks[key[0]].layout(key[1])
            entry = values.get(key)
            if entry is None or entry.weight == 0.0:
                parts.append(torch.zeros(_packed_numel(shape, sym) + 1, dtype=dtype, device=device))
                continue
            value = entry.value.to(device=device, dtype=dtype) * entry.weight
            parts.append((pack_symmetric(value) if sym else value).reshape(-1))
            parts.append(torch.tensor([entry.weight], dtype=dtype, device=device))
        return parts

    def _unpack(
        self, keys: list[StatKey], buf: Tensor, offset: int
    ) -> tuple[dict[StatKey, Tensor], list[StatKey], int]:
        """Inverse of :meth:`_pack` on the summed buffer: (means, missing, next offset)."""
        values: dict[StatKey, Tensor] = {}
        missing: list[StatKey] = []
        blocks = self.engine.blocks
        for key in keys:
            block = blocks[key[0]]
            shape, sym = block.layout(key[1])
            n = _packed_numel(shape, sym)
            total, weight = buf[offset : offset + n], float(buf[offset + n])
            offset += n + 1
            if weight <= 0.0:
                missing.append(key)
                continue
            mean = total / weight
            value = unpack_symmetric(mean.reshape(*shape[:-2], -1), shape[-1]) if sym else mean
            values[key] = value.reshape(shape).to(_stat_dtype(block.params[0]))
        return values, missing, offset

    @torch.no_grad()
    def refresh(self, damping_of: DampingOf) -> RefreshReport:
        """``"simple"`` mode without preconditioning (NLCG's K-FAC preconditioner): one
        all-reduce of the due statistics; every rank then refreshes and inverts every block.
        Each rank's statistics must come from the mean loss over its own shard."""
        if self.hybrid:
            raise RuntimeError("refresh() without a step is the simple mode's only")
        engine = self.engine
        before = dict(self.comm.counter.bytes_sent)
        captured = engine.capture.collect()
        armed = engine.capture.armed
        due: list[StatKey] = [
            (b.name, f) for b in engine.blocks.values() for f in b.factors() if (b.name, f) in armed
        ]
        params = [p for b in engine.blocks.values() for p in b.params]
        dtype = _buffer_dtype(params)
        device = params[0].device if params else torch.device("cpu")
        parts = self._pack(due, captured.values, dtype, device)
        numel = sum(_packed_numel(*engine.blocks[k[0]].layout(k[1])) + 1 for k in due)
        self.last_stat_bytes = self._stat_share(
            [numel], torch.empty((), dtype=dtype).element_size()
        )
        report = RefreshReport()
        if parts:
            summed = self.comm.all_reduce(torch.cat(parts), "stats")
            values, missing, _ = self._unpack(due, summed, 0)
            report = engine.absorb(values, missing, damping_of)
        engine.schedule.record_step(len(report.refreshed))
        self._record_bytes(before)
        return report

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
    def gather_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """The full curvature state on every rank from each owner's share (a collective)."""
        if not self.hybrid or self.comm.world_size == 1:
            return state
        share = {
            "stats": state["stats"],
            "inverses": state["inverses"],
            "damping_used": state["damping_used"],
            "inverter": state["inverter"],
        }
        shares: list[Any] = [None] * self.comm.world_size
        dist.all_gather_object(shares, share, group=self.config.group)
        merged = dict(state)
        merged["stats"], merged["inverses"], merged["damping_used"] = {}, {}, {}
        merged["inverter"] = {"inverses": {}, "failures": {}}
        for sh in shares:
            merged["stats"].update(sh["stats"])
            merged["inverses"].update(sh["inverses"])
            merged["damping_used"].update(sh["damping_used"])
            merged["inverter"]["inverses"].update(sh["inverter"]["inverses"])
            merged["inverter"]["failures"].update(sh["inverter"]["failures"])
        return merged


def _parameter_groups(blocks: Mapping[str, Any]) -> dict[str, list[str]]:
    """Blocks that share a parameter, grouped (named by their first block, in order)."""
    parent: dict[str, str] = {name: name for name in blocks}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    holder: dict[int, str] = {}
    for name, block in blocks.items():
        for p in block.params:
            other = holder.setdefault(id(p), name)
            if other != name:
                a, b = find(other), find(name)
                if a != b:
                    parent[b] = a
    groups: dict[str, list[str]] = {}
    for name in blocks:
        groups.setdefault(find(name), []).append(name)
    return groups


def _stat_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _buffer_dtype(params: list[Tensor]) -> torch.dtype:
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
