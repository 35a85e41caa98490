"""What one training run reports: its settings, its evaluation history and how it ended.

``RunResult`` is what :class:`~bigbatch.train.loop.TrainingRun.run` returns and what
``compare``/``sweep`` (``experiments.py``), the reports and the benchmarks read back from a
run's folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["RunResult"]


@dataclass
class RunResult:
    """What a finished (or stopped) run reports."""

    name: str
    optimizer: str
    lr: float
    batch_size: int
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    status: str = "finished"  # or "diverged"
    wall_s: float = 0.0
    micro_batch_size: int = 0

    def last(self, key: str) -> float:
        values = [r[key] for r in self.history if r.get(key) is not None]
        return float(values[-1]) if values else float("nan")

    def best(self, key: str) -> float:
        values = [r[key] for r in self.history if r.get(key) is not None]
        return float(max(values)) if values else float("nan")

    def steps_to(self, target: float, key: str = "test_acc") -> int | None:
        for record in self.history:
            value = record.get(key)
            if value is not None and value >= target:
                return int(record["step"])
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "optimizer": self.optimizer,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "micro_batch_size": self.micro_batch_size,
            "steps": self.steps,
            "status": self.status,
            "wall_s": self.wall_s,
            "final_test_acc": self.last("test_acc"),
            "best_test_acc": self.best("test_acc"),
            "final_val_acc": self.last("val_acc"),
        }
