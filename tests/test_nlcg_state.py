"""NLCG as a torch.optim.Optimizer: checkpoints, schedulers, groups, precision."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from torch import nn

from bigbatch import NLCG, KFACPreconditioner


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)).to(
        dtype
    )


def make_batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(32, 8, generator=gen), torch.randint(0, 3, (32,), generator=gen))
        for _ in range(n)
    ]


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": 1e-3}, {"params": no_decay, "weight_decay": 0.0}]


def train(model: nn.Module, opt: NLCG, sched: Any, batches: list[Any]) -> None:
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step(loss=loss)
        sched.step()


OPTIONS = [
    {"beta_rule": "fr", "preconditioner": "bfgs"},
    {"beta_rule": "pr", "preconditioner": "adam", "step_control": "online"},
    {"beta_rule": "hs-dy", "preconditioner": "none", "restart_every": 4},
    {"beta_rule": "pr+", "preconditioner": "bfgs", "lars": True},
    {"beta_rule": "pr", "preconditioner": "kfac"},  # the curvature engine's state too
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_resume_equals_uninterrupted(options: dict[str, Any]) -> None:
    batches = make_batches(14)

    def fresh() -> tuple[nn.Module, NLCG, Any]:
        model = make_model()
        opts = dict(options)
        if opts["preconditioner"] == "kfac":
            opts["preconditioner"] = KFACPreconditioner(model, 1e-2)
        opt = NLCG(param_groups(model), lr=0.5, **opts)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
        return model, opt, sched

    model_a, opt_a, sched_a = fresh()
    train(model_a, opt_a, sched_a, batches)

    model_b, opt_b, sched_b = fresh()
    train(model_b, opt_b, sched_b, batches[:8])
    buf = io.BytesIO()
    torch.save(
        {"model": model_b.state_dict(), "opt": opt_b.state_dict(), "sched": sched_b.state_dict()},
        buf,
    )
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model_c, opt_c, sched_c = fresh()
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    sched_c.load_state_dict(ckpt["sched"])
    train(model_c, opt_c, sched_c, batches[8:])

    for pa, pc in zip(model_a.parameters(), model_c.parameters(), strict=True):
        assert torch.equal(pa, pc)
    sa, sc = opt_a.state_dict(), opt_c.state_dict()
    assert _same(sa["state"][0]["nlcg_global"], sc["state"][0]["nlcg_global"])
    for key, entry in sa["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, sc["state"][key][name]), (key, name)
    # the run was not trivial: the optimizer moved the weights
    assert not torch.equal(make_model().state_dict()["0.weight"], model_a[0].weight)


def _same(a: Any, b: Any) -> bool:
    """Equality of nested states holding tensors (bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def test_state_dict_holds_every_buffer_and_scalar() -> None:
    model = make_model()
    opt = NLCG(model.parameters(), beta_rule="pr", preconditioner="bfgs")
    train(model, opt, torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0), make_batches(3))
    state = opt.state_dict()["state"]
    assert set(state) == set(range(len(list(model.parameters()))))
    assert {"d", "g_prev", "z_prev", "h"} <= set(state[0])
    glob = state[0]["nlcg_global"]
    assert glob["step"] == 3
    assert {"rz_prev", "beta", "scales", "step_control", "restarts", "skipped_steps"} <= set(glob)
    assert set(glob["step_control"]) == {"base_lr", "loss_ema", "loss_ema_old", "seen_loss"}


def test_state_dict_is_a_snapshot_of_scalars_not_the_live_dict() -> None:
    model = make_model()
    opt = NLCG(model.parameters())
    train(model, opt, torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0), make_batches(2))
    sd = opt.state_dict()
    train(model, opt, torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0), make_batches(1))
    assert sd["state"][0]["nlcg_global"]["step"] == 2
    assert "step_control" not in opt.state[next(model.parameters())]["nlcg_global"]


def test_load_rejects_mismatched_state() -> None:
    model = make_model()
    opt = NLCG(model.parameters())
    train(model, opt, torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0), make_batches(1))
    sd = opt.state_dict()
    sd["state"][0]["d"] = torch.zeros(5)
    other = make_model(seed=5)
    target = NLCG(other.parameters())
    train(other, target, torch.optim.lr_scheduler.ConstantLR(target, factor=1.0), make_batches(2))
    before = {
        k: v.clone()
        for k, v in target.state[next(other.parameters())].items()
        if isinstance(v, torch.Tensor)
    }
    with pytest.raises(ValueError, match="'d' of parameter 0"):
        target.load_state_dict(sd)
    # nothing was lost: the optimizer keeps its own state and keeps training
    after = target.state[next(other.parameters())]
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    train(other, target, torch.optim.lr_scheduler.ConstantLR(target, factor=1.0), make_batches(1))
    good = opt.state_dict()
    del good["state"][0]["nlcg_global"]
    with pytest.raises(ValueError, match="nlcg_global"):
        NLCG(make_model().parameters()).load_state_dict(good)


def test_lr_scheduler_drives_the_step() -> None:
    w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = NLCG([w], lr=1.0, preconditioner="none", step_control="off", beta_clip=(0.0, 0.0))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5**k)
    steps = []
    for _ in range(3):
        before = w.detach().clone()
        w.grad = torch.ones(3, dtype=torch.float64)
        opt.step()
        sched.step()
        steps.append(float((before - w.detach())[0]))
    assert steps == pytest.approx([1.0, 0.5, 0.25])


