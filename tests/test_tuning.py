"""The tuning protocol's learning-rate search: it extends past an edge until the best is
interior, stops at its bound and says so, treats failed trials as the worst, and records
every trial."""

from __future__ import annotations

import math

import pytest

from bigbatch.train.tuning import search_lr, spread


def bowl(optimum: float, fail_above: float = math.inf):
    """A validation score peaking at ``optimum`` (log scale); NaN (diverged) above a rate."""
    calls: list[float] = []

    def trial(lr: float) -> tuple[float, str]:
        calls.append(lr)
        if lr > fail_above:
            return math.nan, f"diverged at {lr:g}"
        return -((math.log2(lr) - math.log2(optimum)) ** 2), f"run at {lr:g}"

    return trial, calls


def test_extends_upward_until_the_best_is_interior() -> None:
    trial, calls = bowl(optimum=0.8)
    search = search_lr([0.05, 0.1, 0.2], trial, higher_is_better=True, max_trials=10)
    assert search.best_lr == pytest.approx(0.8)
    assert search.bound_hit is None
    assert calls == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6])
    lrs = [lr for lr, _, _ in search.trials]
    assert lrs == sorted(lrs)
    assert search.best == "run at 0.8"


def test_extends_downward_and_lower_is_better() -> None:
    calls: list[float] = []

    def loss(lr: float) -> tuple[float, float]:
        calls.append(lr)
        return (math.log10(lr) + 3) ** 2, lr

    search = search_lr([0.1, 0.3], loss, higher_is_better=False, max_trials=8, factor=10)
    assert search.best_lr == pytest.approx(1e-3)
    assert search.bound_hit is None
    assert calls == pytest.approx([0.1, 0.3, 0.01, 1e-3, 1e-4])


def test_the_bound_is_reported_when_the_best_stays_at_an_edge() -> None:
    trial, calls = bowl(optimum=100.0)
    search = search_lr([0.1, 0.2, 0.4], trial, higher_is_better=True, max_trials=5)
    assert len(calls) == 5
    assert search.best_lr == pytest.approx(1.6)
    assert search.bound_hit == "high"


def test_diverged_trials_score_worst_and_turn_the_search_around() -> None:
    trial, _ = bowl(optimum=10.0, fail_above=0.5)
    search = search_lr([0.1, 0.2, 0.4], trial, higher_is_better=True, max_trials=6)
    # 0.8 diverges, so 0.4 (the highest that works) is interior to what was tried
    assert search.best_lr == pytest.approx(0.4)
    assert search.bound_hit is None
    assert math.isnan(search.trials[-1][1])


def test_everything_failing_searches_down_and_chooses_nothing() -> None:
    trial, calls = bowl(optimum=1.0, fail_above=0.0)
    search = search_lr([0.1, 0.2], trial, higher_is_better=True, max_trials=4)
    assert calls == pytest.approx([0.1, 0.2, 0.05, 0.025])
    assert search.best_lr is None
    assert search.best is None


def test_a_single_point_grid_searches_both_ways() -> None:
    trial, calls = bowl(optimum=0.25)
    search = search_lr([1.0], trial, higher_is_better=True, max_trials=6)
    assert calls == pytest.approx([1.0, 2.0, 0.5, 0.25, 0.125])
    assert search.best_lr == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("grid", "kwargs", "match"),
    [
        ([], {}, "grid must be learning rates"),
        ([0.1, -1.0], {}, "grid must be learning rates"),
        ([0.1], {"factor": 1.0}, "factor must be > 1"),
        ([0.1], {"max_trials": 0}, "max_trials must be >= 1"),
    ],
)
def test_bad_arguments_are_refused(grid: list[float], kwargs: dict, match: str) -> None:
    trial, _ = bowl(optimum=1.0)
    options = {"max_trials": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        search_lr(grid, trial, higher_is_better=True, **options)


def test_spread() -> None:
    s = spread([1.0, 2.0, 3.0, math.nan])
    assert s == {"n": 3, "mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0}
    assert spread([])["n"] == 0
