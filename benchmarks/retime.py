"""Time to target of a finished study, re-measured in one invocation on one machine with
the contenders interleaved.

A study run in parts (``convergence.py --merge``) times each part under its own load, hours
apart and possibly on another machine. This script re-times it: for every (contender,
batch) cell that reached a target, seed 0 is trained again at the chosen lr from step 0 (the
same run as the study's, so the same refresh schedule) up to the most steps any seed needed
for any target; at each batch size every such run advances one step per round, in a shuffled
order, so all contenders share the same machine and load. The training seconds (evaluation
excluded, as in the study; on a GPU each step synchronised before and after) after each
seed's steps to each target go into the study's rows as ``retimed``, and its tables and
time plot are redrawn. Each step starts with the caches holding another contender's state,
which costs the smallest models most; the study's own per-part seconds stay in its tables.
The study must have been run with the task's budget as it is now (its epochs and steps per
epoch are checked).

Run from the project's root after the merge, e.g.
``python benchmarks/retime.py --task kjv-gpt --budget study --data-dir ../shared/data``.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bigbatch.train.config import Config, OptimizerConfig
from bigbatch.train.data import Dataset
from bigbatch.train.loop import TrainingRun
from bigbatch.train.malloc_tuning import tune_malloc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine, utc_now
from convergence import TASKS, base_config, load_splits, write_outputs


@dataclass
class Cell:
    """One (contender, batch) cell's seed-0 run and the training seconds after each step."""

    row: dict[str, Any]
    run: TrainingRun
    steps: int
    #: training seconds after each step (cumulative)
    seconds: list[float] = field(default_factory=list)

    @property
    def diverged(self) -> bool:
        return self.run.status == "diverged"

    @property
    def done(self) -> bool:
        run = self.run
        return self.diverged or run.step >= run.total_steps or len(self.seconds) >= self.steps


def steps_needed(row: dict[str, Any]) -> int:
    """The most steps any seed needed for any target (0: no target reached)."""
    reached = [s for per_seed in row["steps_to"].values() for s in per_seed if s is not None]
    return max(reached, default=0)


def cell_config(cfg: Config, row: dict[str, Any]) -> Config:
    """The study's seed-0 configuration of ``row`` at its chosen lr."""
    optimizer = OptimizerConfig(
        name=row["optimizer"],
        lr=row["chosen_lr"],
        weight_decay=cfg.optimizer.weight_decay,
        options=row["options"],
    )
    train = cfg.train.model_copy(update={"batch_size": row["batch_size"], "seed": 0})
    return cfg.model_copy(update={"optimizer": optimizer, "train": train})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleave(cells: Sequence[Cell], rng: random.Random) -> int:
    """Advance every unfinished cell one step per round, in a shuffled order (the garbage
    collector off inside a round; on a GPU synchronised around each step, so no step's
    queued work is charged to the next contender); the number of rounds."""
    rounds = 0
    active = [c for c in cells if not c.done]
    while active:
        rng.shuffle(active)
        gc.collect()
        gc.disable()
        try:
            for c in active:
                _sync(c.run.device)
                started = time.perf_counter()
                stepped = c.run.advance() is not None
                _sync(c.run.device)
                seconds = time.perf_counter() - started
                if stepped:
                    c.seconds.append(seconds + (c.seconds[-1] if c.seconds else 0.0))
        finally:
            gc.enable()
        rounds += 1
        active = [c for c in active if not c.done]
    return rounds


def retimed(cell: Cell) -> dict[str, Any]:
    """The row's ``retimed`` entry: seconds after each seed's steps to each target."""

    def at(steps: int | None) -> float | None:
        if steps is None or steps > len(cell.seconds):
            return None
        return 0.0 if steps == 0 else round(cell.seconds[steps - 1], 4)

    timed = len(cell.seconds)
    return {
        "seconds_to": {k: [at(s) for s in v] for k, v in cell.row["steps_to"].items()},
        "steps_timed": timed,
        "step_ms": round(1e3 * cell.seconds[-1] / timed, 3) if timed else None,
        "diverged": cell.diverged,
    }


