"""Mixed precision: ``torch.amp.GradScaler`` (the scale is removed from the gradients and from
the curvature statistics; an inf step the scaler skips is skipped and its statistics
dropped), fp16 and bf16 autocast, bf16 parameters (statistics and optimizer state stay
float32)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bigbatch import NLCG, SPNGD, KFACPreconditioner


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16),
        nn.LayerNorm(16),
        nn.Tanh(),
        nn.Linear(16, 16),
        nn.Tanh(),
        nn.Linear(16, 3),
    ).to(dtype)


def _batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(32, 6, generator=gen).to(dtype), torch.randint(0, 3, (32,), generator=gen)


def _optimizer(kind: str, model: nn.Module, **extra: Any) -> Any:
    if kind == "spngd":
        return SPNGD(model, lr=0.05, damping=1e-2, staleness=False, **extra)
    return NLCG(
        model.parameters(), lr=0.05, preconditioner=KFACPreconditioner(model, 1e-2, staleness=False)
    )


def _engine(opt: Any) -> Any:
    return opt.engine if isinstance(opt, SPNGD) else opt.preconditioner.engine


def _step(opt: Any, loss: Tensor) -> None:
    if isinstance(opt, NLCG):
        opt.step(loss=loss)
    else:
        opt.step()


def _run(kind: str, steps: list[int], scaler: Any = None, inf_at: int | None = None) -> Any:
    model = _model()
    opt = _optimizer(kind, model)
    for step in steps:
        x, y = _batch(step)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            _step(opt, loss)
            continue
        scaler.scale(loss).backward()
        if step == inf_at:
            model[0].weight.grad[0, 0] = float("inf")
        if isinstance(opt, NLCG):
            scaler.step(opt, loss=loss.detach())
        else:
            scaler.step(opt)
        scaler.update()
    return model, opt


@pytest.mark.parametrize("kind", ["spngd", "nlcg-kfac"])
def test_grad_scaler_changes_nothing_and_its_inf_steps_are_dropped(kind: str) -> None:
    """A power-of-two loss scale is exact: with the scaler the run equals the run without
    it, bit for bit; the step the scaler skips leaves no trace (its statistics dropped), so
    the run equals one that never saw that batch."""
    plain_model, plain = _run(kind, [0, 1, 2])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model, opt = _run(kind, [0, 1, 2], scaler)
    for p, q in zip(model.parameters(), plain_model.parameters(), strict=True):
        assert torch.equal(p, q)
    for key, value in _engine(plain).stats.items():
        assert torch.equal(_engine(opt).stats[key], value)

    skipped_model, _ = _run(kind, [0, 2])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    model, opt = _run(kind, [0, 1, 2], scaler, inf_at=1)
    assert scaler.get_scale() == 2.0**11  # the scaler saw the inf and backed off
    for p, q in zip(model.parameters(), skipped_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_unscaled_before_step_needs_the_scaler_for_the_statistics() -> None:
    """``scaler.unscale_(opt)`` then clipping then ``scaler.step(opt)``: SP-NGD needs the
    scaler to unscale its statistics, and says so; given it, the run equals the plain one."""
    plain_model, plain = _run("spngd", [0, 1])
    for given in (False, True):
        model = _model()
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        opt = SPNGD(
            model, lr=0.05, damping=1e-2, staleness=False, grad_scaler=scaler if given else None
        )
        for step in (0, 1):
            x, y = _batch(step)
            opt.zero_grad()
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)  # clips nothing here
            if not given:
                with pytest.raises(ValueError, match=r"pass SPNGD\(\.\.\., grad_scaler=scaler\)"):
                    scaler.step(opt)
                break
            scaler.step(opt)
            scaler.update()
        if given:
            for key, value in plain.engine.stats.items():
                torch.testing.assert_close(opt.engine.stats[key], value, rtol=1e-6, atol=0)
            for p, q in zip(model.parameters(), plain_model.parameters(), strict=True):
                torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_trains_with_float32_statistics(dtype: torch.dtype) -> None:
    model = _model()
    opt = SPNGD(model, lr=0.05, damping=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, enabled=dtype == torch.float16)
    losses = []
    for step in range(8):
        x, y = _batch(step % 2)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            loss = F.cross_entropy(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(v.dtype == torch.float32 for v in opt.engine.stats.values())
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_bfloat16_parameters_keep_float32_state() -> None:
    model = _model(torch.bfloat16)
    opt = SPNGD(model, lr=0.05, damping=1e-2)
    for step in range(4):
        x, y = _batch(step % 2, torch.bfloat16)
        opt.zero_grad()
        F.cross_entropy(model(x).float(), y).backward()
        opt.step()
    assert all(v.dtype == torch.float32 for v in opt.engine.stats.values())
    assert all(opt.state[p]["momentum_buffer"].dtype == torch.float32 for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
