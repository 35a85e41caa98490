"""The curvature engine: statistics -> refresh schedule -> damped inverses -> preconditioning.

One object per model, shared by :class:`bigbatch.SPNGD` and NLCG's K-FAC preconditioner.
Per step the owner calls :meth:`KFACEngine.refresh` (collect what the hooks recorded, adapt
the refresh intervals, re-invert the blocks whose statistics or damping changed) and then
:meth:`KFACEngine.precondition` on whatever gradients it wants preconditioned, and finally
:meth:`KFACEngine.advance` to arm the hooks for the next step.

Everything the engine keeps (statistics, inverses, intervals, counters) is a tensor or a
number keyed by statistic name, so it checkpoints exactly and is partitioned across ranks
with ``distributed=DistributedConfig(...)``: then :meth:`KFACEngine.distributed_step`
replaces ``refresh`` + ``precondition`` (see :mod:`bigbatch.distributed.kfac_sync`). It
knows nothing about learning rates or momentum.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from bigbatch.curvature import layers as L
from bigbatch.curvature.capture import Block, CurvatureCapture
from bigbatch.curvature.linalg import DampedInverter, InversionConfig, kron_damping
from bigbatch.curvature.staleness import RefreshSchedule, StalenessConfig
from bigbatch.distributed.config import DistributedConfig

if TYPE_CHECKING:
    from bigbatch.distributed.kfac_sync import CurvatureSync, KLTerms, SyncOutcome

__all__ = ["KFACEngine", "RefreshReport"]


@dataclass
class RefreshReport:
    """What one :meth:`KFACEngine.refresh` did."""

    refreshed: list[str] = field(default_factory=list)  # statistics recomputed
    inverted: list[str] = field(default_factory=list)  # blocks re-inverted
    missing: list[str] = field(default_factory=list)  # armed statistics with no data


class KFACEngine:
    """Fisher blocks of ``model`` with stale statistics and damped inverses.

    Args:
        model: the network whose supported layers become blocks.
        fisher: ``"empirical"`` or ``"mc"`` (see :class:`CurvatureCapture`).
        staleness: refresh-interval rule; ``StalenessConfig(enabled=False)`` refreshes
            every statistic every step.
        inversion: decomposition method and failure policy.
        distributed: ``None`` (default): one process. A :class:`DistributedConfig` (with an
            initialised ``torch.distributed`` group) makes :meth:`distributed_step` reduce
            gradients and due statistics over the ranks; in ``"hybrid"`` mode each block's
            statistics and inverses live on its owner rank only, and :meth:`state_dict`
            becomes a collective (call it on every rank).
    """

    def __init__(
        self,
        model: nn.Module,
        fisher: str = "empirical",
        staleness: StalenessConfig | None = None,
        inversion: InversionConfig | None = None,
        distributed: DistributedConfig | None = None,
    ) -> None:
        self.capture = CurvatureCapture(model, fisher)
        self.schedule = RefreshSchedule(staleness or StalenessConfig())
        self.schedule.register(self.capture.stat_names())
        self.inverter = DampedInverter(inversion or InversionConfig())
        self.stats: dict[str, Tensor] = {}
        self.inverses: dict[str, Tensor] = {}
        self.damping_used: dict[str, float] = {}
        self.step = 0
        self._warned_missing: set[str] = set()
        self._stack_cache: dict[tuple[Any, ...], tuple[tuple[str, ...], Tensor, Tensor]] = {}
        self.capture.arm(self.schedule.due_names(0))
        self.sync: CurvatureSync | None = None
        if distributed is not None:
            if not isinstance(distributed, DistributedConfig):
                raise ValueError(
                    f"distributed must be None or a DistributedConfig, got {distributed!r}"
                )
            from bigbatch.distributed.kfac_sync import CurvatureSync

            self.sync = CurvatureSync(self, distributed)

    @property
    def blocks(self) -> dict[str, Block]:
        return self.capture.blocks

    def statistics_due(self) -> bool:
        """Whether the current step records any statistic (so an MC backward is useful)."""
        return bool(self.capture.armed)

    # ----------------------------------------------------------------- per step
    def refresh(self, damping_of: Callable[[Block], float]) -> RefreshReport:
        """Take in this step's statistics and re-invert what changed."""
        if self.sync is not None:
            raise RuntimeError("a distributed KFACEngine steps with distributed_step()")
        captured = self.capture.collect()
        report = self.absorb(captured.values, captured.missing, damping_of)
        self.schedule.record_step(len(report.refreshed))
        return report

    def absorb(
        self,
        values: Mapping[str, Tensor],
        missing: list[str],
        damping_of: Callable[[Block], float],
        owned: Callable[[str], bool] | None = None,
    ) -> RefreshReport:
        """Take in normalised statistics (this step's, of the whole batch) and re-invert.

        ``missing`` statistics are retried next step; only blocks for which ``owned(name)``
        holds (default: all) are re-inverted. Does not count the step in the refresh
        fraction (the caller does, with the number refreshed over all ranks).
        """
        report = RefreshReport(missing=list(missing))
        for stat, value in values.items():
            if not bool(torch.isfinite(value).all()):
                report.missing.append(stat)
                continue
            value, _ = self.schedule.absorb(stat, self.step, value, self.stats.get(stat))
            self.stats[stat] = value
            report.refreshed.append(stat)
        for stat in report.missing:  # retry next step
            self.schedule.next_due[stat] = self.step + 1
        self._warn_missing(report.missing)
        fresh = {s.rsplit(".", 1)[0] for s in report.refreshed}
        to_invert = [
            block
            for block in self.blocks.values()
            if (owned is None or owned(block.name))
            and all(s in self.stats for s in block.stat_names)
            and (block.name in fresh or self.damping_used.get(block.name) != damping_of(block))
        ]
        self._invert(to_invert, damping_of)
        report.inverted = [b.name for b in to_invert]
        return report

    def local_counts(self) -> dict[str, tuple[int, int]]:
        """``(samples, sample-positions)`` each block recorded on this rank since arming.

        The weights that turn this rank's normalised statistics back into sums, so that a
        sum over ranks divided by the summed weights is the statistic of the global batch.
        """
        sums = self.capture._sums
        return {name: (s.n_samples, s.rows) for name, s in sums.items()}

    def distributed_step(
        self,
        grads: Mapping[Tensor, Tensor],
        damping_of: Callable[[Block], float],
        kl_terms: KLTerms | None = None,
    ) -> SyncOutcome:
        """Reduce, refresh, invert and precondition over the ranks (``distributed`` only).

        Every rank passes its local gradients (of the MEAN loss over its own shard); the
        result holds the preconditioned averaged gradient of every parameter in ``grads``
        (identity where no block is ready), identical on every rank.
        """
        if self.sync is None:
            raise RuntimeError("distributed_step needs KFACEngine(..., distributed=...)")
        return self.sync.step(grads, damping_of, kl_terms)

    def advance(self) -> None:
        """Close the step: arm the hooks for the statistics due at the next one."""
        self.step += 1
        self.capture.arm(self.schedule.due_names(self.step))

    def _invert(self, blocks: list[Block], damping_of: Callable[[Block], float]) -> None:
        named: dict[str, Tensor] = {}
        damping: dict[str, float | Tensor] = {}
        for block in blocks:
            lam = damping_of(block)
            if block.kind == "unitwise":
                stat = f"{block.name}.F"
                named[stat], damping[stat] = self.stats[stat], lam
                continue
            a, g = self.stats[f"{block.name}.A"], self.stats[f"{block.name}.G"]
            if block.kind == "embedding":  # diagonal A: its inverse is elementwise
                a_mean = a.mean()
                g_mean = torch.diagonal(g).mean()
                pi = float(torch.sqrt(a_mean / g_mean)) if a_mean > 0 and g_mean > 0 else 1.0
                da, dg = pi * lam**0.5, lam**0.5 / pi
                self.inverses[f"{block.name}.A"] = 1.0 / (a + da)
            else:
                da, dg = kron_damping(a, g, lam)
                named[f"{block.name}.A"], damping[f"{block.name}.A"] = a, da
            named[f"{block.name}.G"], damping[f"{block.name}.G"] = g, dg
        if named:
            self.inverses.update(self.inverter.invert(named, damping))
        if blocks:
            self._refresh_stacks({b.name for b in blocks})
        for block in blocks:
            self.damping_used[block.name] = damping_of(block)

    def _warn_missing(self, missing: list[str]) -> None:
        for stat in missing:
            block = stat.rsplit(".", 1)[0]
            if block in self._warned_missing:
                continue
            self._warned_missing.add(block)
            module = type(self.blocks[block].module).__name__
            warnings.warn(
                f"curvature: no statistics for {block!r} ({module}) this step: its hooks did "
                "not fire (called functionally, unused in this forward, or fisher='mc' "
                "without mc_backward). It keeps its previous inverse, or the plain gradient "
                "until it has one.",
                stacklevel=3,
            )

    # ----------------------------------------------------------------- preconditioning
    def ready(self, block: Block) -> bool:
        names = (
            block.stat_names if block.kind == "unitwise" else (f"{block.name}.A", f"{block.name}.G")
        )
        return all(n in self.inverses for n in names)

    def precondition(self, grads: Mapping[Tensor, Tensor]) -> dict[Tensor, Tensor]:
        """Natural-gradient directions ``F^-1 g`` for the parameters of ready blocks.

        ``grads`` maps parameters to gradients of their shape; parameters of blocks without
        inverses yet, or not in a block, are absent from the result. Kronecker blocks of the
        same shape are preconditioned together with batched matmuls.
        """
        out: dict[Tensor, Tensor] = {}
        same_shape: dict[tuple[Any, ...], list[Block]] = {}
        unitwise: dict[tuple[Any, ...], list[Block]] = {}
        for block in self.blocks.values():
            if not self.ready(block) or any(p not in grads for p in block.params):
                continue
            gs = [grads[p] for p in block.params]
            name = block.name
            if block.kind == "kron":
                a_inv, g_inv = self.inverses[f"{name}.A"], self.inverses[f"{name}.G"]
                key = (tuple(a_inv.shape), tuple(g_inv.shape), a_inv.dtype, len(gs))
                same_shape.setdefault(key, []).append(block)
                continue
            if block.kind == "embedding":
                pre = L.embedding_precondition(
                    gs[0].to(self.inverses[f"{name}.G"].dtype),
                    self.inverses[f"{name}.A"],
                    self.inverses[f"{name}.G"],
                )
                results = [pre]
            else:
                f_inv = self.inverses[f"{name}.F"]
                unitwise.setdefault(("F", f_inv.dtype, f_inv.device), []).append(block)
                continue
            for p, r in zip(block.params, results, strict=True):
                out[p] = r.to(grads[p].dtype)
        for key, blocks in unitwise.items():  # every unit-wise block in one batched product
            f_stack = self._stacked_unitwise(key, blocks)
            gw = torch.cat([grads[b.params[0]].reshape(-1) for b in blocks]).to(f_stack.dtype)
            gb = torch.cat([grads[b.params[1]].reshape(-1) for b in blocks]).to(f_stack.dtype)
            pw, pb = L.unitwise_precondition(gw, gb, f_stack)
            sizes = [b.params[0].numel() for b in blocks]
            for block, w, b in zip(blocks, pw.split(sizes), pb.split(sizes), strict=True):
                gamma, beta = block.params
                out[gamma] = w.reshape(grads[gamma].shape).to(grads[gamma].dtype)
                out[beta] = b.reshape(grads[beta].shape).to(grads[beta].dtype)
        for key, blocks in same_shape.items():
            a_stack, g_stack = self._stacked_inverses(key, blocks)
            mats = torch.stack(
                [_grad_matrix([grads[p] for p in b.params]).to(a_stack.dtype) for b in blocks]
            )
            pre = torch.matmul(torch.matmul(g_stack, mats), a_stack)
            for block, mat in zip(blocks, pre, strict=True):
                gs = [grads[p] for p in block.params]
                for p, r in zip(block.params, _split_matrix(mat, gs), strict=True):
                    out[p] = r.to(grads[p].dtype)
        return out

    def _stacked_inverses(self, key: tuple[Any, ...], blocks: list[Block]) -> tuple[Tensor, Tensor]:
        """A^-1 and G^-1 of same-shaped blocks as batches, cached until the next inversion."""
        names = tuple(b.name for b in blocks)
        cached = self._stack_cache.get(key)
        if cached is None or cached[0] != names:
            a = torch.stack([self.inverses[f"{n}.A"] for n in names])
            g = torch.stack([self.inverses[f"{n}.G"] for n in names])
            cached = self._stack_cache[key] = (names, a, g)
        return cached[1], cached[2]

    def _refresh_stacks(self, inverted: set[str]) -> None:
        """Bring the cached stacks up to date after ``inverted`` blocks got new inverses:
        their slices are overwritten in place (no re-stacking of the unchanged blocks)."""
        for key, (names, a, g) in list(self._stack_cache.items()):
            hit = [k for k, n in enumerate(names) if n in inverted]
            if not hit:
                continue
            if key[0] == "F":  # unit-wise: small, rebuilt on next use
                del self._stack_cache[key]
                continue
            for k in hit:
                new_a = self.inverses[f"{names[k]}.A"]
                new_g = self.inverses[f"{names[k]}.G"]
                if (new_a.shape, new_a.dtype, new_g.shape, new_g.dtype) != (
                    a[k].shape,
                    a.dtype,
                    g[k].shape,
                    g.dtype,
                ):
                    del self._stack_cache[key]
                    break
                a[k].copy_(new_a)
                g[k].copy_(new_g)

    def _stacked_unitwise(self, key: tuple[Any, ...], blocks: list[Block]) -> Tensor:
        """The (C, 2, 2) inverses of unit-wise blocks, concatenated and cached like
        :meth:`_stacked_inverses`."""
        names = tuple(b.name for b in blocks)
        cached = self._stack_cache.get(key)
        if cached is None or cached[0] != names:
            f = torch.cat([self.inverses[f"{n}.F"] for n in names])
            cached = self._stack_cache[key] = (names, f, f)
        return cached[1]

    # ----------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Everything the engine keeps. Hybrid-distributed: a collective that gathers every
        owner's blocks, so each rank returns the same full state (loadable at any world size)."""
        state = {
            "step": self.step,
            "stats": {k: v.clone() for k, v in self.stats.items()},
            "inverses": {k: v.clone() for k, v in self.inverses.items()},
            "damping_used": dict(self.damping_used),
            "schedule": self.schedule.state_dict(),
            "inverter": self.inverter.state_dict(),
        }
        return state if self.sync is None else self.sync.gather_state(state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        known = set(self.capture.stat_names())
        unknown = set(state["stats"]) - known
        if unknown:
            raise ValueError(
                f"curvature state has statistics for unknown blocks: {sorted(unknown)}"
            )
        if self.sync is not None:  # keep only the blocks this rank owns
            state = self.sync.owned_state(state)
        self.step = int(state["step"])
        self.stats = {k: v.clone() for k, v in state["stats"].items()}
        self.inverses = {k: v.clone() for k, v in state["inverses"].items()}
        self.damping_used = {k: float(v) for k, v in state["damping_used"].items()}
        self.schedule.load_state_dict(state["schedule"])
        self.inverter.load_state_dict(state["inverter"])
        self._stack_cache.clear()
        self.capture.arm(self.schedule.due_names(self.step))


def _grad_matrix(gs: list[Tensor]) -> Tensor:
    """(out, in*kh*kw [+1]) matrix of a Linear/Conv2d gradient, bias as the last column."""
    w = gs[0].reshape(gs[0].shape[0], -1)
    if len(gs) == 1:
        return w
    return torch.cat([w, gs[1].reshape(-1, 1).to(w.dtype)], dim=1)


def _split_matrix(mat: Tensor, gs: list[Tensor]) -> list[Tensor]:
    if len(gs) == 1:
        return [mat.reshape(gs[0].shape)]
    return [mat[:, :-1].reshape(gs[0].shape), mat[:, -1].reshape(gs[1].shape)]
