"""The modern contenders in the harness (SOAP, Shampoo, PSGD Kron, Muon + AdamW,
Schedule-Free AdamW), hosted through their registry entries' capabilities: each trains
(the loss falls), resumes exactly, and does what its capabilities say (Schedule-Free is
evaluated at its averaged weights and keeps its own schedule; Muon gets only hidden weight
matrices)."""

from __future__ import annotations

from pathlib import Path

import pytest
import schedulefree
import torch
from torch import nn

from bigbatch.train import loop as loop_module
from bigbatch.train.combined import CombinedOptimizer, muon_with_adamw
from bigbatch.train.config import Config, load_config
from bigbatch.train.evaluate import evaluate
from bigbatch.train.interrupt import TrainingInterrupted
from bigbatch.train.loop import TrainingRun
from bigbatch.train.optimizers import OPTIMIZERS, capabilities
from tests.harness_data import ctrl_c_at_check, synthetic_dataset

BASE = [
    "data.validation_size=128",
    "model.name=mlp",
    "model.width=32",
    "train.batch_size=128",
    "train.epochs=3",
    "train.progress=never",
    "schedule.kind=cosine",
    "schedule.warmup_epochs=1",
]
LRS = {"soap": 1e-2, "shampoo": 1e-2, "kron": 1e-2, "muon": 0.05, "sfadamw": 1e-2}


def config(*extra: str) -> Config:
    return load_config(None, [*BASE, *extra])


@pytest.mark.parametrize("name", sorted(LRS))
def test_contender_trains_and_resumes_exactly(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = synthetic_dataset()
    opts = [f"optimizer.name={name}", f"optimizer.lr={LRS[name]}", "train.checkpoint_every=5"]
    run = TrainingRun(config(*opts), data, tmp_path / "whole")
    result = run.run()
    assert result.status == "finished"
    losses = [r["train_loss"] for r in result.history if r.get("train_loss") is not None]
    assert losses[-1] < 0.8 * losses[0], losses

    # a run stopped after step 7 (as by Ctrl-C) and resumed ends with the same weights
    monkeypatch.setattr(loop_module, "GracefulInterrupt", ctrl_c_at_check(7))
    with pytest.raises(TrainingInterrupted):
        TrainingRun(config(*opts), data, tmp_path / "split").run()
    monkeypatch.undo()
    resumed = TrainingRun(config(*opts), data, tmp_path / "split")
    resumed.run(resume=True)
    for a, b in zip(run.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_schedule_free_is_evaluated_at_its_averaged_weights(tmp_path: Path) -> None:
    data = synthetic_dataset()
    run = TrainingRun(config("optimizer.name=sfadamw", "optimizer.lr=1e-2"), data, tmp_path)
    assert capabilities(run.cfg.optimizer).mode_switch
    result = run.run()
    assert all(g["lr"] == pytest.approx(1e-2) for g in run.optimizer.param_groups)  # no decay
    assert run.optimizer.param_groups[0]["warmup_steps"] == 5  # the harness's warm-up epoch
    optimizer = run.optimizer
    assert isinstance(optimizer, schedulefree.AdamWScheduleFree)
    optimizer.eval()
    loss_eval, _ = evaluate(run.model, run.test)
    optimizer.train()
    loss_train, _ = evaluate(run.model, run.test)
    assert result.last("test_loss") == pytest.approx(loss_eval, rel=1e-6)
    assert abs(loss_eval - loss_train) > 1e-3 * loss_eval  # the weight sets differ


def test_muon_takes_hidden_matrices_and_adamw_the_rest() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(5, 4), nn.Flatten(), nn.Linear(8, 6), nn.LayerNorm(6), nn.Linear(6, 3)
    )
    opt = OPTIMIZERS["muon"].build(model, 0.02, 0.0, dict(OPTIMIZERS["muon"].defaults))
    assert isinstance(opt, CombinedOptimizer)
    muon, adamw = opt.parts
    assert isinstance(muon, torch.optim.Muon)
    assert isinstance(adamw, torch.optim.AdamW)
    muon_params = [p for g in muon.param_groups for p in g["params"]]
    assert [tuple(p.shape) for p in muon_params] == [(6, 8)]  # the hidden Linear only
    assert adamw.param_groups[0]["lr"] == pytest.approx(0.02 * 0.015)
    # steps both; a scheduler's change of the shared groups reaches both parts
    x = torch.randint(0, 5, (7, 2))
    model(x).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    for group in opt.param_groups:
        group["lr"] = 0.0
    assert muon.param_groups[0]["lr"] == 0.0
    assert adamw.param_groups[0]["lr"] == 0.0
    state = opt.state_dict()
    with pytest.raises(ValueError, match="must hold 2 part states"):
        opt.load_state_dict({"parts": state["parts"][:1]})


def test_combined_optimizer_refuses_overlapping_parts() -> None:
    w = nn.Parameter(torch.ones(2, 2))
    with pytest.raises(ValueError, match="a parameter is in two parts"):
        CombinedOptimizer([torch.optim.SGD([w], lr=0.1), torch.optim.AdamW([w], lr=0.1)])
    with pytest.raises(ValueError, match="at least one optimizer"):
        CombinedOptimizer([])
    groups = [{"params": [w], "weight_decay": 0.0}]
    assert isinstance(muon_with_adamw(groups, 0.02, {}, 1e-3, {}, set()), CombinedOptimizer)
