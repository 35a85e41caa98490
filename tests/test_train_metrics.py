"""Metrics log: JSON lines, truncation on resume, TensorBoard or a clear error."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import pytest

from bigbatch.train.metrics import MetricsLog, read_metrics


def test_records_truncation_and_non_finite_values(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    log.reset()
    for step in range(4):
        log.write(
            {"step": step, "test_acc": step / 10, "train_loss": math.nan if step == 2 else 1.0}
        )
    assert [r["step"] for r in read_metrics(log.path)] == [0, 1, 2, 3]
    assert read_metrics(log.path)[2]["train_loss"] is None  # JSON has no NaN
    log.truncate_after(1)
    assert [r["step"] for r in read_metrics(log.path)] == [0, 1]


def test_tensorboard_missing_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(RuntimeError, match=r"bigbatch\[tensorboard\]"):
        MetricsLog(tmp_path, tensorboard=True)


def test_tensorboard_gets_every_numeric_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, float, int]] = []

    class Writer:
        def __init__(self, log_dir: str) -> None:
            assert log_dir == str(tmp_path / "tensorboard")

        def add_scalar(self, key: str, value: float, step: int) -> None:
            calls.append((key, value, step))

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    log = MetricsLog(tmp_path, tensorboard=True)
    log.write({"step": 5, "test_acc": 0.5, "lr": 0.1, "note": "text"})
    log.close()
    assert sorted(calls) == [("lr", 0.1, 5), ("test_acc", 0.5, 5)]
