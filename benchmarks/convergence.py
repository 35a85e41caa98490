"""Benchmarks B2, B3 and B5: accuracy and steps to target at large batch, tuned fairly.

Every contender (momentum SGD, LARS, LAMB, Adam, NLCG with each preconditioner, SP-NGD with
the empirical and the Monte Carlo Fisher) is trained by the harness
(:func:`bigbatch.train.experiments.run_grid`, the loop ``bigbatch compare`` uses) on the
same data, model, epoch budget, schedule (linear warm-up of one epoch, then cosine to 0),
weight decay and evaluation points, at each batch size. The protocol is the same for all:

- a 3-point learning-rate grid, factor 2 apart, around each contender's centre; the centre is
  given at batch 8192 and moved to each batch size by sqrt(B / 8192), for every contender;
- seed 0 runs the whole grid; the learning rate with the best last *validation* accuracy
  (images held out of the training set) is chosen; every other seed runs at that lr;
- reported: final test top-1 over the seeds (mean, min, max), the steps to the task's
  target test accuracy per seed, and whether the chosen lr was at the grid's edge.

Tasks: ``fashion-mnist-cnn`` and ``fashion-mnist-mlp`` (B2/B5, CPU) and
``cifar10-resnet20`` (B3: CIFAR-10 (JPEG), ResNet-20, batch 4K-16K, meant for a GPU; the
``tiny`` budget runs it on a CPU in seconds on a slice of the data, to show it works).
Budgets: ``quick`` (one seed, one lr, 2 epochs: a check in minutes), ``full`` (the
protocol above). Finished runs are kept under ``--out`` and reused on the next call, so an
interrupted background run continues where it stopped.

Run from the project's root (``python benchmarks/convergence.py --help``); results go to
``<results>/convergence_<task>.{json,md}`` and ``_accuracy.png``/``_scaling.png`` beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from bigbatch.train.batches import prepare_splits
from bigbatch.train.config import Config, config_from_mapping
from bigbatch.train.critical_batch import critical_batch_size
from bigbatch.train.data import ImageDataset, load_dataset
from bigbatch.train.experiments import run_grid
from bigbatch.train.malloc_tuning import tune_malloc
from bigbatch.train.plots import plot_scaling
from bigbatch.train.results import RunResult

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bigbatch.train.machine import machine_info

REFERENCE_BATCH = 8192


@dataclass(frozen=True)
class Contender:
    """One optimizer setting: the harness's registry name, its options, its lr centre."""

    label: str
    optimizer: str
    options: dict[str, Any]
    #: learning rate at batch 8192 the grid is centred on
    centre: float
    #: where the centre comes from (said in the report)
    origin: str


_SCAN = "best of a 4-point factor-2 scan at batch 8192, 12 epochs (CNN)"
_DEFAULT = "registry default grid's centre (not scanned; the search extends past edges)"
CONTENDERS: dict[str, Contender] = {
    c.label: c
    for c in (
        Contender("momentum", "momentum", {}, 0.2, _SCAN),
        Contender("lars", "lars", {}, 8.0, _SCAN),
        Contender("lamb", "lamb", {}, 1e-2, "registry default grid's centre (not scanned)"),
        Contender("adam", "adam", {}, 3e-3, "registry default grid's centre (not scanned)"),
        Contender(
            "nlcg-none",
            "nlcg",
            {"preconditioner": "none"},
            0.2,
            "NLCG-BFGS's centre (not scanned)",
        ),
        Contender("nlcg-bfgs", "nlcg", {"preconditioner": "bfgs"}, 0.2, _SCAN),
        Contender(
            "nlcg-adam", "nlcg", {"preconditioner": "adam"}, 3e-3, "Adam's centre (not scanned)"
        ),
        Contender(
            "nlcg-kfac", "nlcg", {"preconditioner": "kfac"}, 1e-2, "SP-NGD's centre (not scanned)"
        ),
        Contender("spngd-emp", "spngd", {"fisher": "empirical"}, 1e-2, _SCAN),
        Contender("spngd-mc", "spngd", {"fisher": "mc"}, 1e-2, "SP-NGD (empirical)'s centre"),
        # what users pick today (issue 14): maintained implementations, library defaults
        Contender("adamw", "adamw", {}, 3e-3, _DEFAULT),
        Contender("soap", "soap", {}, 3e-3, _DEFAULT),
        Contender("shampoo", "shampoo", {}, 3e-3, _DEFAULT),
        Contender("kron", "kron", {}, 1e-3, _DEFAULT),
        Contender("muon", "muon", {}, 0.02, _DEFAULT),
        Contender("sfadamw", "sfadamw", {}, 3e-3, _DEFAULT),
    )
}
#: the study's contenders (issue 14): the first-order and second-order peers, NLCG, SP-NGD
STUDY = (
    "momentum",
    "adamw",
    "lars",
    "lamb",
    "soap",
    "shampoo",
    "kron",
    "muon",
    "sfadamw",
    "nlcg-bfgs",
    "nlcg-kfac",
    "spngd-emp",
)


