"""Tables and result files of ``compare`` and ``sweep``: Markdown, JSON and the PNG plots.

The Markdown file says how the numbers were made (command, dataset, model, batch, budget,
how learning rates were chosen, machine, date), so a table never travels without its
context. Not here: running anything (``experiments.py``).
"""

from __future__ import annotations

import json
import math
import platform
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from bigbatch.train.batches import validation_count
from bigbatch.train.config import Config
from bigbatch.train.data import Dataset, TextDataset
from bigbatch.train.experiments import Choice
from bigbatch.train.machine import cpu_model
from bigbatch.train.optimizers import optimizer_spec
from bigbatch.train.plots import plot_accuracy, plot_scaling
from bigbatch.train.tuning import spread

__all__ = ["compare_table", "sweep_table", "write_compare", "write_sweep"]


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%" if math.isfinite(value) else "-"


def compare_table(choices: Sequence[Choice], target: float) -> str:
    """One row per optimizer: its chosen run's accuracy, steps to target and time."""
    head = (
        "| optimizer | lr (chosen of grid) | final test acc | best test acc | "
        f"steps to {_pct(target)} | train time | diverged |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for c in choices:
        grid = "/".join(f"{r.lr:g}" for r in c.runs)
        diverged = sum(r.status == "diverged" for r in c.runs)
        label = optimizer_spec(c.optimizer).label
        if c.chosen is None:
            rows.append(f"| {label} | none of {grid} | - | - | - | - | {diverged}/{len(c.runs)} |")
            continue
        r = c.chosen
        steps = r.steps_to(target)
        bound = f" (search bound hit at the {c.bound_hit} edge)" if c.bound_hit else ""
        final = _pct(r.last("test_acc"))
        if c.seed_runs:
            s = spread([run.last("test_acc") for run in c.all_seeds])
            final += f" (seeds: {_pct(s['mean'])} ± {_pct(s['std'])}, n={s['n']})"
        rows.append(
            f"| {label} | {r.lr:g} of {grid}{bound} | {final} | "
            f"{_pct(r.best('test_acc'))} | {steps if steps is not None else 'not reached'} | "
            f"{r.wall_s:.0f} s | {diverged}/{len(c.runs)} |"
        )
    return head + "\n".join(rows) + "\n"


def sweep_table(choices: Sequence[Choice], target: float) -> str:
    batches = sorted({c.batch_size for c in choices})
    names = list(dict.fromkeys(c.optimizer for c in choices))
    head = "| optimizer | " + " | ".join(f"b={b}" for b in batches) + " |\n"
    head += "|---|" + "---|" * len(batches) + "\n"
    rows = []
    for name in names:
        cells = []
        for b in batches:
            c = next(c for c in choices if c.optimizer == name and c.batch_size == b)
            steps = _best_steps(c, target)
            cells.append(str(steps) if steps is not None else "-")
        rows.append(f"| {optimizer_spec(name).label} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def _best_steps(c: Choice, target: float) -> int | None:
    """Fewest steps to target over the learning-rate grid (the B5 convention)."""
    reached = [s for r in c.runs if r.status == "finished" and (s := r.steps_to(target))]
    return min(reached) if reached else None


def _context(cfg: Config, command: str, dataset: Dataset) -> dict[str, Any]:
    if isinstance(dataset, TextDataset):
        held_out = dataset.val_end - dataset.train_end
        held = f"the text's validation part, {held_out} characters, not trained on"
    else:
        held_out = validation_count(cfg.data.validation_size, len(dataset.train_y))
        held = f"{held_out} training images held out, not trained on"
    return {
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_model()} ({platform.machine()})",
        "cpu_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "dataset": dataset.display_name,
        "data_source": dataset.source,
        **({"note": dataset.notes} if dataset.notes else {}),
        "model": cfg.model.name,
        "epochs": cfg.train.epochs,
        "selection": (
            f"learning rate chosen by last validation accuracy ({held})"
            if cfg.compare.select_by == "validation" and held_out
            else "learning rate chosen by last TEST accuracy (no validation split)"
        ),
    }


def _header(title: str, ctx: dict[str, Any]) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- {key}: {value}" for key, value in ctx.items()]
    return "\n".join(lines) + "\n\n"


def write_compare(
    choices: Sequence[Choice], cfg: Config, out_dir: Path, *, command: str, dataset: Dataset
) -> tuple[Path, Path, str]:
    """Write results.md, results.json and accuracy.png; return (table, plot, table text)."""
    target = cfg.train.target_accuracy
    table = compare_table(choices, target)
    ctx = _context(cfg, command, dataset) | {"batch_size": cfg.train.batch_size}
    title = (
        f"bigbatch compare: {dataset.display_name}, {cfg.model.name}, batch {cfg.train.batch_size}"
    )
    md = out_dir / "results.md"
    md.write_text(_header(title, ctx) + table)
    (out_dir / "results.json").write_text(
        json.dumps(
            {
                "context": ctx,
                "target_accuracy": target,
                "optimizers": [
                    {
                        "optimizer": c.optimizer,
                        "chosen": c.chosen.to_dict() if c.chosen else None,
                        "bound_hit": c.bound_hit,
                        "runs": [r.to_dict() | {"history": r.history} for r in c.runs],
                        "seed_runs": [r.to_dict() | {"history": r.history} for r in c.seed_runs],
                        "final_test_acc_over_seeds": spread(
                            [r.last("test_acc") for r in c.all_seeds]
                        ),
                    }
                    for c in choices
                ],
            },
            indent=1,
        )
        + "\n"
    )
    chosen = {
        f"{optimizer_spec(c.optimizer).label} (lr {c.chosen.lr:g})": c.chosen
        for c in choices
        if c.chosen is not None
    }
    png = plot_accuracy(chosen, out_dir / "accuracy.png", target=target, title=title)
    return md, png, table


def write_sweep(
    choices: Sequence[Choice], cfg: Config, out_dir: Path, *, command: str, dataset: Dataset
) -> tuple[Path, Path, str]:
    target = cfg.train.target_accuracy
    table = sweep_table(choices, target)
    ctx = _context(cfg, command, dataset) | {"lr_scaling": cfg.sweep.lr_scaling}
    title = (
        f"bigbatch sweep: steps to {_pct(target)} test accuracy, {dataset.display_name}, "
        f"{cfg.model.name}"
    )
    md = out_dir / "results.md"
    md.write_text(_header(title, ctx) + table)
    curves = {
        optimizer_spec(name).label: [
            (c.batch_size, _best_steps(c, target)) for c in choices if c.optimizer == name
        ]
        for name in dict.fromkeys(c.optimizer for c in choices)
    }
    (out_dir / "results.json").write_text(
        json.dumps({"context": ctx, "target_accuracy": target, "steps_to_target": curves}, indent=1)
        + "\n"
    )
    png = plot_scaling(curves, out_dir / "scaling.png", target=target, title=title)
    return md, png, table
