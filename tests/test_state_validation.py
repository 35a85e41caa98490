"""Bad state and bad input are refused with a message naming them, before anything changes:
damaged or foreign state dicts (the optimizer stays usable after the refusal), non-finite
updates, duplicate parameters, and hyperparameters of the wrong type or an absurd size."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bigbatch import NLCG, SPNGD, InversionConfig, KFACPreconditioner, StalenessConfig


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


X, Y = torch.randn(8, 4), torch.randint(0, 3, (8,))


def _step(model: nn.Module, opt: Any) -> None:
    opt.zero_grad()
    loss = F.cross_entropy(model(X), Y)
    loss.backward()
    if isinstance(opt, NLCG):
        opt.step(loss=loss)
    else:
        opt.step()


def _trained(make: Callable[[nn.Module], Any]) -> tuple[nn.Module, Any]:
    model = _model()
    opt = make(model)
    for _ in range(2):
        _step(model, opt)
    return model, opt


def _nlcg(model: nn.Module) -> NLCG:
    return NLCG(model.parameters(), lr=0.1, beta_rule="pr")


def _damage_nlcg(kind: str, state: dict[str, Any]) -> tuple[dict[str, Any], str]:
    first = state["state"][0]
    if kind == "nan-buffer":
        first["d"] = torch.full_like(first["d"], float("nan"))
        return state, "state 'd' of parameter 0 is not finite"
    if kind == "reshaped-buffer":
        first["d"] = first["d"].reshape(-1)
        return state, r"state 'd' of parameter 0 does not match its shape \(5, 4\)"
    if kind == "nan-lr":
        state["param_groups"][0]["lr"] = float("nan")
        return state, r"param_groups\[0\]: lr must be a finite number"
    if kind == "negative-lr":
        state["param_groups"][0]["lr"] = -1.0
        return state, r"param_groups\[0\]: lr must be"
    if kind == "string-lr":
        state["param_groups"][0]["lr"] = "0.1"
        return state, r"param_groups\[0\]: lr must be a real number"
    first["nlcg_global"]["config"]["beta_rule"] = "fr"
    return state, "saved with beta_rule='fr', this optimizer has beta_rule='pr'"


@pytest.mark.parametrize(
    "kind", ["nan-buffer", "reshaped-buffer", "nan-lr", "negative-lr", "string-lr", "beta-rule"]
)
def test_nlcg_refuses_damaged_state_and_stays_usable(kind: str) -> None:
    _, source = _trained(_nlcg)
    state, message = _damage_nlcg(kind, source.state_dict())
    model, opt = _trained(_nlcg)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(state)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    _step(model, opt)  # still usable: no KeyError, a normal step
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_nlcg_refuses_the_state_of_another_preconditioner() -> None:
    _, bfgs = _trained(_nlcg)
    model, adam = _trained(
        lambda m: NLCG(m.parameters(), lr=0.1, beta_rule="pr", preconditioner="adam")
    )
    with pytest.raises(ValueError, match=r"preconditioner='bfgs'|state 'exp_avg_sq'"):
        adam.load_state_dict(bfgs.state_dict())
    _step(model, adam)


@pytest.mark.parametrize("kind", ["nan-momentum", "reshaped-momentum", "string-lr"])
def test_spngd_refuses_damaged_state_and_stays_usable(kind: str) -> None:
    _, source = _trained(lambda m: SPNGD(m, lr=0.1))
    state = source.state_dict()
    if kind == "nan-momentum":
        state["state"][0]["momentum_buffer"].fill_(float("nan"))
        message = "momentum_buffer of parameter 0 is not finite"
    elif kind == "reshaped-momentum":
        state["state"][0]["momentum_buffer"] = state["state"][0]["momentum_buffer"].reshape(-1)
        message = r"momentum_buffer of parameter 0 has shape .*the parameter \(5, 4\)"
    else:
        state["param_groups"][0]["lr"] = "fast"
        message = r"param_groups\[0\]: lr must be a real number"
    model, opt = _trained(lambda m: SPNGD(m, lr=0.1))
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(state)
    _step(model, opt)
    assert opt.engine.step == 3


def test_nlcg_skips_an_update_that_would_overflow() -> None:
    """A finite gradient of 3e38 through K-FAC, or a weight decay of 1e21: the step is
    skipped (or never makes a weight non-finite); skipped_steps counts it."""
    model = _model()
    opt = NLCG(model.parameters(), lr=0.1, preconditioner=KFACPreconditioner(model, 1e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(3):
            opt.zero_grad()
            loss = F.cross_entropy(model(X), Y)
            loss.backward()
            if step == 1:
                model[0].weight.grad[0, 0] = 3e38
            opt.step(loss=loss)
    assert opt.skipped_steps == 1
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    model = _model()
    opt = NLCG(model.parameters(), lr=0.1, weight_decay=1e21)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(4):
            _step(model, opt)
            assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.mark.parametrize(
    "make",
    [
        lambda m: SPNGD(m, params=[m[0].weight, m[0].weight]),
        lambda m: NLCG([m[0].weight, m[0].weight]),
    ],
    ids=["spngd", "nlcg"],
)
def test_a_parameter_listed_twice_is_refused(make: Callable[[nn.Module], Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own duplicate warning
        with pytest.raises(ValueError, match="listed twice"):
            make(_model())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda m: SPNGD(m, inversion="eigh"), "inversion must be an InversionConfig"),
        (lambda m: SPNGD(m, inversion=0), "inversion must be an InversionConfig"),
        (lambda m: SPNGD(m, staleness="yes"), "staleness must be a bool or StalenessConfig"),
        (lambda m: KFACPreconditioner(m, staleness="no"), "staleness must be a bool"),
        (lambda m: NLCG(m.parameters(), restart_on_ascent="False"), "restart_on_ascent must be"),
        (lambda m: StalenessConfig(enabled="False"), "enabled must be True or False"),
        (lambda m: StalenessConfig(max_interval=10**40), r"max_interval must be an integer in"),
        (lambda m: SPNGD(m, lr=1e39), r"lr=1e\+39 is too large"),
        (lambda m: NLCG(m.parameters(), lr=1e300), r"lr=1e\+300 is too large"),
        (lambda m: NLCG(m.parameters(), step_control_period=10**30), "step_control_period"),
        (lambda m: SPNGD(m, precondition="no"), "precondition must be True or False"),
        (lambda m: InversionConfig(method="svd"), "method must be one of"),
    ],
)
def test_bad_hyperparameters_are_named(make: Callable[[nn.Module], Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make(_model())