@dataclass(frozen=True)
class Budget:
    batch_sizes: tuple[int, ...]
    epochs: float
    seeds: int
    grid_points: int
    #: evaluations per epoch (steps to target are read at these points)
    evals_per_epoch: int = 2
    #: keep only this many training / test images (the tiny CPU check); None = all
    train_limit: int | None = None
    test_limit: int | None = None
    validation_size: int | None = None
    #: trials per (contender, batch) at most: the grid, extended by factor 2 past an edge
    #: while the best is there (bigbatch.train.tuning.search_lr); 0 = the grid only
    max_trials: int = 0
    #: the contenders run when none are named (None: all)
    contenders: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Task:
    data: str
    model: str
    target: float
    recipe: dict[str, Any] = field(default_factory=dict)
    budgets: dict[str, Budget] = field(default_factory=dict)
    #: lower targets also reported (16K batches at this budget miss the main one)
    extra_targets: tuple[float, ...] = ()


_FMNIST_BUDGETS = {
    "quick": Budget((1024, 4096, 16384), epochs=2, seeds=1, grid_points=1),
    "full": Budget((1024, 4096, 16384), epochs=8, seeds=2, grid_points=3),
    # issue 14's study: batch sizes 16x apart, an extending search, 3 seeds
    "study": Budget(
        (1024, 4096, 16384), epochs=6, seeds=3, grid_points=3, max_trials=5, contenders=STUDY
    ),
    # the study's pipeline in minutes (a check, never a figure)
    "study-quick": Budget(
        (512, 2048),
        epochs=1,
        seeds=2,
        grid_points=2,
        max_trials=3,
        evals_per_epoch=1,
        train_limit=6144,
        test_limit=1024,
        validation_size=1024,
        contenders=("momentum", "sfadamw", "spngd-emp"),
    ),
}
TASKS: dict[str, Task] = {
    "fashion-mnist-cnn": Task(
        "fashion-mnist", "cnn", 0.85, budgets=_FMNIST_BUDGETS, extra_targets=(0.80,)
    ),
    "fashion-mnist-mlp": Task(
        "fashion-mnist", "mlp", 0.85, budgets=_FMNIST_BUDGETS, extra_targets=(0.80,)
    ),
    "cifar10-resnet20": Task(
        "cifar10",
        "resnet20",
        0.80,
        recipe={"crop_padding": 4, "flip": True},
        budgets={
            "tiny": Budget(
                (256,),
                epochs=1,
                seeds=1,
                grid_points=1,
                evals_per_epoch=1,
                train_limit=1024,
                test_limit=256,
                validation_size=256,
            ),
            "quick": Budget((4096, 16384), epochs=10, seeds=1, grid_points=1),
            # the GPU run of issue 16 (benchmarks/gpu/run.py): one lr per contender, the
            # centre of the CPU study's grid at batch 8192, a few minutes on an H200
            "gpu-short": Budget(
                (8192,),
                epochs=10,
                seeds=1,
                grid_points=1,
                evals_per_epoch=1,
                contenders=("momentum", "lamb", "spngd-emp", "nlcg-kfac"),
            ),
            "full": Budget((4096, 8192, 16384), epochs=60, seeds=2, grid_points=3),
        },
    ),
}


