"""One training run: accumulation equals a full batch, resume equals uninterrupted, Ctrl-C,
divergence, schedules as applied, checkpoints written atomically."""

from __future__ import annotations

import itertools
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from bigbatch.train import loop as loop_module
from bigbatch.train.batches import BatchOrder, prepare_splits
from bigbatch.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from bigbatch.train.config import Config, load_config
from bigbatch.train.interrupt import TrainingInterrupted
from bigbatch.train.loop import TrainingRun
from bigbatch.train.micro_batch import activation_bytes_per_sample, auto_micro_batch
from bigbatch.train.schedules import lr_factor_fn
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


def config(*extra: str) -> Config:
    return load_config(None, [*BASE, *extra])


def params(run: TrainingRun) -> list[torch.Tensor]:
    return [p.detach().clone() for p in run.model.parameters()]


def without_time(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in records]


@pytest.mark.parametrize("optimizer", ["momentum", "nlcg", "spngd"])
def test_micro_batches_equal_the_full_batch(optimizer: str, tmp_path: Path) -> None:
    data = synthetic_dataset()
    full = TrainingRun(
        config(f"optimizer.name={optimizer}", "optimizer.lr=0.05"), data, tmp_path / "full"
    )
    micro = TrainingRun(
        config(f"optimizer.name={optimizer}", "optimizer.lr=0.05", "train.micro_batch_size=32"),
        data,
        tmp_path / "micro",
    )
    assert micro.micro == 32
    r_full, r_micro = full.run(), micro.run()
    assert r_full.steps == r_micro.steps == 15  # 640 // 128 = 5 steps/epoch, 3 epochs
    # float32: the sums run in a different order; SP-NGD's inverses amplify that a little
    # (its exact float64 equality is tested in test_spngd.py)
    rtol, atol = (2e-3, 1e-4) if optimizer == "spngd" else (2e-4, 2e-5)
    for a, b in zip(params(full), params(micro), strict=True):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol)
    # the training moved the weights (the test would pass trivially otherwise)
    fresh = TrainingRun(config(f"optimizer.name={optimizer}"), data, tmp_path / "fresh")
    moved = sum(
        float((a - b).abs().sum()) for a, b in zip(params(full), params(fresh), strict=True)
    )
    assert moved > 1e-2


