"""``NLCG(fused=True)`` takes the same steps as the unfused NLCG (float rounding aside), for
the fused preconditioners and for the configurations that fall back; a compiler failure
falls back with one warning and the same result."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import nn

from bigbatch import NLCG
from bigbatch.optim import fused_kernels


def _train(fused: bool, steps: int = 12, groups: bool = False, **options: Any) -> list[Any]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
    params: Any = model.parameters()
    if groups:
        params = [
            {"params": model[0].parameters()},
            {"params": model[2].parameters(), "lr": 0.02},
        ]
    opt = NLCG(params, lr=0.05, fused=fused, **options)
    data = torch.Generator().manual_seed(1)
    skipped = []
    for _ in range(steps):
        x = torch.randn(32, 12, generator=data)
        target = torch.randint(0, 3, (32,), generator=data)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step(loss=loss)
        skipped.append(getattr(opt.preconditioner, "last_update_skipped", None))
    return [[p.detach().clone() for p in model.parameters()], opt.state_dict(), skipped]


def _close(fused: list[Any], eager: list[Any]) -> None:
    for a, b in zip(fused[0], eager[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    state_f, state_e = fused[1]["state"], eager[1]["state"]
    for key in state_e:
        for name, value in state_e[key].items():
            if isinstance(value, torch.Tensor):
                scale = float(value.abs().max()) if value.numel() else 0.0
                torch.testing.assert_close(
                    state_f[key][name], value, rtol=1e-4, atol=1e-5 * scale + 1e-7
                )
    assert fused[2] == eager[2]  # the BFGS guard took the same decisions


@pytest.mark.parametrize("preconditioner", ["bfgs", "adam"])
@pytest.mark.parametrize("beta_rule", ["fr", "pr+"])
def test_fused_steps_equal_the_unfused_ones(preconditioner: str, beta_rule: str) -> None:
    fused = _train(True, preconditioner=preconditioner, beta_rule=beta_rule)
    eager = _train(False, preconditioner=preconditioner, beta_rule=beta_rule)
    _close(fused, eager)
    moved = _train(False, steps=0, preconditioner=preconditioner)[0]
    assert any(not torch.equal(a, b) for a, b in zip(fused[0], moved, strict=True))


@pytest.mark.parametrize(
    "options",
    [
        {"preconditioner": "bfgs", "beta_rule": "hs"},  # needs y itself
        {"preconditioner": "bfgs", "groups": True},  # two learning rates: s is not c * d
        {"preconditioner": "none"},
    ],
)
def test_configurations_without_a_fused_kernel_fall_back_exactly(options: dict[str, Any]) -> None:
    fused = _train(True, **options)
    eager = _train(False, **options)
    _close(fused, eager)


def test_a_failed_compilation_warns_once_and_runs_the_same_math(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        def fail(*a: Any) -> Any:
            raise RuntimeError("no C++ compiler found")

        return fail

    fused_kernels.reset_compilation()
    monkeypatch.setattr(torch, "compile", broken)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fused = _train(True, preconditioner="bfgs")
        said = [w for w in caught if "could not build the fused step" in str(w.message)]
        assert len(said) == 1
        assert "no C++ compiler found" in str(said[0].message)
    finally:
        fused_kernels.reset_compilation()
    _close(fused, _train(False, preconditioner="bfgs"))


def test_fused_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="fused must be True or False"):
        NLCG(nn.Linear(2, 2).parameters(), fused="yes")  # type: ignore[arg-type]
