"""The tuning protocol: a log-spaced learning-rate search that extends past an edge until
its best is interior, under a bounded trial budget, the same for every optimizer.

:func:`search_lr` tries every rate of a starting grid, then, while the best (by a score
measured on validation data, never on test data) sits at the grid's lowest or highest
rate, tries one more rate a ``factor`` beyond that edge, until the best is interior or
``max_trials`` trials have run. A failed trial (diverged, non-finite score) scores worst.
The result says whether the search ended on its bound with the best still at an edge, so a
table can say so instead of presenting an edge as an optimum. Every trial is kept, for
sensitivity plots (score against learning rate). Used by ``bigbatch compare`` / ``sweep``
(``compare.max_trials``) and by the benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

__all__ = ["LRSearch", "search_lr", "spread"]

T = TypeVar("T")


@dataclass
class LRSearch(Generic[T]):
    """Every trial of one search (sorted by learning rate) and the chosen one."""

    trials: list[tuple[float, float, T]] = field(default_factory=list)  # (lr, score, result)
    best_lr: float | None = None
    #: "low" / "high": the budget ran out with the best still at that edge; None: interior
    #: (or nothing finished)
    bound_hit: Literal["low", "high"] | None = None

    @property
    def best(self) -> T | None:
        return next((r for lr, _, r in self.trials if lr == self.best_lr), None)


def search_lr(
    grid: Sequence[float],
    trial: Callable[[float], tuple[float, T]],
    *,
    higher_is_better: bool,
    max_trials: int,
    factor: float = 2.0,
) -> LRSearch[T]:
    """Run ``trial(lr) -> (score, result)`` over ``grid``, extended past an edge by
    ``factor`` while the best is there, up to ``max_trials`` trials in all (at least the
    grid). Non-finite scores count as the worst."""
    if not grid or any(not (lr > 0 and math.isfinite(lr)) for lr in grid):
        raise ValueError(f"search_lr: grid must be learning rates > 0, got {list(grid)}")
    if factor <= 1 or not math.isfinite(factor):
        raise ValueError(f"search_lr: factor must be > 1, got {factor}")
    if max_trials < 1:
        raise ValueError(f"search_lr: max_trials must be >= 1, got {max_trials}")
    sign = 1.0 if higher_is_better else -1.0
    done: dict[float, tuple[float, T]] = {}

    def key(lr: float) -> float:
        score = done[lr][0]
        return sign * score if math.isfinite(score) else -math.inf

    for lr in sorted(set(grid)):
        done[lr] = trial(lr)
    search: LRSearch[T] = LRSearch()
    while True:
        ordered = sorted(done)
        best = max(ordered, key=key)  # the lowest rate among ties
        at_edge: Literal["low", "high"] | None = None
        if len(ordered) == 1:  # one trial: go up if it worked, down if it failed
            at_edge = "high" if math.isfinite(key(best)) else "low"
        elif best == ordered[0]:
            at_edge = "low"
        elif best == ordered[-1]:
            at_edge = "high"
        if at_edge is None or len(done) >= max_trials:
            break
        nxt = ordered[0] / factor if at_edge == "low" else ordered[-1] * factor
        done[nxt] = trial(nxt)
    search.trials = [(lr, done[lr][0], done[lr][1]) for lr in sorted(done)]
    if math.isfinite(key(best)):
        search.best_lr = best
        search.bound_hit = at_edge
    return search


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation, min and max of finite ``values`` (and their count)."""
    finite = [v for v in values if math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return {"n": 0, "mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
    mean = sum(finite) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1)) if n > 1 else 0.0
    return {"n": n, "mean": mean, "std": std, "min": min(finite), "max": max(finite)}