def lr_grid(contender: Contender, batch: int, points: int) -> tuple[float, ...]:
    """``points`` lrs factor 2 apart around the centre, moved by sqrt(batch / 8192)."""
    centre = contender.centre * math.sqrt(batch / REFERENCE_BATCH)
    offsets = [0] if points == 1 else [k - (points - 1) / 2 for k in range(points)]
    return tuple(float(f"{centre * 2.0**k:.4g}") for k in offsets)


def limited(dataset: ImageDataset, train: int | None, test: int | None) -> ImageDataset:
    """The first ``train``/``test`` images (a check of the plumbing, never a figure)."""
    if train is None and test is None:
        return dataset
    return replace(
        dataset,
        train_x=dataset.train_x[:train],
        train_y=dataset.train_y[:train],
        test_x=dataset.test_x[:test],
        test_y=dataset.test_y[:test],
    )


def base_config(task: Task, budget: Budget, args: argparse.Namespace) -> Config:
    return config_from_mapping(
        {
            "data": {
                "name": task.data,
                "data_dir": args.data_dir,
                "validation_size": budget.validation_size,
            },
            "model": {"name": task.model},
            "schedule": {"kind": "cosine", "warmup_epochs": 1.0},
            "recipe": task.recipe,
            "train": {
                "epochs": budget.epochs,
                "target_accuracy": task.target,
                "device": args.device,
                "progress": "never",
            },
        },
        origin="benchmarks/convergence.py",
    )


