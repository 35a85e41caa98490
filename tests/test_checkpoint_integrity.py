"""Harness checkpoints and metrics files that are damaged, implausible or in the way are
refused with one line (``bigbatch: error``, exit 2), never resumed into a wrong run."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from bigbatch.train import cli
from bigbatch.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from bigbatch.train.metrics import MetricsError, read_metrics

TRAIN = [
    "train",
    "--dataset", "digits",
    "--model", "mlp",
    "--batch-size", "256",
    "--epochs", "2",
    "--no-progress",
    "--set", "data.validation_size=200",
    "--set", "model.width=16",
]  # fmt: skip


def test_flipped_truncated_and_old_format_checkpoints_are_refused(tmp_path: Path) -> None:
    path = save_checkpoint({"step": 3, "w": torch.arange(1000.0)}, tmp_path / "c.pt")
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(1000.0))
    data = bytearray(path.read_bytes())
    for k in range(64):  # 64 flipped bytes in the payload
        data[len(data) // 2 + k] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is damaged: its checksum does not match"):
        load_checkpoint(path)
    good = save_checkpoint({"step": 3}, tmp_path / "d.pt")
    good.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="is damaged"):
        load_checkpoint(good)
    torch.save({"step": 1}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="no checksum header"):
        load_checkpoint(tmp_path / "old.pt")


def test_a_killed_writers_temporary_files_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / ".checkpoint.pt.abc123.tmp"
    fresh = tmp_path / ".checkpoint.pt.def456.tmp"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"a writer at work")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    save_checkpoint({"step": 0}, tmp_path / "checkpoint.pt")
    assert not stale.exists()
    assert fresh.exists()  # possibly another writer's: left alone


def test_metrics_with_a_torn_last_line_read_cleanly(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 0}) + "\n" + json.dumps({"step": 5}) + '\n{"step": 1')
    assert [r["step"] for r in read_metrics(path)] == [0, 5]
    path.write_text('{"step": 0}\nnot json\n{"step": 5}\n')
    with pytest.raises(MetricsError, match="line 2: not a JSON record"):
        read_metrics(path)


def test_train_into_an_earlier_run_needs_resume_or_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert cli.main([*TRAIN, "--out", str(out)]) == 0
    before = (out / "metrics.jsonl").read_text()
    assert cli.main([*TRAIN, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "bigbatch: error: --out" in err
    assert "add --resume to continue it, or --overwrite" in err
    assert (out / "metrics.jsonl").read_text() == before  # nothing was touched
    assert cli.main([*TRAIN, "--out", str(out), "--overwrite"]) == 0


@pytest.mark.parametrize("damage", ["step", "nan-weights", "nan-state", "flipped"])
def test_resume_refuses_an_implausible_or_damaged_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    out = tmp_path / "run"
    assert cli.main([*TRAIN, "--optimizer", "spngd", "--out", str(out)]) == 0
    path = out / "checkpoint.pt"
    state = load_checkpoint(path)
    message = "cannot be resumed"
    if damage == "step":
        state["step"] = -3
        message = "at step -3, outside this run's"
    elif damage == "nan-weights":
        first = next(iter(state["model"]))
        state["model"][first].fill_(float("nan"))
        message = "not finite"
    elif damage == "nan-state":
        entry = next(iter(state["optimizer"]["state"].values()))
        entry["momentum_buffer"].fill_(float("nan"))
        message = "momentum_buffer of parameter 0 is not finite"
    if damage == "flipped":
        data = bytearray(path.read_bytes())
        data[-100] ^= 0xFF
        path.write_bytes(bytes(data))
        message = "is damaged"
    else:
        save_checkpoint(state, path)
    capsys.readouterr()
    assert cli.main([*TRAIN, "--optimizer", "spngd", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bigbatch: error:")
    assert message in err
