"""Bad input to NLCG: clear errors naming the culprit, and NaN/Inf never reaching weights."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from bigbatch import NLCG, AdamDiagonal, DiagonalBFGS, StrongWolfe


def params() -> list[nn.Parameter]:
    return [nn.Parameter(torch.ones(3))]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": -0.1}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": "0.1"}, "lr"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"weight_decay": float("inf")}, "weight_decay"),
        ({"eps": -1.0}, "eps"),
        ({"beta_rule": "xx"}, "beta_rule"),
        ({"beta_clip": (1.0, 0.0)}, "beta_clip"),
        ({"beta_clip": (0.0,)}, "beta_clip"),
        ({"beta_clip": (0.0, float("nan"))}, r"beta_clip\[1\]"),
        ({"preconditioner": "kfac-ish"}, "preconditioner"),
        ({"preconditioner": 3}, "preconditioner"),
        ({"step_control": "sometimes"}, "step_control"),
        ({"step_control_period": 0}, "step_control_period"),
        ({"step_control_period": 2.5}, "step_control_period"),
        ({"step_control_threshold": 0.0}, "step_control_threshold"),
        ({"restart_every": 0}, "restart_every"),
        ({"lars_trust": 0.0}, "lars_trust"),
        ({"lars": "yes"}, "lars"),
        ({"decoupled_weight_decay": 1}, "decoupled_weight_decay"),
        ({"line_search": "armijo"}, "line_search"),
        ({"line_search": "strong_wolfe", "step_control": "step"}, "step_control"),
        ({"line_search": "strong_wolfe", "lars": True}, "lars"),
        ({"max_iter": 0}, "max_iter"),
        ({"tolerance_grad": -1.0}, "tolerance_grad"),
        ({"tolerance_change": -1.0}, "tolerance_change"),
        ({"nonfinite": "ignore"}, "nonfinite"),
    ],
)
def test_invalid_hyperparameter_is_named(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        NLCG(params(), **kwargs)


@pytest.mark.parametrize(
    ("factory", "name"),
    [
        (lambda: DiagonalBFGS(eps=-1.0), "eps"),
        (lambda: AdamDiagonal(beta2=1.0), "beta2"),
        (lambda: AdamDiagonal(eps=0.0), "eps"),
        (lambda: StrongWolfe(c1=0.0), "c1"),
        (lambda: StrongWolfe(c1=0.5, c2=0.4), "c2"),
        (lambda: StrongWolfe(max_evals=0), "max_evals"),
    ],
)
def test_invalid_component_hyperparameter_is_named(factory: Any, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        factory()


def test_bad_param_group_option_is_named() -> None:
    opt = NLCG(params())
    with pytest.raises(ValueError, match="weight_decay"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "weight_decay": -1.0})
    assert len(opt.param_groups) == 1  # the rejected group was not kept


def test_integer_tensor_and_empty_params_are_rejected() -> None:
    with pytest.raises(ValueError, match="floating-point"):
        NLCG([torch.ones(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="empty"):
        NLCG([])


def test_sparse_gradient_is_rejected() -> None:
    emb = nn.Embedding(10, 3, sparse=True)
    opt = NLCG(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.step(loss=1.0)


def test_closure_and_loss_together_is_an_error() -> None:
    opt = NLCG(params())
    with pytest.raises(ValueError, match="either closure or loss"):
        opt.step(lambda: torch.tensor(1.0), loss=1.0)


def test_line_search_needs_a_closure() -> None:
    opt = NLCG(params(), line_search="strong_wolfe")
    with pytest.raises(ValueError, match="closure"):
        opt.step()


def test_missing_loss_warns_once_and_still_steps() -> None:
    w = nn.Parameter(torch.ones(3))
    opt = NLCG([w], lr=0.1)
    w.grad = torch.ones(3)
    with pytest.warns(UserWarning, match="needs the loss"):
        opt.step()
    assert not torch.equal(w, torch.ones(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w.grad = torch.ones(3)
        opt.step()  # no second warning
        quiet = NLCG([w], step_control="off")
        quiet.step()


def snapshot(model: nn.Module, opt: NLCG) -> tuple[list[torch.Tensor], dict[str, Any]]:
    weights = [p.detach().clone() for p in model.parameters()]
    sd = opt.state_dict()
    # every buffer and scalar, except the counter that records the skip itself
    state = {
        f"{k}/{name}": (
            v.clone()
            if isinstance(v, torch.Tensor)
            else repr({a: b for a, b in v.items() if a != "skipped_steps"})
        )
        for k, entry in sd["state"].items()
        for name, v in entry.items()
    }
    return weights, state


def assert_unchanged(before: Any, after: Any) -> None:
    for a, b in zip(before[0], after[0], strict=True):
        assert torch.equal(a, b)
    assert before[1].keys() == after[1].keys()
    for key, value in before[1].items():
        other = after[1][key]
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other), key
        else:
            assert value == other, key


def two_good_steps() -> tuple[nn.Module, NLCG]:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = NLCG(model.parameters(), lr=0.1, beta_rule="pr")
    for _ in range(2):
        opt.zero_grad()
        loss = model(torch.randn(8, 4)).square().mean()
        loss.backward()
        opt.step(loss=loss)
    return model, opt


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradient_is_skipped_and_changes_nothing(bad: float) -> None:
    model, opt = two_good_steps()
    before = snapshot(model, opt)
    opt.zero_grad()
    loss = model(torch.randn(8, 4)).square().mean()
    loss.backward()
    model.weight.grad[0, 1] = bad
    with pytest.warns(UserWarning, match="non-finite gradient"):
        opt.step(loss=loss)
    assert_unchanged(before, snapshot(model, opt))
    assert opt.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_loss_is_skipped() -> None:
    model, opt = two_good_steps()
    before = snapshot(model, opt)
    opt.zero_grad()
    model(torch.randn(8, 4)).square().mean().backward()
    with pytest.warns(UserWarning, match="non-finite loss"):
        opt.step(loss=float("nan"))
    assert_unchanged(before, snapshot(model, opt))


def test_nonfinite_gradient_raises_when_asked_and_changes_nothing() -> None:
    model, opt = two_good_steps()
    opt.nonfinite = "raise"
    before = snapshot(model, opt)
    opt.zero_grad()
    model(torch.randn(8, 4)).square().mean().backward()
    model.bias.grad[0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step(loss=1.0)
    assert_unchanged(before, snapshot(model, opt))


def test_training_continues_after_a_skipped_step() -> None:
    model, opt = two_good_steps()
    opt.zero_grad()
    model(torch.randn(8, 4)).square().mean().backward()
    model.bias.grad[0] = float("nan")
    with pytest.warns(UserWarning, match="skipped"):
        opt.step(loss=1.0)
    opt.zero_grad()
    loss = model(torch.randn(8, 4)).square().mean()
    loss.backward()
    before = model.weight.detach().clone()
    opt.step(loss=loss)
    assert not torch.equal(before, model.weight)
    assert opt.state[model.weight]["nlcg_global"]["step"] == 3
