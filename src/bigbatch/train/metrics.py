"""Metrics of a run: one JSON object per line in ``metrics.jsonl``, optionally TensorBoard.

Each evaluation appends one record (step, epoch, samples seen, learning rate, training loss,
validation/test loss and accuracy, wall time). On resume the file is cut back to the records
up to the checkpoint's step, so a resumed run's file equals an uninterrupted run's.
Not here: computing the numbers (``evaluate.py``, ``loop.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["MetricsError", "MetricsLog", "read_metrics"]

#: Fields that depend on the machine's speed; they differ between equal runs.
TIMING_FIELDS = ("wall_s",)


class MetricsLog:
    """Appends evaluation records to ``<run_dir>/metrics.jsonl`` (and TensorBoard)."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = False) -> None:
        self.path = run_dir / "metrics.jsonl"
        run_dir.mkdir(parents=True, exist_ok=True)
        self._writer: Any = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError(
                    "train.tensorboard=true needs the tensorboard package: "
                    "pip install 'bigbatch[tensorboard]'"
                ) from None
            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Keep only the records with ``step <= step`` (used when resuming)."""
        kept = [r for r in read_metrics(self.path) if int(r["step"]) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def reset(self) -> None:
        self.path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        with self.path.open("a") as fh:
            fh.write(json.dumps(clean) + "\n")
        if self._writer is not None:
            step = int(record["step"])
            for key, value in clean.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class MetricsError(ValueError):
    """A metrics file holds a line that is not a record."""


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (empty if it does not exist). A partial LAST
    line (a write cut off by a kill) is dropped; a bad line elsewhere is an error naming it."""
    file = Path(path)
    if not file.is_file():
        return []
    lines = [line for line in file.read_text().splitlines() if line.strip()]
    records = []
    for k, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if k == len(lines) - 1:
                break  # torn by a kill mid-write: the checkpoint's step decides what is kept
            raise MetricsError(f"{file}, line {k + 1}: not a JSON record: {line[:60]!r}") from None
        if not isinstance(record, dict) or "step" not in record:
            raise MetricsError(f"{file}, line {k + 1}: not a metrics record")
        records.append(record)
    return records
