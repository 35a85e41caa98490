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
        ({"smoothing": 1.0}, "smoothing"),
        ({"smoothing": -0.1}, "smoothing"),
    ],
)
def test_bad_config_is_named(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        StalenessConfig(**kwargs)  # type: ignore[arg-type]


def test_smoothed_statistic_is_the_mean_then_an_exponential_average() -> None:
    """With smoothing s the k-th measurement enters with weight max(1 - s, 1/k), and the
    interval follows the change of the average (not of the raw measurement)."""
    sched = RefreshSchedule(StalenessConfig(smoothing=0.75, threshold=0.1))
    sched.register(["a"])
    measurements = [torch.tensor([4.0, 0.0]), torch.tensor([0.0, 4.0]), torch.tensor([2.0, 2.0])]
    measurements += [torch.tensor([8.0, 0.0]), torch.tensor([0.0, 0.0])]
    value = None
    history = []
    for step, m in enumerate(measurements):
        old = value
        value, change = sched.absorb("a", step, m, old)
        history.append(value)
        if old is None:
            assert change is None
        else:
            assert change == pytest.approx(float((value - old).norm() / old.norm()))
    # mean of the first four (weights 1, 1/2, 1/3, 1/4), then weight 1 - 0.75 = 0.25
    torch.testing.assert_close(history[1], torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(history[2], torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(history[3], torch.tensor([3.5, 1.5]))
    torch.testing.assert_close(history[4], 0.75 * torch.tensor([3.5, 1.5]))
    assert sched.measured == {"a": 5}
    # noisy measurements of a fixed statistic: the raw rule keeps refreshing every step, the
    # smoothed rule lets the interval grow
    gen = torch.Generator().manual_seed(0)
    noisy = [torch.ones(50) + 0.5 * torch.randn(50, generator=gen) for _ in range(40)]
    for smoothing, grows in ((0.0, False), (0.9, True)):
        sched = RefreshSchedule(StalenessConfig(smoothing=smoothing))
        value = None
        for step, m in enumerate(noisy):
            value, _ = sched.absorb("a", step, m, value)
        assert (sched.intervals["a"] > 4) == grows
        if smoothing == 0.0:
            assert value is noisy[-1]  # the spec's literal rule: the raw measurement


def test_disabled_staleness_uses_the_raw_measurement() -> None:
    sched = RefreshSchedule(StalenessConfig(enabled=False))
    first, second = torch.ones(3), torch.full((3,), 3.0)
    value, _ = sched.absorb("a", 0, first, None)
    value, _ = sched.absorb("a", 1, second, value)
    assert value is second


def test_measurement_counts_round_trip() -> None:
    sched = RefreshSchedule()
    value, _ = sched.absorb("a", 0, torch.ones(2), None)
    sched.absorb("a", 1, torch.ones(2), value)
    copy = RefreshSchedule()
    copy.load_state_dict(sched.state_dict())
    assert copy.measured == {"a": 2}
    legacy = {k: v for k, v in sched.state_dict().items() if k != "measured"}
    copy.load_state_dict(legacy)  # checkpoints from before the running average
    assert copy.measured == {}