def retime(
    study: dict[str, Any], cfg: Config, dataset: Dataset, splits: Any, seed: int = 0
) -> dict[str, Any]:
    """Re-time every cell of ``study`` that reached a target; the study with ``retimed``
    entries on those rows (others lose theirs) and the measurement in its context."""
    rng = random.Random(seed)
    started, load_before = time.perf_counter(), load_average()
    rounds: dict[int, int] = {}
    for row in study["results"]:
        row.pop("retimed", None)
    with tempfile.TemporaryDirectory() as scratch:
        for batch in sorted({r["batch_size"] for r in study["results"]}):
            cells = []
            for row in study["results"]:
                steps = steps_needed(row) if row["chosen_lr"] is not None else 0
                if row["batch_size"] != batch or steps == 0:
                    continue
                run = TrainingRun(
                    cell_config(cfg, row), dataset, Path(scratch) / "run", splits=splits
                )
                cells.append(Cell(row, run, steps))
            rounds[batch] = interleave(cells, rng)
            for c in cells:
                c.row["retimed"] = retimed(c)
                print(f"b={batch} {c.row['contender']}: {c.row['retimed']}", flush=True)
            del cells
    study["context"]["retimed"] = {
        "date": utc_now(),
        "machine": machine(torch.get_num_threads()),
        "wall_s": round(time.perf_counter() - started, 1),
        "load_average_1min": {"before": load_before, "after": load_average()},
        "rounds_per_batch": rounds,
        "how": "seed 0 at the chosen lr from step 0, every contender of a batch size one "
        "step per round in a shuffled order; training seconds (evaluation excluded) after "
        "each seed's steps to the target",
    }
    return study


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), required=True)
    p.add_argument("--budget", required=True, help="the study's budget (e.g. study)")
    p.add_argument(
        "--study",
        type=Path,
        default=None,
        help="the study's results file (default: "
        "benchmarks/results/convergence_<task>_<budget>.json); rewritten in place",
    )
    p.add_argument("--data-dir", default=None, help="where the dataset is (default: searched)")
    p.add_argument("--cache-dir", default=None, help="where decoded arrays are cached")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="default: the study's own (its context's device)",
    )
    args = p.parse_args(argv)
    if args.budget not in TASKS[args.task].budgets:
        p.error(f"--budget {args.budget!r}: {args.task} has {', '.join(TASKS[args.task].budgets)}")
    if args.study is None:
        tag = "" if args.budget == "full" else f"_{args.budget}"  # as convergence.py names it
        args.study = Path("benchmarks/results") / f"convergence_{args.task}{tag}.json"
    if not args.study.is_file():
        p.error(f"--study {args.study}: no such file (run the study, or its --merge, first)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    study = json.loads(args.study.read_text())
    task, budget = TASKS[args.task], TASKS[args.task].budgets[args.budget]
    if study["context"].get("budget") != args.budget:
        raise SystemExit(
            f"{args.study}: its budget is {study['context'].get('budget')!r}, not {args.budget!r}"
        )
    if args.device is None:
        own = str(study["context"].get("device", "cpu"))
        args.device = "cuda" if own.startswith("cuda") else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if study["context"].get("epochs") != budget.epochs:
        raise SystemExit(
            f"{args.study}: run for {study['context'].get('epochs')} epochs, the {args.budget} "
            f"budget is now {budget.epochs}: re-run the study, or re-time it with its own code"
        )
    tune_malloc()
    cfg = base_config(task, budget, args)
    dataset, splits, epoch_steps = load_splits(task, budget, cfg, args, torch.device(args.device))
    for batch, steps in study["context"].get("steps_per_epoch", {}).items():
        if epoch_steps(int(batch)) != steps:
            raise SystemExit(
                f"{args.study}: {steps} steps per epoch at batch {batch}, the data now gives "
                f"{epoch_steps(int(batch))}: not the same training set"
            )
    retime(study, cfg, dataset, splits)
    study["context"]["retimed"]["command"] = "python benchmarks/retime.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    write_outputs(study, args.study.with_suffix(""))
    print(f"written: {args.study} and its tables and plots")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
