"""The curvature engine: statistics -> refresh schedule -> damped inverses -> preconditioning.

One object per model, shared by :class:`bigbatch.SPNGD` and NLCG's K-FAC preconditioner.
Per step its owner calls :meth:`KFACEngine.run_step` (or :meth:`KFACEngine.refresh` and
later :meth:`KFACEngine.precondition`), which its :class:`~.strategy.CurvatureStrategy`
carries out (one process by default, or data-parallel ranks), and finally
:meth:`KFACEngine.advance` to arm the hooks for the next step.

Everything it keeps is keyed by block name and factor (statistics), or block name and
inverse slot (inverses), so it checkpoints exactly (nested plain dicts, readable with
``torch.load(weights_only=True)``) and can be partitioned across ranks by a strategy
without touching the math. It knows nothing about learning rates or momentum.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from bigbatch.curvature.blocks.base import FisherBlock
from bigbatch.curvature.blocks.embedding import EmbeddingBlock
from bigbatch.curvature.capture import CurvatureCapture
from bigbatch.curvature.keys import Factor, FisherType, KFACApprox, StatKey, nest, unnest
from bigbatch.curvature.linalg import DampedInverter, InversionConfig, InversionError
from bigbatch.curvature.staleness import RefreshSchedule, StalenessConfig
from bigbatch.curvature.strategy import (
    CurvatureStrategy,
    KLTerms,
    LocalCurvature,
    RefreshReport,
    StepOutcome,
)

__all__ = ["STATE_FORMAT", "KFACEngine", "ParsedState", "RefreshReport"]

#: version of :meth:`KFACEngine.state_dict`'s layout (bigbatch 0.2: keyed by block)
STATE_FORMAT = 2

DampingOf = Callable[[FisherBlock], float]


@dataclass
class ParsedState:
    """A validated curvature state, ready to replace the engine's (see ``parse_state``)."""

    step: int
    tied: set[str]
    stats: dict[StatKey, Tensor]
    inverses: dict[str, dict[str, Tensor]]
    damping_used: dict[str, float]
    schedule: RefreshSchedule
    inverter: DampedInverter


