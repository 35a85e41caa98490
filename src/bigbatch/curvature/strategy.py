"""How a curvature step is carried out: on one process, or over ranks (one small interface).

A :class:`CurvatureStrategy` is bound to one :class:`~bigbatch.curvature.engine.KFACEngine`
and turns the step's gradients into preconditioned directions: it collects the window's
statistics, combines them where they must be combined, lets the engine absorb and invert
them, and preconditions. :class:`LocalCurvature` (the default) does all of it here; the
data-parallel strategies live in :mod:`bigbatch.distributed` and implement the same
interface (the shape of Distributed Shampoo's distributors). This package imports nothing
from there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from bigbatch.curvature.blocks.base import FisherBlock
from bigbatch.curvature.keys import StatKey

if TYPE_CHECKING:
    from bigbatch.curvature.engine import KFACEngine

__all__ = ["CurvatureStrategy", "KLTerms", "LocalCurvature", "RefreshReport", "StepOutcome"]

#: ``(directions, gradients) -> sum lr^2 (F^-1 g . g)`` over the parameters given
KLTerms = Callable[[Mapping[Tensor, Tensor], Mapping[Tensor, Tensor]], float]
DampingOf = Callable[[FisherBlock], float]


@dataclass
class RefreshReport:
    """What one refresh did."""

    refreshed: list[StatKey] = field(default_factory=list)  # statistics recomputed
    inverted: list[str] = field(default_factory=list)  # blocks re-inverted (on this rank)
    missing: list[StatKey] = field(default_factory=list)  # armed statistics with no data


@dataclass
class StepOutcome:
    """What one curvature step produced (identical on every rank)."""

    directions: dict[Tensor, Tensor] = field(default_factory=dict)
    grads: dict[Tensor, Tensor] = field(default_factory=dict)  # the (averaged) gradients
    report: RefreshReport = field(default_factory=RefreshReport)
    kl_total: float = 0.0
    nonfinite: bool = False  # a non-finite gradient somewhere: skip the step


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of every tensor is finite (one foreach norm, one sync)."""
    if not tensors:
        return True
    norms = torch._foreach_norm(tensors)
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


class CurvatureStrategy(ABC):
    """One way of running the curvature step of an engine."""

    engine: KFACEngine

    def bind(self, engine: KFACEngine) -> None:
        """Attach to ``engine`` (called once by the engine's constructor)."""
        self.engine = engine

    @abstractmethod
    def step(
        self,
        grads: Mapping[Tensor, Tensor],
        damping_of: DampingOf,
        kl_terms: KLTerms | None = None,
    ) -> StepOutcome:
        """Refresh, invert and precondition: every parameter in ``grads`` gets a direction
        (the gradient itself where no block is ready)."""

    def refresh(self, damping_of: DampingOf) -> RefreshReport:
        """Take in this step's statistics without preconditioning anything yet."""
        raise NotImplementedError(f"{type(self).__name__} has no separate refresh")

    def owns(self, block: str) -> bool:
        """Whether this rank keeps ``block``'s statistics and inverses."""
        return True

    def gather_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """The full engine state from this rank's share (a collective where sharded)."""
        return state


class LocalCurvature(CurvatureStrategy):
    """Everything on this process (the default)."""

    def refresh(self, damping_of: DampingOf) -> RefreshReport:
        engine = self.engine
        captured = engine.capture.collect()
        values = {k: v.value for k, v in captured.values.items()}
        report = engine.absorb(values, captured.missing, damping_of)
        engine.schedule.record_step(len(report.refreshed))
        return report

    def step(
        self,
        grads: Mapping[Tensor, Tensor],
        damping_of: DampingOf,
        kl_terms: KLTerms | None = None,
    ) -> StepOutcome:
        if not all_finite(list(grads.values())):
            return StepOutcome(grads=dict(grads), nonfinite=True)
        report = self.refresh(damping_of)
        directions = self.engine.precondition(grads)
        for p, g in grads.items():
            directions.setdefault(p, g)
        kl = kl_terms(directions, grads) if kl_terms is not None else 0.0
        return StepOutcome(directions, dict(grads), report, kl)
