"""Equivalence tests in the style of Distributed Shampoo's: with their extra machinery
switched off by a documented setting, the optimizers ARE the torch optimizer underneath,
to the bit, so every difference a full run shows comes from that machinery."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bigbatch import NLCG, SPNGD


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 3))


def _train(
    model: nn.Module, opt: torch.optim.Optimizer, steps: int = 6, schedule: bool = True
) -> list[Tensor]:
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5 if schedule else 1.0)
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(12, 5, generator=gen), torch.randint(0, 3, (12,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if isinstance(opt, NLCG):
            opt.step(loss=loss)
        else:
            opt.step()
        sched.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_spngd_without_preconditioning_is_momentum_sgd(weight_decay: float) -> None:
    model_a, model_b = _model(), _model()
    ours = SPNGD(model_a, lr=0.1, momentum=0.9, weight_decay=weight_decay, precondition=False)
    torch_sgd = torch.optim.SGD(
        model_b.parameters(), lr=0.1, momentum=0.9, weight_decay=weight_decay, foreach=True
    )
    # a constant lr: on an lr change SP-NGD rescales its momentum by lr_new / lr_old (its
    # documented difference), which torch's SGD does not
    got, want = _train(model_a, ours, schedule=False), _train(model_b, torch_sgd, schedule=False)
    for p, q in zip(got, want, strict=True):
        assert torch.equal(p, q)
    assert ours.engine.stats == {}  # nothing was recorded


def test_nlcg_without_conjugacy_preconditioning_or_step_control_is_sgd() -> None:
    model_a, model_b = _model(), _model()
    ours = NLCG(
        model_a.parameters(),
        lr=0.1,
        preconditioner="none",
        beta_clip=(0.0, 0.0),
        step_control="off",
        restart_on_ascent=False,
    )
    torch_sgd = torch.optim.SGD(model_b.parameters(), lr=0.1, foreach=True)
    got, want = _train(model_a, ours), _train(model_b, torch_sgd)
    for p, q in zip(got, want, strict=True):
        assert torch.equal(p, q)