def test_bfloat16_params_keep_float32_state_through_a_checkpoint() -> None:
    model = make_model(dtype=torch.bfloat16)
    opt = NLCG(model.parameters(), preconditioner="bfgs")
    batches = make_batches(3)
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x.bfloat16()), y)
        loss.backward()
        opt.step(loss=loss)
    p0 = next(model.parameters())
    assert p0.dtype == torch.bfloat16
    assert opt.state[p0]["d"].dtype == torch.float32
    assert opt.state[p0]["h"].dtype == torch.float32
    sd = opt.state_dict()
    restored = NLCG(model.parameters(), preconditioner="bfgs")
    restored.load_state_dict(sd)
    h_saved, h_loaded = sd["state"][0]["h"], restored.state[p0]["h"]
    assert h_loaded.dtype == torch.float32
    assert torch.equal(h_saved, h_loaded)  # not rounded through bfloat16
    assert not torch.equal(h_loaded, h_loaded.bfloat16().float())  # the check can fail


def test_param_without_grad_is_not_moved_and_counts_as_zero() -> None:
    a = nn.Parameter(torch.ones(2))
    b = nn.Parameter(torch.ones(2))
    opt = NLCG([a, b], lr=0.1, step_control="off", weight_decay=0.1, beta_rule="hs")
    a.grad = torch.ones(2)
    opt.step()
    assert torch.equal(b, torch.ones(2))
    assert not torch.equal(a, torch.ones(2))
    assert torch.equal(opt.state[b]["g_prev"], torch.zeros(2))


def test_decoupled_weight_decay_shrinks_weights() -> None:
    w = nn.Parameter(torch.full((4,), 2.0, dtype=torch.float64))
    opt = NLCG([w], lr=0.5, weight_decay=0.1, decoupled_weight_decay=True, step_control="off")
    w.grad = torch.zeros(4, dtype=torch.float64)
    opt.step()
    assert torch.allclose(w, torch.full((4,), 2.0 * (1 - 0.5 * 0.1), dtype=torch.float64))
    coupled = nn.Parameter(torch.full((4,), 2.0, dtype=torch.float64))
    opt2 = NLCG([coupled], lr=0.5, weight_decay=0.1, preconditioner="none", step_control="off")
    coupled.grad = torch.zeros(4, dtype=torch.float64)
    opt2.step()  # g = 0.1 * 2 = 0.2; first step d = -g: w = 2 - 0.5 * 0.2
    assert torch.allclose(coupled, torch.full((4,), 1.9, dtype=torch.float64))


def test_lars_scales_each_parameter_gradient() -> None:
    w1 = nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))  # |w| = 5
    w2 = nn.Parameter(torch.zeros(2, dtype=torch.float64))  # |w| = 0: scale 1
    opt = NLCG(
        [w1, w2],
        lr=1.0,
        lars=True,
        lars_trust=0.01,
        preconditioner="none",
        step_control="off",
        eps=0.0,
    )
    w1.grad = torch.tensor([0.0, 2.0], dtype=torch.float64)  # |g| = 2
    w2.grad = torch.tensor([1.0, 0.0], dtype=torch.float64)
    opt.step()
    scale = 0.01 * 5.0 / (2.0 + 0.1 * 0.01 * 5.0)
    torch.testing.assert_close(w1.detach(), torch.tensor([3.0, 4.0 - 2.0 * scale]).double())
    torch.testing.assert_close(w2.detach(), torch.tensor([-1.0, 0.0]).double())


def test_add_param_group_after_steps_keeps_state_and_restarts() -> None:
    a = nn.Parameter(torch.ones(3))
    opt = NLCG([a], lr=0.1, step_control="off")
    for _ in range(2):
        a.grad = torch.ones(3)
        opt.step()
    d_before = opt.state[a]["d"].clone()
    b = nn.Parameter(torch.ones(2))
    opt.add_param_group({"params": [b], "lr": 0.2})
    assert torch.equal(opt.state[a]["d"], d_before)
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    opt.step()
    assert opt.state[a]["nlcg_global"]["beta"] == 0.0  # restarted
    assert opt.state[a]["nlcg_global"]["step"] == 3
    assert not torch.equal(b, torch.ones(2))


def test_closure_loss_feeds_step_control() -> None:
    model = make_model()
    opt = NLCG(model.parameters())
    x, y = make_batches(1)[0]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    returned = opt.step(closure)
    assert isinstance(returned, torch.Tensor)
    assert opt.control.loss_ema == pytest.approx(float(returned.detach()))


def test_fletcher_reeves_without_secant_keeps_no_previous_gradient() -> None:
    model = make_model()
    opt = NLCG(model.parameters(), beta_rule="fr", preconditioner="none")
    train(model, opt, torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0), make_batches(2))
    p0 = next(model.parameters())
    assert set(opt.state[p0]) == {"d", "nlcg_global"}
    n = sum(p.numel() for p in model.parameters())
    # d plus the workspace (gradient and z): three parameter-sized float32 buffers
    assert opt.buffer_nbytes() == 3 * 4 * n
