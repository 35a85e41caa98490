"""Tests of :mod:`bigbatch.train.schedules`: factors at known steps, computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from bigbatch.train.schedules import SCHEDULE_NAMES, lr_factor_fn


def test_names() -> None:
    assert SCHEDULE_NAMES == ("constant", "polynomial", "step", "cosine")


def test_constant_with_warmup() -> None:
    f = lr_factor_fn("constant", total_steps=10, warmup_steps=4)
    assert [f(s) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert f(100) == 1.0


def test_constant_without_warmup_is_one() -> None:
    f = lr_factor_fn("constant", total_steps=3)
    assert [f(0), f(1), f(2)] == [1.0, 1.0, 1.0]


def test_polynomial_hand_values() -> None:
    # W = 2, T = 10, D = 8, power 2: step s >= 2 -> (1 - (s - 2) / 8) ** 2.
    f = lr_factor_fn("polynomial", total_steps=10, warmup_steps=2, power=2.0)
    assert f(0) == pytest.approx(0.5)
    assert f(1) == pytest.approx(1.0)
    assert f(2) == pytest.approx(1.0)
    assert f(4) == pytest.approx(0.5625)  # (6/8)^2
    assert f(6) == pytest.approx(0.25)  # (4/8)^2
    assert f(9) == pytest.approx(1 / 64)  # last step: (1/8)^2
    assert f(10) == 0.0
    assert f(50) == 0.0


def test_polynomial_final_factor_and_power() -> None:
    # No warm-up, T = 4, power 3, final 0.1: 0.1 + 0.9 * (1 - s/4) ** 3.
    f = lr_factor_fn("polynomial", total_steps=4, power=3.0, final_factor=0.1)
    expected = [1.0, 0.1 + 0.9 * 27 / 64, 0.1 + 0.9 / 8, 0.1 + 0.9 / 64, 0.1]
    assert [f(s) for s in range(5)] == pytest.approx(expected)


def test_cosine_hand_values() -> None:
    # W = 2, T = 6, D = 4, final 0.2: 0.2 + 0.8 * (1 + cos(pi (s - 2) / 4)) / 2.
    f = lr_factor_fn("cosine", total_steps=6, warmup_steps=2, final_factor=0.2)
    assert f(0) == pytest.approx(0.5)
    assert f(2) == pytest.approx(1.0)
    assert f(3) == pytest.approx(0.2 + 0.4 * (1 + math.sqrt(0.5)))
    assert f(4) == pytest.approx(0.6)
    assert f(6) == pytest.approx(0.2)
    assert f(7) == pytest.approx(0.2)


def test_step_hand_values() -> None:
    # T = 10, milestones at 5 and 8 (0.75 * 10 = 7.5 rounds to 8), gamma 0.1, warm-up 2.
    f = lr_factor_fn("step", total_steps=10, warmup_steps=2)
    values = [f(s) for s in range(11)]
    expected = [0.5, 1, 1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01]
    assert values == pytest.approx(expected)


def test_step_milestone_inside_warmup_scales_ramp() -> None:
    f = lr_factor_fn("step", total_steps=10, warmup_steps=4, milestones=(0.2,), gamma=0.5)
    assert [f(s) for s in range(5)] == pytest.approx([0.25, 0.5, 0.375, 0.5, 0.5])


def test_warmup_equal_to_total_steps() -> None:
    f = lr_factor_fn("polynomial", total_steps=4, warmup_steps=4)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == 0.0


def test_with_lambda_lr() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_factor_fn("polynomial", total_steps=5, warmup_steps=1, power=1.0)
    )
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # Step 0 warm-up 1/1; then 1 - (s - 1)/4.
    assert lrs == pytest.approx([0.4, 0.4, 0.3, 0.2, 0.1])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"kind": "linear", "total_steps": 5}, "linear"),
        ({"kind": "constant", "total_steps": 0}, "total_steps"),
        ({"kind": "constant", "total_steps": 5, "warmup_steps": 6}, "warmup_steps"),
        ({"kind": "constant", "total_steps": 5, "warmup_steps": -1}, "warmup_steps"),
        ({"kind": "polynomial", "total_steps": 5, "power": 0.0}, "power"),
        ({"kind": "step", "total_steps": 5, "gamma": 0.0}, "gamma"),
        ({"kind": "cosine", "total_steps": 5, "final_factor": 1.5}, "final_factor"),
        ({"kind": "step", "total_steps": 5, "milestones": (0.7, 0.3)}, "milestones"),
        ({"kind": "step", "total_steps": 5, "milestones": (0.0,)}, "milestones"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        lr_factor_fn(**kwargs)  # type: ignore[arg-type]


def test_negative_step_rejected() -> None:
    f = lr_factor_fn("constant", total_steps=5)
    with pytest.raises(ValueError, match="step"):
        f(-1)