@pytest.mark.parametrize("optimizer", ["nlcg", "spngd"])
def test_resume_equals_uninterrupted(
    optimizer: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = synthetic_dataset()
    opts = [
        f"optimizer.name={optimizer}",
        "optimizer.lr=0.05",
        "recipe.mixup_alpha=0.4",
        "recipe.running_mixup=true",
        "recipe.ema_decay=0.9",
        "train.eval_every=2",
    ]
    whole = TrainingRun(config(*opts), data, tmp_path / "whole")
    expected = whole.run()

    monkeypatch.setattr(loop_module, "GracefulInterrupt", ctrl_c_at_check(7))
    first = TrainingRun(config(*opts), data, tmp_path / "split")
    with pytest.raises(TrainingInterrupted):
        first.run()
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pt")["step"] == 7
    monkeypatch.undo()
    second = TrainingRun(config(*opts), data, tmp_path / "split")
    resumed = second.run(resume=True)
    assert resumed.steps == expected.steps
    assert without_time(resumed.history) == without_time(expected.history)
    for a, b in zip(params(whole), params(second), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_ctrl_c_saves_a_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = synthetic_dataset()
    run = TrainingRun(config("optimizer.name=momentum"), data, tmp_path / "run")
    original = run._train_step

    def step_then_signal() -> float:
        value = original()
        if run.step == 3:  # the 4th step is running: Ctrl-C arrives in the middle of it
            os.kill(os.getpid(), signal.SIGINT)
        return value

    monkeypatch.setattr(run, "_train_step", step_then_signal)
    # a known handler before the run (a shell's background job starts with SIGINT ignored)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(TrainingInterrupted, match="checkpoint saved"):
            run.run()
        restored = signal.getsignal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, outer)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 4  # the step in flight finished, then the run stopped
    assert restored is signal.default_int_handler  # the run put the handler back


def test_resume_refuses_a_different_configuration(tmp_path: Path) -> None:
    data = synthetic_dataset()
    TrainingRun(config("train.epochs=1"), data, tmp_path / "r").run()
    other = TrainingRun(config("train.epochs=1", "optimizer.lr=0.3"), data, tmp_path / "r")
    with pytest.raises(CheckpointError, match=r"optimizer\.lr: 0\.1 -> 0\.3"):
        other.run(resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        TrainingRun(config(), data, tmp_path / "empty").run(resume=True)


def test_divergence_stops_before_the_weights_are_touched(tmp_path: Path) -> None:
    data = synthetic_dataset()
    run = TrainingRun(
        config("optimizer.name=sgd", "optimizer.lr=1e6", "schedule.warmup_epochs=0"),
        data,
        tmp_path / "d",
    )
    result = run.run()
    assert result.status == "diverged"
    assert result.steps < 15
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


@pytest.mark.parametrize("optimizer", ["momentum", "spngd"])
def test_advance_steps_exactly_as_run_does(optimizer: str, tmp_path: Path) -> None:
    """``advance`` (what benchmarks/retime.py interleaves) trains the run's own steps: the
    same weights as ``run``, its seconds in ``elapsed``, then None at the end (no files)."""
    opts = (f"optimizer.name={optimizer}", "optimizer.lr=0.05")
    data = synthetic_dataset()
    whole = TrainingRun(config(*opts), data, tmp_path / "whole")
    whole.run()
    stepped = TrainingRun(config(*opts), data, tmp_path / "stepped")
    losses, elapsed = [], []
    while (loss := stepped.advance()) is not None:
        losses.append(loss)
        elapsed.append(stepped.elapsed)
    assert stepped.step == whole.step == 15
    assert len(losses) == 15
    assert all(b > a for a, b in itertools.pairwise(elapsed))
    assert stepped.advance() is None
    assert stepped.step == 15
    for a, b in zip(params(whole), params(stepped), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert not (tmp_path / "stepped").exists()


def test_advance_stops_at_a_divergence(tmp_path: Path) -> None:
    run = TrainingRun(
        config("optimizer.name=sgd", "optimizer.lr=1e6", "schedule.warmup_epochs=0"),
        synthetic_dataset(),
        tmp_path / "d",
    )
    steps = 0
    while run.advance() is not None:
        steps += 1
    assert run.status == "diverged"
    assert run.step == steps < 15
    assert run.advance() is None
    assert run.step == steps
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_learning_rate_follows_the_schedule(tmp_path: Path) -> None:
    run = TrainingRun(config("train.eval_every=1"), synthetic_dataset(), tmp_path / "s")
    result = run.run()
    factor = lr_factor_fn("cosine", total_steps=15, warmup_steps=5)
    for record in result.history:
        assert record["lr"] == pytest.approx(0.1 * factor(record["step"]), rel=1e-6)
    assert [r["step"] for r in result.history] == list(range(16))


def test_batch_order_is_a_seeded_permutation_per_epoch() -> None:
    order = BatchOrder(10, 3, seed=5)
    assert order.steps_per_epoch == 3
    epoch0 = torch.cat([order.indices(s) for s in range(3)])
    epoch1 = torch.cat([order.indices(s) for s in range(3, 6)])
    assert len(set(epoch0.tolist())) == 9
    assert len(set(epoch1.tolist())) == 9
    assert not torch.equal(epoch0, epoch1)
    again = BatchOrder(10, 3, seed=5)
    assert torch.equal(again.indices(4), order.indices(4))
    with pytest.raises(ValueError, match="batch_size"):
        BatchOrder(10, 11, seed=0)


def test_validation_split_is_disjoint_and_normalised() -> None:
    data = synthetic_dataset(n_train=300)
    train, val, test = prepare_splits(data, 100, torch.device("cpu"))
    assert val is not None
    assert len(train) == 200
    assert len(val) == 100
    assert len(test) == 256
    flat = data.train_x.view(300, -1).float()
    mean, std = data.mean[0], data.std[0]
    recovered = torch.cat([train.x, val.x]).view(300, -1) * std + mean
    # every original image appears exactly once across train + validation
    dist = torch.cdist(recovered * 255, flat)
    assert torch.equal(dist.argmin(1).sort().values, torch.arange(300))
    with pytest.raises(ValueError, match="validation_size"):
        prepare_splits(data, 300, torch.device("cpu"))


def test_auto_micro_batch_fits_the_budget() -> None:
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    )
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,))
    per_sample = activation_bytes_per_sample(model, x, y)
    # saved for backward: the Linear inputs (64 and 32 floats), the ReLU output (32 floats)
    # and the cross-entropy's log-softmax (4 floats) per sample
    assert per_sample == pytest.approx(4 * (64 + 32 + 32 + 4), rel=0.3)
    assert auto_micro_batch(model, x, y, 96, budget_bytes=int(per_sample * 40)) == 32
    assert auto_micro_batch(model, x, y, 96, budget_bytes=1) == 1
    assert auto_micro_batch(model, x, y, 96, budget_bytes=1 << 40) == 96


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken)  # the temporary file is written, then this
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a bigbatch checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def test_kron_repeats_its_run_exactly(tmp_path: Path) -> None:
    """pytorch_optimizer's Kron draws from NumPy's global generator; the loop seeds it per
    step, so two runs of one configuration end with the same weights, bit for bit."""
    opts = ("optimizer.name=kron", "optimizer.lr=0.003", "train.epochs=6")
    data = synthetic_dataset()
    first = TrainingRun(config(*opts), data, tmp_path / "a")
    first.run()
    import numpy as np

    np.random.seed(12345)  # noqa: NPY002 (any global state before: the same run)
    second = TrainingRun(config(*opts), data, tmp_path / "b")
    second.run()
    for a, b in zip(params(first), params(second), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
