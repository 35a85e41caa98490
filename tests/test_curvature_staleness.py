"""Stale-statistics scheduling: intervals grow while a statistic is stable, shrink otherwise."""

from __future__ import annotations

import pytest
import torch

from bigbatch.curvature.staleness import RefreshSchedule, StalenessConfig, relative_change


def test_relative_change_by_hand() -> None:
    old = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # norm 5
    new = old + torch.tensor([[0.0, 0.3], [0.4, 0.0]])  # diff norm 0.5
    assert relative_change(new, old) == pytest.approx(0.1)
    assert relative_change(new, None) is None
    assert relative_change(torch.zeros(2), torch.zeros(2)) == 0.0


def test_interval_doubles_when_similar_halves_when_not_and_respects_bounds() -> None:
    sched = RefreshSchedule(StalenessConfig(threshold=0.1, max_interval=8))
    sched.register(["a"])
    x = torch.ones(4)
    assert sched.due("a", 0)
    sched.update("a", 0, x, None)  # first value: no comparison, interval stays 1
    assert (sched.intervals["a"], sched.next_due["a"]) == (1, 1)
    step = 1
    for expected in (2, 4, 8, 8):
        assert sched.due("a", step)
        sched.update("a", step, x * 1.01, x)  # 1% change: similar
        assert sched.intervals["a"] == expected
        assert not sched.due("a", step + expected - 1)
        step += expected
    sched.update("a", step, x * 2.0, x)  # 100% change: halve
    assert sched.intervals["a"] == 4
    for _ in range(5):
        sched.update("a", step, x * 2.0, x)
    assert sched.intervals["a"] == 1  # never below min_interval


def test_disabled_staleness_refreshes_every_step() -> None:
    sched = RefreshSchedule(StalenessConfig(enabled=False))
    sched.register(["a", "b"])
    sched.update("a", 0, torch.ones(1), torch.ones(1))
    assert sched.due_names(1) == {"a", "b"}


def test_refresh_fraction_and_round_trip() -> None:
    sched = RefreshSchedule()
    sched.register(["a", "b"])
    sched.record_step(2)
    sched.record_step(1)
    assert sched.refresh_fraction == pytest.approx(3 / 4)
    copy = RefreshSchedule()
    copy.load_state_dict(sched.state_dict())
    assert copy.state_dict() == sched.state_dict()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"threshold": 0.0}, "threshold"),
        ({"min_interval": 0}, "min_interval"),
        ({"max_interval": 2, "min_interval": 4, "initial_interval": 4}, "min_interval"),
        ({"initial_interval": 100}, "initial_interval"),
    ],
)
def test_bad_config_is_named(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        StalenessConfig(**kwargs)  # type: ignore[arg-type]
