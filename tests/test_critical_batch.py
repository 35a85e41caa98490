"""The critical batch size (20% over perfect linear scaling), against hand-computed cases."""

from __future__ import annotations

import math

import pytest

from bigbatch.train.critical_batch import critical_batch_size


def test_perfect_scaling_gives_a_lower_bound_at_the_largest_batch() -> None:
    cb = critical_batch_size([(1024, 800), (2048, 400), (4096, 200), (8192, 100)])
    assert cb.value == 8192
    assert cb.lower_bound
    assert cb.excess == pytest.approx((1.0, 1.0, 1.0, 1.0))


def test_crossing_is_interpolated_in_log_batch() -> None:
    # r = 1.0 at 1024, 1.1 at 2048, 1.5 at 4096: 1.2 is a quarter of the way in log2 B
    cb = critical_batch_size([(4096, 300), (1024, 800), (2048, 440)])
    assert cb.excess == pytest.approx((1.0, 1.1, 1.5))
    assert not cb.lower_bound
    assert cb.value == pytest.approx(2 ** (11 + 0.25))


def test_a_batch_that_misses_the_target_ends_the_line_at_the_previous_one() -> None:
    cb = critical_batch_size([(512, 1000), (2048, 260), (8192, None)])
    assert cb.value == 2048
    assert not cb.lower_bound
    assert math.isinf(cb.excess[2])


def test_nothing_is_known_when_the_smallest_batch_misses() -> None:
    cb = critical_batch_size([(512, None), (2048, 100)])
    assert cb.value is None
    assert not cb.lower_bound


@pytest.mark.parametrize(
    ("points", "match"),
    [([], "at least one"), ([(8, 1), (8, 2)], "distinct"), ([(0, 1)], "distinct and > 0")],
)
def test_bad_points_are_refused(points: list[tuple[int, int]], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        critical_batch_size(points)
