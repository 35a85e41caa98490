"""Stale statistics: when each curvature statistic is recomputed (SP-NGD's "practical" part).

Every statistic (each A, each G, each unit-wise block) has its own refresh interval. When a
statistic is refreshed it is compared with its previous value; if the relative change
``||X_new - X_old||_F / ||X_old||_F`` is below ``threshold`` the interval doubles (up to
``max_interval``), otherwise it halves (at least ``min_interval``). Between refreshes the
statistic is neither computed nor communicated and its last inverse is reused.

What is compared (``StalenessConfig.smoothing``): at small batches the batch-to-batch noise
of G and of the unit-wise blocks alone exceeds any useful threshold (at batch 128 on
ResNet-20 consecutive G's differ by 30-100%), so comparing raw measurements would refresh
them every step although their expectation hardly moves. By default (``smoothing=0.9``) a
statistic is therefore the running average of its measurements, as K-FAC keeps its
factors: the k-th measurement ``M_k`` enters as ``X_k = X_{k-1} + w_k (M_k - X_{k-1})`` with
``w_k = max(1 - smoothing, 1 / k)`` (the plain mean of the first ``1 / (1 - smoothing)``
measurements, then an exponential average over refreshes), and the rule above compares
``X_k`` with ``X_{k-1}``: the change of the estimate, in which the noise is averaged out
while a drift of the statistic still shows. ``smoothing=0`` is the literal rule of the spec
(docs/spngd.md: the statistic is the latest measurement, compared with the previous one).

This module only schedules (and averages); it does not know what a statistic is.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["RefreshSchedule", "StalenessConfig"]


@dataclass(frozen=True)
class StalenessConfig:
    """How refresh intervals adapt. ``enabled=False`` refreshes every statistic every step.

    Defaults (our choice, documented in docs/spngd.md): threshold 0.1, intervals doubling up
    to 32 and halving down to 1, starting at 1. ``smoothing`` (default 0.9, in ``[0, 1)``):
    a refreshed statistic is the running average of its measurements with weight
    ``max(1 - smoothing, 1 / k)`` for the k-th, and the change is that of the average (see the
    module docstring); ``0`` uses and compares the raw measurements (the spec's literal rule).
    Only with ``enabled=True``: disabled, every statistic is this step's measurement.
    """

    enabled: bool = True
    threshold: float = 0.1
    min_interval: int = 1
    max_interval: int = 32
    initial_interval: int = 1
    smoothing: float = 0.9

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"staleness enabled must be True or False, got {self.enabled!r}")
        if not (_real(self.threshold) and 0.0 < self.threshold <= 1e30):
            raise ValueError(
                f"staleness threshold must be a number in (0, 1e30], got {self.threshold!r}"
            )
        if not (_real(self.smoothing) and 0.0 <= self.smoothing < 1.0):
            raise ValueError(f"staleness smoothing must lie in [0, 1), got {self.smoothing!r}")
        for name in ("min_interval", "max_interval", "initial_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 2**30:
                raise ValueError(
                    f"staleness {name} must be an integer in [1, 2**30], got {value!r}"
                )
        if self.min_interval > self.max_interval:
            raise ValueError(
                f"staleness min_interval ({self.min_interval}) must be <= max_interval "
                f"({self.max_interval})"
            )
        if not self.min_interval <= self.initial_interval <= self.max_interval:
            raise ValueError(
                "staleness initial_interval must lie in [min_interval, max_interval], got "
                f"{self.initial_interval!r}"
            )


def _real(value: object) -> bool:
    """A finite int or float (not a bool)."""
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(float(value) if abs(value) < 1e308 else math.inf)
    )


@dataclass
class RefreshSchedule:
    """Per-statistic intervals and due steps, plus the refresh fraction actually achieved."""

    config: StalenessConfig = field(default_factory=StalenessConfig)
    intervals: dict[Hashable, int] = field(default_factory=dict)
    next_due: dict[Hashable, int] = field(default_factory=dict)
    refreshed: int = 0  # (statistic, step) pairs that were refreshed
    total: int = 0  # (statistic, step) pairs seen
    measured: dict[Hashable, int] = field(default_factory=dict)  # measurements in each average

    def register(self, names: Iterable[Hashable]) -> None:
        for name in names:
            self.intervals.setdefault(name, self.config.initial_interval)
            self.next_due.setdefault(name, 0)

    def due(self, name: Hashable, step: int) -> bool:
        return not self.config.enabled or step >= self.next_due.get(name, 0)

    def due_names(self, step: int) -> set[Hashable]:
        return {name for name in self.intervals if self.due(name, step)}

    def record_step(self, n_refreshed: int) -> None:
        self.refreshed += n_refreshed
        self.total += len(self.intervals)

    def absorb(
        self, name: Hashable, step: int, measured: Tensor, old: Tensor | None
    ) -> tuple[Tensor, float | None]:
        """Take in a fresh measurement of ``name`` at ``step``: ``(new value, change)``.

        The new value is the running average of the measurements (``old`` is the previous
        value) when staleness is enabled with ``smoothing > 0``, else ``measured`` itself;
        the interval then adapts to its change (:meth:`update`).
        """
        count = self.measured.get(name, 0) + 1 if old is not None else 1
        self.measured[name] = count
        value = measured
        if old is not None and self.config.enabled and self.config.smoothing > 0.0:
            weight = max(1.0 - self.config.smoothing, 1.0 / count)
            value = torch.lerp(old, measured.to(old.dtype), weight)
        return value, self.update(name, step, value, old)

    def update(self, name: Hashable, step: int, new: Tensor, old: Tensor | None) -> float | None:
        """Adapt ``name``'s interval after refreshing it at ``step``; returns the change."""
        change = relative_change(new, old)
        interval = self.intervals.get(name, self.config.initial_interval)
        if change is not None:
            if change < self.config.threshold:
                interval = min(2 * interval, self.config.max_interval)
            else:
                interval = max(interval // 2, self.config.min_interval)
        self.intervals[name] = interval
        self.next_due[name] = step + interval
        return change

    def retry(self, name: Hashable, step: int) -> None:
        """``name`` got no usable measurement at ``step``: due again at the next step."""
        self.next_due[name] = step + 1

    def adopt(self, name: Hashable, step: int, interval: int, measured: int) -> None:
        """Take a refresh decision made elsewhere (the owner rank of the statistic)."""
        self.intervals[name] = interval
        self.next_due[name] = step + interval
        self.measured[name] = measured

    @property
    def refresh_fraction(self) -> float:
        """Fraction of (statistic, step) pairs that were refreshed (1.0 before any step)."""
        return self.refreshed / self.total if self.total else 1.0

    def state_dict(self) -> dict[str, Any]:
        return {
            "intervals": dict(self.intervals),
            "next_due": dict(self.next_due),
            "refreshed": self.refreshed,
            "total": self.total,
            "measured": dict(self.measured),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.intervals = {k: int(v) for k, v in state["intervals"].items()}
        self.next_due = {k: int(v) for k, v in state["next_due"].items()}
        self.refreshed = int(state["refreshed"])
        self.total = int(state["total"])
        self.measured = {k: int(v) for k, v in state.get("measured", {}).items()}


def relative_change(new: Tensor, old: Tensor | None) -> float | None:
    """``||new - old||_F / ||old||_F``; ``None`` without a previous value, inf if old is 0."""
    if old is None:
        return None
    denom = float(torch.linalg.vector_norm(old))
    diff = float(torch.linalg.vector_norm(new - old))
    if denom == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / denom