def _nest_slots(flat: Mapping[Hashable, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        assert isinstance(key, tuple)
        out.setdefault(str(key[0]), {})[str(key[1])] = value
    return out


def _unnest_slots(nested: Mapping[str, Mapping[str, Any]]) -> dict[Hashable, Any]:
    return {(block, slot): v for block, slots in nested.items() for slot, v in slots.items()}


class KFACEngine:
    """Fisher blocks of ``model`` with stale statistics and damped inverses.

    Args:
        model: the network whose supported layers become blocks (see
            :mod:`bigbatch.curvature.blocks.registry`).
        fisher: ``"empirical"`` or ``"mc"`` (see :class:`CurvatureCapture`).
        staleness: refresh-interval rule; ``StalenessConfig(enabled=False)`` refreshes
            every statistic every step.
        inversion: decomposition method and failure policy.
        strategy: how a step is carried out: ``None`` is :class:`~.strategy.LocalCurvature`
            (one process); a data-parallel strategy from :mod:`bigbatch.distributed`
            combines the ranks' statistics (its ``state_dict`` may then be a collective).
        kfac_approx: ``"expand"`` (default) or ``"reduce"`` for layers with weight sharing.
    """

    def __init__(
        self,
        model: nn.Module,
        fisher: FisherType = "empirical",
        staleness: StalenessConfig | None = None,
        inversion: InversionConfig | None = None,
        strategy: CurvatureStrategy | None = None,
        kfac_approx: KFACApprox = "expand",
    ) -> None:
        if strategy is not None and not isinstance(strategy, CurvatureStrategy):
            raise ValueError(f"strategy must be a CurvatureStrategy, got {strategy!r}")
        if staleness is not None and not isinstance(staleness, StalenessConfig):
            raise ValueError(f"staleness must be a StalenessConfig, got {staleness!r}")
        if inversion is not None and not isinstance(inversion, InversionConfig):
            raise ValueError(
                f"inversion must be an InversionConfig (e.g. InversionConfig(method='eigh')), "
                f"got {inversion!r}"
            )
        self.capture = CurvatureCapture(model, fisher, kfac_approx)
        self.schedule = RefreshSchedule(StalenessConfig() if staleness is None else staleness)
        self.schedule.register(self.capture.stat_keys())
        self.inverter: DampedInverter = DampedInverter(
            InversionConfig() if inversion is None else inversion
        )
        self.stats: dict[StatKey, Tensor] = {}
        self.inverses: dict[str, dict[str, Tensor]] = {}
        self.damping_used: dict[str, float] = {}
        self.step = 0
        self._warned_missing: set[str] = set()
        self._stack_cache: dict[Hashable, tuple[tuple[str, ...], dict[str, Tensor]]] = {}
        self._share_only = False
        self.strategy: CurvatureStrategy = strategy if strategy is not None else LocalCurvature()
        self.strategy.bind(self)
        self.capture.arm(self._due(0))

    @property
    def blocks(self) -> dict[str, FisherBlock]:
        return self.capture.blocks

    def statistics_due(self) -> bool:
        """Whether the current step records any statistic (so an MC backward is useful)."""
        return bool(self.capture.armed)

    def _due(self, step: int) -> set[StatKey]:
        return {k for k in self.capture.stat_keys() if self.schedule.due(k, step)}

    def block_stats(self, block: FisherBlock) -> dict[Any, Tensor]:
        """The current statistics of ``block`` by factor (those it has)."""
        return {
            f: self.stats[(block.name, f)] for f in block.factors() if (block.name, f) in self.stats
        }

    # ----------------------------------------------------------------- per step
    def run_step(
        self,
        grads: Mapping[Tensor, Tensor],
        damping_of: DampingOf,
        kl_terms: KLTerms | None = None,
    ) -> StepOutcome:
        """Refresh, invert and precondition ``grads`` through the strategy."""
        return self.strategy.step(grads, damping_of, kl_terms)

    def refresh(self, damping_of: DampingOf) -> RefreshReport:
        """Take in this step's statistics and re-invert what changed (no preconditioning)."""
        return self.strategy.refresh(damping_of)

    def absorb(
        self,
        values: Mapping[StatKey, Tensor],
        missing: list[StatKey],
        damping_of: DampingOf,
        owned: Callable[[str], bool] | None = None,
    ) -> RefreshReport:
        """Take in normalised statistics (this step's, of the whole batch) and re-invert.

        ``missing`` statistics are retried next step; only blocks for which ``owned(name)``
        holds (default: all) are re-inverted. Does not count the step in the refresh
        fraction (the strategy does, with the number refreshed over all ranks).
        """
        report = RefreshReport(missing=list(missing))
        for key, value in values.items():
            if not bool(torch.isfinite(value).all()):
                report.missing.append(key)
                continue
            value, _ = self.schedule.absorb(key, self.step, value, self.stats.get(key))
            self.stats[key] = value
            report.refreshed.append(key)
        for key in report.missing:
            self.schedule.retry(key, self.step)
        self._warn_missing(report.missing)
        fresh = {name for name, _ in report.refreshed}
        to_invert = [
            block
            for block in self.blocks.values()
            if (owned is None or owned(block.name))
            and all((block.name, f) in self.stats for f in block.factors())
            and (block.name in fresh or self.damping_used.get(block.name) != damping_of(block))
        ]
        self._invert(to_invert, damping_of)
        report.inverted = [b.name for b in to_invert]
        return report

    def advance(self, arm: bool = True) -> None:
        """Close the step: arm the hooks for the statistics due at the next one (and
        register statistics that appeared, such as a tied head seen for the first time);
        ``arm=False`` records nothing at the next step."""
        self.step += 1
        self.schedule.register(self.capture.stat_keys())
        self.capture.arm(self._due(self.step) if arm else ())

    def _invert(self, blocks: list[FisherBlock], damping_of: DampingOf) -> None:
        named: dict[Hashable, Tensor] = {}
        damping: dict[Hashable, float | Tensor] = {}
        inputs: dict[str, dict[str, tuple[Tensor, float | Tensor]]] = {}
        for block in blocks:
            inputs[block.name] = block.inversion_inputs(self.block_stats(block), damping_of(block))
            for slot, (mat, d) in inputs[block.name].items():
                named[(block.name, slot)] = mat
                damping[(block.name, slot)] = d
        results = self.inverter.invert(named, damping) if named else {}
        for block in blocks:
            lam = damping_of(block)
            inverted = {slot: results[(block.name, slot)] for slot in inputs[block.name]}
            try:
                self.inverses[block.name] = block.finish_inverse(
                    self.block_stats(block), lam, inverted
                )
            except InversionError as err:
                if block.name not in self.inverses:
                    raise
                warnings.warn(f"curvature: {err}; the previous inverse is kept", stacklevel=3)
            self.damping_used[block.name] = lam
        if blocks:
            names = {b.name for b in blocks}
            for key in [k for k, (members, _) in self._stack_cache.items() if names & set(members)]:
                del self._stack_cache[key]

    def _warn_missing(self, missing: list[StatKey]) -> None:
        for name, _ in missing:
            if name in self._warned_missing:
                continue
            self._warned_missing.add(name)
            block = self.blocks[name]
            warnings.warn(
                f"curvature: no statistics for {name!r} ({type(block).__name__}) this step: "
                "its hooks did not fire (unused in this forward, called outside the model's "
                "forward, or fisher='mc' without mc_backward). It keeps its previous inverse, "
                "or the plain gradient until it has one.",
                stacklevel=3,
            )

    # ----------------------------------------------------------------- preconditioning
    def ready(self, block: FisherBlock) -> bool:
        """Whether ``block`` has an inverse to precondition with."""
        return bool(self.inverses.get(block.name))

    def precondition(self, grads: Mapping[Tensor, Tensor]) -> dict[Tensor, Tensor]:
        """Natural-gradient directions ``F^-1 g`` for the parameters of ready blocks.

        ``grads`` maps parameters to gradients of their shape; parameters of blocks without
        inverses yet, or not in a block, are absent from the result (rows of a parameter
        whose block is not ready keep the gradient). Blocks of one batch key are
        preconditioned together (e.g. same-shaped Kronecker blocks in batched matmuls).
        """
        groups: dict[Hashable, list[FisherBlock]] = {}
        for block in self.blocks.values():
            if not self.ready(block) or any(s.param not in grads for s in block.slices):
                continue
            group = (type(block), block.batch_key(self.inverses[block.name]))
            groups.setdefault(group, []).append(block)
        out: dict[Tensor, Tensor] = {}
        partial: dict[Tensor, Tensor] = {}
        for key, members in groups.items():
            stacked = self._stacked(key, members)
            results = type(members[0]).precondition_group(members, stacked, grads)
            for block, parts in zip(members, results, strict=True):
                for piece, value in zip(block.slices, parts, strict=True):
                    p = piece.param
                    if piece.whole:
                        out[p] = value.to(grads[p].dtype)
                        continue
                    buf = partial.get(p)
                    if buf is None:
                        buf = partial[p] = grads[p].detach().clone()
                    piece.of(buf).copy_(value)
        out.update(partial)
        return out

    def _stacked(self, key: Hashable, blocks: list[FisherBlock]) -> dict[str, Tensor]:
        """A group's inverses as batches, cached until one of its blocks is re-inverted."""
        names = tuple(b.name for b in blocks)
        cached = self._stack_cache.get(key)
        if cached is None or cached[0] != names:
            inverses = [self.inverses[n] for n in names]
            cached = self._stack_cache[key] = (
                names,
                type(blocks[0]).stack_inverses(blocks, inverses),
            )
        return cached[1]

    # ----------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Everything the engine keeps, as nested plain dicts (see the module docstring).
        With a sharded strategy this is a collective that returns the full state (inside
        :meth:`share_only`: this rank's share, no collective)."""
        schedule = self.schedule.state_dict()
        inverter = self.inverter.state_dict()
        state = {
            "format": STATE_FORMAT,
            "step": self.step,
            "stats": nest({k: v.clone() for k, v in self.stats.items()}),
            "inverses": {
                b: {s: t.clone() for s, t in inv.items()} for b, inv in self.inverses.items()
            },
            "damping_used": dict(self.damping_used),
            "schedule": {
                "intervals": nest(schedule["intervals"]),
                "next_due": nest(schedule["next_due"]),
                "measured": nest(schedule["measured"]),
                "refreshed": schedule["refreshed"],
                "total": schedule["total"],
            },
            "inverter": {
                "inverses": _nest_slots(inverter["inverses"]),
                "failures": _nest_slots(inverter["failures"]),
            },
            "tied": sorted(
                b.name for b in self.blocks.values() if isinstance(b, EmbeddingBlock) and b.tied
            ),
        }
        return state if self._share_only else self.strategy.gather_state(state)

    @contextmanager
    def share_only(self) -> Iterator[None]:
        """Within it, :meth:`state_dict` returns this rank's share of a sharded state (the
        statistics and inverses of the blocks it owns) without a collective: what a sharded
        checkpoint (``torch.distributed.checkpoint``) writes from each rank."""
        before, self._share_only = self._share_only, True
        try:
            yield
        finally:
            self._share_only = before

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; validated before anything is replaced."""
        self.apply_state(self.parse_state(state))

    def parse_state(self, state: Mapping[str, Any]) -> ParsedState:
        """Validate a curvature state against this model without changing anything; a
        ``ValueError`` names what does not fit."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError(
                "curvature state has another layout (saved by bigbatch < 0.2?); it cannot be "
                "restored: start the optimizer's curvature afresh"
            )
        try:
            tied = {str(n) for n in state.get("tied", [])}
            stats = unnest(state["stats"], "stats")
            self._check_stats(stats, tied)
            sched = state["schedule"]
            schedule = RefreshSchedule(self.schedule.config)
            schedule.load_state_dict(
                {
                    "intervals": unnest(sched["intervals"], "schedule.intervals"),
                    "next_due": unnest(sched["next_due"], "schedule.next_due"),
                    "measured": unnest(sched["measured"], "schedule.measured"),
                    "refreshed": sched["refreshed"],
                    "total": sched["total"],
                }
            )
            owns = self.strategy.owns
            inverses = {b: dict(v) for b, v in state["inverses"].items() if owns(b)}
            for block, slots in inverses.items():
                if block not in self.blocks:
                    raise ValueError(f"curvature state has inverses of unknown block {block!r}")
                for slot, t in slots.items():
                    if not isinstance(t, Tensor) or not bool(torch.isfinite(t).all()):
                        raise ValueError(
                            f"curvature state: inverse {block!r}/{slot!r} is not a finite tensor"
                        )
            inverter = DampedInverter(self.inverter.config)
            inverter.load_state_dict(
                {
                    part: {
                        k: v
                        for k, v in _unnest_slots(state["inverter"][part]).items()
                        if owns(cast(tuple[str, str], k)[0])
                    }
                    for part in ("inverses", "failures")
                }
            )
            step = state["step"]
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(f"curvature state: step must be an int >= 0, got {step!r}")
            damping = {k: float(v) for k, v in state["damping_used"].items() if owns(k)}
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"curvature state is malformed: {exc!r}") from None
        return ParsedState(
            step=step,
            tied=tied,
            stats={k: v for k, v in stats.items() if owns(k[0])},
            inverses=inverses,
            damping_used=damping,
            schedule=schedule,
            inverter=inverter,
        )

    def apply_state(self, parsed: ParsedState) -> None:
        """Replace the engine's state by a :meth:`parse_state` result."""
        for name in parsed.tied:
            block = self.blocks.get(name)
            if isinstance(block, EmbeddingBlock):
                block.tied = True
        self.inverter = parsed.inverter
        self.schedule = parsed.schedule
        self.schedule.register(self.capture.stat_keys())
        self.step = parsed.step
        self.stats = {k: v.clone() for k, v in parsed.stats.items()}
        self.inverses = {
            b: {s: t.clone() for s, t in v.items()} for b, v in parsed.inverses.items()
        }
        self.damping_used = dict(parsed.damping_used)
        self._stack_cache.clear()
        self.capture.arm(self._due(self.step))

    def _check_stats(self, stats: Mapping[StatKey, Any], tied: set[str]) -> None:
        for (name, factor), value in stats.items():
            block = self.blocks.get(name)
            factors = () if block is None else block.factors()
            if isinstance(block, EmbeddingBlock) and name in tied:
                factors = (Factor.A, Factor.G, Factor.HEAD_A, Factor.HEAD_G)
            if block is None or factor not in factors:
                raise ValueError(
                    f"curvature state has statistic {factor.value!r} of unknown block {name!r} "
                    f"(this model's blocks: {sorted(self.blocks)[:8]}...)"
                )
            shape, _ = block.layout(factor)
            if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"curvature state: statistic {factor.value!r} of {name!r} has shape {got}, "
                    f"this model's is {shape} (saved from another model?)"
                )
            if not bool(torch.isfinite(value).all()):
                raise ValueError(
                    f"curvature state: statistic {factor.value!r} of {name!r} is not finite"
                )