def steps_per_epoch(n_train: int, batch: int) -> int:
    return max(1, n_train // batch)


def _say(prefix: str, line: str) -> None:
    print(prefix + line, flush=True)


def run_contender(
    cfg: Config,
    dataset: ImageDataset,
    splits: Any,
    out: Path,
    contender: Contender,
    batch: int,
    budget: Budget,
    task: Task,
) -> dict[str, Any]:
    """Seed 0 over the lr search, the other seeds at the chosen lr; a JSON-ready summary."""
    n_train = int(splits[0].y.shape[0])
    every = max(1, steps_per_epoch(n_train, batch) // budget.evals_per_epoch)
    cfg = cfg.model_copy(
        update={
            "train": cfg.train.model_copy(update={"eval_every": every}),
            "compare": cfg.compare.model_copy(
                update={
                    "options": {contender.optimizer: contender.options},
                    "max_trials": budget.max_trials,
                    "seeds": tuple(range(1, budget.seeds)),
                }
            ),
        }
    )
    grid = lr_grid(contender, batch, budget.grid_points)
    load_before = os.getloadavg()[0]
    choice = run_grid(
        cfg,
        dataset,
        out / contender.label,
        contender.optimizer,
        batch,
        grid,
        resume=True,
        splits=splits,
        say=partial(_say, f"[{contender.label}]"),
    )
    row = summarise(
        contender,
        batch,
        grid,
        choice.runs,
        choice.chosen,
        choice.all_seeds,
        cfg,
        task.extra_targets,
        bound_hit=choice.bound_hit,
    )
    row["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    return row


def _steps(run: RunResult, target: float) -> int | None:
    """Steps to ``target`` of a run that finished (a diverged run reaches nothing)."""
    return run.steps_to(target) if run.status == "finished" else None


def _seconds(run: RunResult, target: float) -> float | None:
    """Training seconds (evaluation excluded) to the first evaluation at ``target``."""
    steps = _steps(run, target)
    if steps is None:
        return None
    return next(
        (float(r["wall_s"]) for r in run.history if r["step"] == steps and "wall_s" in r), None
    )


def summarise(
    contender: Contender,
    batch: int,
    grid: Sequence[float],
    grid_runs: Sequence[RunResult],
    chosen: RunResult | None,
    seeds: Sequence[RunResult],
    cfg: Config,
    extra_targets: Sequence[float] = (),
    *,
    bound_hit: str | None = None,
) -> dict[str, Any]:
    """One (contender, batch) cell: the lr search, the chosen lr, every seed at it, the
    spread, steps and training seconds to the target, the mean step time."""
    target = cfg.train.target_accuracy
    finished = [r for r in seeds if r.status == "finished"]
    tried = sorted(r.lr for r in grid_runs)
    return {
        "contender": contender.label,
        "optimizer": contender.optimizer,
        "options": contender.options,
        "centre_at_8192": contender.centre,
        "centre_origin": contender.origin,
        "batch_size": batch,
        "eval_every_steps": cfg.train.eval_every,
        "grid": list(grid),
        "grid_runs": [r.to_dict() for r in grid_runs],
        "grid_diverged": sum(r.status == "diverged" for r in grid_runs),
        "chosen_lr": chosen.lr if chosen else None,
        # at an edge of every lr tried (the search's bound was hit, or it did not extend)
        "chosen_at_edge": bool(chosen and len(tried) > 1 and chosen.lr in (tried[0], tried[-1])),
        "bound_hit": bound_hit,
        "trials": [
            {"lr": r.lr, "final_val_acc": r.last("val_acc"), "status": r.status}
            for r in sorted(grid_runs, key=lambda r: r.lr)
        ],
        "seeds": [
            r.to_dict() | {"steps_to_target": _steps(r, target), "history": r.history}
            for r in seeds
        ],
        "seeds_diverged": len(seeds) - len(finished),
        "final_test_acc": _spread([r.last("test_acc") for r in finished]),
        "steps_to_target": [_steps(r, target) for r in seeds],
        "seconds_to_target": [_seconds(r, target) for r in seeds],
        "step_ms": [1e3 * r.wall_s / r.steps if r.steps else None for r in seeds],
        "steps_to": {f"{t:g}": [_steps(r, t) for r in seeds] for t in (target, *extra_targets)},
    }


def _spread(values: Sequence[float]) -> dict[str, float | None]:
    good = [v for v in values if math.isfinite(v)]
    if not good:
        return {"mean": None, "min": None, "max": None}
    return {"mean": statistics.fmean(good), "min": min(good), "max": max(good)}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _accuracy_cell(r: dict[str, Any]) -> str:
    if r["chosen_lr"] is None:
        return f"all {len(r['grid'])} lrs diverged"
    acc = r["final_test_acc"]
    if acc["mean"] is None:
        text = "every seed diverged"
    else:
        text = f"{_pct(acc['mean'])} ({_pct(acc['min'])}-{_pct(acc['max'])})"
    text += f" lr {r['chosen_lr']:g}" + ("*" if r["chosen_at_edge"] else "")
    if r.get("grid_diverged"):
        text += f", {r['grid_diverged']}/{len(r['grid'])} lrs div"
    if r.get("seeds_diverged"):
        text += f", {r['seeds_diverged']}/{len(r['seeds'])} seeds div"
    return text


def _steps_cell(r: dict[str, Any], key: str | None = None) -> str:
    if r["chosen_lr"] is None:
        return "diverged"
    marks = []
    per_seed = r["steps_to"][key] if key is not None and "steps_to" in r else r["steps_to_target"]
    for seed, steps in zip(r["seeds"], per_seed, strict=True):
        marks.append(
            "div" if seed["status"] != "finished" else "-" if steps is None else str(steps)
        )
    every = r.get("eval_every_steps")
    return " / ".join(marks) + ("" if every is None else f" (every {every})")


def _time_cell(r: dict[str, Any]) -> str:
    if r["chosen_lr"] is None:
        return "diverged"
    seconds = _median(r.get("seconds_to_target", []))
    step = [v for v in r.get("step_ms", []) if v is not None]
    step_text = f"{statistics.median(step):.0f} ms/step" if step else "-"
    return f"{'-' if seconds is None else f'{seconds:.0f} s'} ({step_text})"


def _grid_table(
    labels: Sequence[str],
    batches: Sequence[int],
    cell: dict[tuple[str, int], dict[str, Any]],
    text: Callable[[dict[str, Any]], str],
) -> list[str]:
    """Markdown rows: one per contender, one column per batch size."""
    lines = [
        "| optimizer | " + " | ".join(f"b={b}" for b in batches) + " |",
        "|---|" + "---|" * len(batches),
    ]
    for label in labels:
        cells = [text(cell[label, b]) if (label, b) in cell else "" for b in batches]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    ctx, rows, target = results["context"], results["results"], results["target_accuracy"]
    batches = sorted({r["batch_size"] for r in rows})
    labels = list(dict.fromkeys(r["contender"] for r in rows))
    cell = {(r["contender"], r["batch_size"]): r for r in rows}
    lines = [f"# {ctx['title']}", ""]
    lines += [f"- {k}: {v}" for k, v in ctx.items() if k not in ("title", "machine")]
    m = ctx["machine"]
    lines += [f"- machine: {m['cpu_model']}, {m['cpus_available']} cores, torch {m['torch']}"]
    lines += [
        "",
        "Final test top-1 (%), mean over the seeds (min-max) at the chosen lr; "
        "`*` = the chosen lr is at the grid's edge; `k/n lrs div` = grid runs (seed 0) that "
        "diverged; `k/n seeds div` = seeds that diverged at the chosen lr (left out of the "
        "mean).",
        "",
        *_grid_table(labels, batches, cell, _accuracy_cell),
    ]
    keys = list(rows[0].get("steps_to", {f"{target:g}": None})) if rows else []
    for key in keys:
        lines += [
            "",
            f"Steps to {100 * float(key):g}% test top-1 per seed at the chosen lr (`-` = not "
            "reached within the budget, `div` = diverged); the test set is evaluated every N "
            "steps (in brackets), so a count is the first evaluation at or above the target:",
            "",
            *_grid_table(labels, batches, cell, partial(_steps_cell, key=key)),
        ]
    timed = any("seconds_to_target" in r for r in rows)  # results before issue 14 lack it
    lines += (
        []
        if not timed
        else [
            "",
            "Median training seconds to the target over the seeds (evaluation excluded; `-` = a "
            "seed missed it) and the mean step time in ms, measured in the same invocation on the "
            "same machine, contenders run back to back:",
            "",
            *_grid_table(labels, batches, cell, _time_cell),
        ]
    )
    for key, critical in results.get("critical_batch", {}).items():
        lines += [
            "",
            f"Critical batch size for {100 * float(key):g}% test top-1 (where the mean steps to "
            "it exceed perfect linear scaling from the smallest batch by 20%; `>=` = never "
            "exceeded up to the largest batch measured; `-` = the smallest batch missed it):",
            "",
            "| optimizer | critical batch | steps / perfect per batch |",
            "|---|---|---|",
        ]
        for label, c in critical.items():
            value = c["critical_batch"]
            text = "-" if value is None else ((">= " if c["lower_bound"] else "") + f"{value:.0f}")
            excess = " / ".join(
                "missed" if e is None else f"{e:.2f}" for e in c["excess_over_perfect"]
            )
            lines.append(f"| {label} | {text} | {excess} |")
    lines += ["", "Learning-rate grid centres (at batch 8192; x sqrt(B/8192) per batch):", ""]
    lines += ["| optimizer | centre | where the centre comes from |", "|---|---|---|"]
    for label in labels:
        r = next(r for r in rows if r["contender"] == label)
        lines.append(f"| {label} | {r['centre_at_8192']:g} | {r['centre_origin']} |")
    return "\n".join(lines) + "\n"


def scaling_curves(
    rows: Sequence[dict[str, Any]], key: str | None = None
) -> dict[str, list[tuple[int, int | None]]]:
    """Per contender: (batch, mean steps to target over seeds, or None if any seed missed);
    ``key``: one of the ``steps_to`` targets (default: the task's target)."""
    curves: dict[str, list[tuple[int, int | None]]] = {}
    for r in rows:
        steps = r["steps_to_target"] if key is None else r["steps_to"][key]
        value = None
        if steps and all(s is not None for s in steps):
            value = round(statistics.fmean(steps))
        curves.setdefault(r["contender"], []).append((r["batch_size"], value))
    return curves


def critical_batches(
    rows: Sequence[dict[str, Any]], key: str | None = None
) -> dict[str, dict[str, Any]]:
    """Per contender: the critical batch size (20% over perfect scaling from its smallest
    batch) from its mean steps to the target (``key``: one of the ``steps_to`` targets)
    over seeds (a batch where a seed missed counts as missed)."""
    out: dict[str, dict[str, Any]] = {}
    for label, points in scaling_curves(rows, key).items():
        if len(points) < 2:
            continue
        cb = critical_batch_size(points)
        out[label] = {
            "critical_batch": cb.value,
            "lower_bound": cb.lower_bound,
            "excess_over_perfect": [None if math.isinf(e) else e for e in cb.excess],
            "points": points,
        }
    return out


def _median(values: Sequence[float | None]) -> float | None:
    """The median over seeds, or None when any seed missed."""
    if not values or any(v is None for v in values):
        return None
    return float(statistics.median(v for v in values if v is not None))


def plot_sensitivity(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Final validation accuracy of every trial against its lr, one panel per batch size."""
    batches = sorted({r["batch_size"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.2 * len(batches), 4), dpi=110)
    axes = list(axes) if len(batches) > 1 else [axes]
    for ax, batch in zip(axes, batches, strict=True):
        for r in rows:
            if r["batch_size"] != batch:
                continue
            pts = [
                (t["lr"], 100 * t["final_val_acc"])
                for t in r["trials"]
                if t["status"] == "finished" and math.isfinite(t["final_val_acc"])
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=r["contender"])
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(f"batch {batch}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final validation top-1 (%)")
    axes[-1].legend(fontsize=6, ncol=2)
    fig.suptitle(f"sensitivity to the learning rate: {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_time_to_target(
    rows: Sequence[dict[str, Any]], path: Path, target: float, title: str
) -> Path:
    """Median training seconds to the target against batch size (missing: not reached)."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for label in dict.fromkeys(r["contender"] for r in rows):
        pts = [
            (r["batch_size"], _median(r["seconds_to_target"]))
            for r in rows
            if r["contender"] == label
        ]
        pts = [(b, t) for b, t in pts if t is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"training seconds to {100 * target:g}% test top-1 (median over seeds)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_accuracy_vs_batch(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label in dict.fromkeys(r["contender"] for r in rows):
        pts = [
            (r["batch_size"], r["final_test_acc"])
            for r in rows
            if r["contender"] == label and r["final_test_acc"]["mean"] is not None
        ]
        if not pts:
            continue
        xs = [b for b, _ in pts]
        mean = [100 * a["mean"] for _, a in pts]
        low = [100 * (a["mean"] - a["min"]) for _, a in pts]
        high = [100 * (a["max"] - a["mean"]) for _, a in pts]
        ax.errorbar(xs, mean, yerr=[low, high], marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("final test top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return str(device)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--task", choices=sorted(TASKS), default="fashion-mnist-cnn")
    p.add_argument("--budget", default="quick", help="quick | full | tiny (cifar10-resnet20)")
    p.add_argument("--contenders", nargs="+", choices=sorted(CONTENDERS), default=None)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=None)
    p.add_argument("--data-dir", default=None, help="where the dataset is (default: searched)")
    p.add_argument("--cache-dir", default=None, help="where decoded arrays are cached")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", type=Path, default=Path("runs/convergence"), help="run folders")
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    p.add_argument(
        "--tag",
        default=None,
        help="results file suffix for a part of a split study (e.g. a contender)",
    )
    args = p.parse_args(argv)
    task = TASKS[args.task]
    if args.budget not in task.budgets:
        p.error(f"--budget {args.budget!r}: {args.task} has {', '.join(task.budgets)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tune_malloc()
    task, budget = TASKS[args.task], TASKS[args.task].budgets[args.budget]
    if args.batch_sizes:
        budget = replace(budget, batch_sizes=tuple(args.batch_sizes))
    contenders = [CONTENDERS[c] for c in (args.contenders or budget.contenders or CONTENDERS)]
    cfg = base_config(task, budget, args)
    loaded = load_dataset(task.data, args.data_dir, cache_dir=args.cache_dir)
    if not isinstance(loaded, ImageDataset):
        raise SystemExit(f"{task.data} is not an image dataset")
    dataset = limited(loaded, budget.train_limit, budget.test_limit)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    splits = prepare_splits(dataset, cfg.data.validation_size, device)
    out = args.out / f"{args.task}-{args.budget}"
    started = time.perf_counter()
    rows = [
        run_contender(cfg, dataset, splits, out, c, batch, budget, task)
        for batch in budget.batch_sizes
        for c in contenders
    ]
    wall = time.perf_counter() - started
    bench = "B3" if args.task == "cifar10-resnet20" else "B2/B5"
    title = (
        f"{bench} convergence: {dataset.display_name}, {task.model}, budget {args.budget} "
        f"({budget.epochs:g} epochs)"
    )
    command = "python benchmarks/convergence.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = {
        "context": {
            "title": title,
            "command": command,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_info(torch.get_num_threads()),
            "device": _device_name(device),
            "dataset": dataset.display_name,
            **({"data_note": dataset.notes} if dataset.notes else {}),
            "model": task.model,
            "recipe": task.recipe or "none",
            "budget": args.budget,
            "epochs": budget.epochs,
            "seeds": budget.seeds,
            "grid": f"{budget.grid_points} lrs factor 2 apart around each centre x sqrt(B/8192)"
            + (
                f", extended by factor 2 past an edge while the best is there, at most "
                f"{budget.max_trials} trials"
                if budget.max_trials > budget.grid_points
                else ""
            ),
            "schedule": "1 epoch linear warm-up, cosine to 0; weight decay 5e-4 on weights",
            "selection": "lr by last validation accuracy of seed 0 "
            f"({int(splits[1].y.shape[0]) if splits[1] is not None else 0} held-out images)",
            "train_images": int(splits[0].y.shape[0]),
            "test_images": int(splits[2].y.shape[0]),
            "steps_per_epoch": {
                b: steps_per_epoch(int(splits[0].y.shape[0]), b) for b in budget.batch_sizes
            },
            "wall_s (this invocation; reused runs cost nothing)": round(wall, 1),
        },
        "target_accuracy": task.target,
        "results": rows,
        "critical_batch": {
            f"{t:g}": critical_batches(rows, f"{t:g}") for t in (task.target, *task.extra_targets)
        },
    }
    args.results.mkdir(parents=True, exist_ok=True)
    subset = (
        f"_{args.tag}" if args.tag else "_subset" if args.contenders or args.batch_sizes else ""
    )
    budget_tag = "" if args.budget == "full" else f"_{args.budget}"
    stem = args.results / f"convergence_{args.task}{budget_tag}{subset}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    table = markdown(results)
    stem.with_suffix(".md").write_text(table)
    plot_accuracy_vs_batch(rows, stem.parent / f"{stem.name}_accuracy.png", title)
    for t in (task.target, *task.extra_targets):
        suffix = "" if t == task.target else f"_{round(100 * t)}"
        plot_scaling(
            scaling_curves(rows, f"{t:g}"),
            stem.parent / f"{stem.name}_scaling{suffix}.png",
            target=t,
            title=f"steps to {100 * t:g}% test top-1, {dataset.display_name}, {task.model}",
        )
    plot_sensitivity(rows, stem.parent / f"{stem.name}_sensitivity.png", title)
    plot_time_to_target(rows, stem.parent / f"{stem.name}_time.png", task.target, title)
    print(table)
    print(f"written: {stem}.json/.md and PNGs ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
