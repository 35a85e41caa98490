"""``compare`` and ``sweep``: grids of runs on shared data, best learning rates, reports.

Every run of a grid gets its own folder (``<out>/<batch>/<optimizer>/lr<lr>/``) with its
config, metrics, checkpoint and summary; the data are loaded and normalised once and shared.
Each optimizer's learning rate is chosen by the last validation accuracy (or the last test
accuracy with ``compare.select_by = "test"``, which the report then says); a diverged run is
never chosen. With ``resume``, finished runs are read back from their folders, interrupted
ones continue from their checkpoints, so a long sweep survives interruptions. Under
``torchrun`` every run of the grid is data-parallel over the same processes; rank 0 decides
which runs are finished (from its folders) and tells the others.

Not here: one run (``loop.py``), drawing (``plots.py``), tables (``report.py``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bigbatch.train.batches import Split, TextWindows, prepare_splits, prepare_text
from bigbatch.train.checkpoint import resumable_step
from bigbatch.train.config import Config, OptimizerConfig
from bigbatch.train.data import Dataset, TextDataset
from bigbatch.train.dist_env import (
    check_distributed,
    context,
    from_main,
    init_from_env,
    local_device,
)
from bigbatch.train.loop import TrainingRun, resolve_device
from bigbatch.train.metrics import read_metrics
from bigbatch.train.optimizers import optimizer_spec
from bigbatch.train.results import RunResult
from bigbatch.train.tuning import search_lr

__all__ = ["Choice", "lr_grid", "run_compare", "run_grid", "run_sweep", "scaled_grid"]

Say = Callable[[str], None]


@dataclass
class Choice:
    """One optimizer at one batch size: every run of its search and the chosen one."""

    optimizer: str
    batch_size: int
    runs: list[RunResult]
    chosen: RunResult | None
    #: "low" / "high": the search's trial bound was hit with the best at that edge
    bound_hit: str | None = None
    #: the chosen learning rate's runs with the other seeds (compare.seeds)
    seed_runs: list[RunResult] = field(default_factory=list)

    @property
    def all_seeds(self) -> list[RunResult]:
        """The chosen run and its other-seed repeats."""
        return ([self.chosen] if self.chosen is not None else []) + self.seed_runs


def lr_grid(cfg: Config, optimizer: str) -> tuple[float, ...]:
    return cfg.compare.lrs.get(optimizer) or optimizer_spec(optimizer).default_lrs


def scaled_grid(cfg: Config, optimizer: str, batch_size: int) -> tuple[float, ...]:
    ratio = batch_size / cfg.train.batch_size
    factor = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[cfg.sweep.lr_scaling]
    return tuple(lr * factor for lr in lr_grid(cfg, optimizer))


def _run_config(
    cfg: Config, optimizer: str, lr: float, batch_size: int, seed: int | None = None
) -> Config:
    base = cfg.optimizer
    options = cfg.compare.options.get(optimizer, {})
    opt = OptimizerConfig(name=optimizer, lr=lr, weight_decay=base.weight_decay, options=options)
    update: dict[str, Any] = {"batch_size": batch_size}
    if seed is not None:
        update["seed"] = seed
    train = cfg.train.model_copy(update=update)
    return cfg.model_copy(update={"optimizer": opt, "train": train})


def _finished(run_dir: Path, launch: str | None) -> RunResult | None:
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return None
    data = json.loads(summary.read_text())
    if launch is not None and data.get("launch_id") != launch:
        return None  # from an earlier job in the same folder: train it again
    return RunResult(
        name=run_dir.name,
        optimizer=data["optimizer"],
        lr=data["lr"],
        batch_size=data["batch_size"],
        steps=data["steps"],
        history=read_metrics(run_dir / "metrics.jsonl"),
        status=data["status"],
        wall_s=data["wall_s"],
        micro_batch_size=data.get("micro_batch_size", 0),
    )


def _score(run: RunResult, select_by: str) -> float:
    if run.status != "finished":
        return -math.inf
    value = run.last("val_acc" if select_by == "validation" else "test_acc")
    return value if math.isfinite(value) else -math.inf


def run_grid(
    cfg: Config,
    dataset: Dataset,
    out_dir: Path,
    optimizer: str,
    batch_size: int,
    lrs: tuple[float, ...],
    *,
    resume: bool,
    splits: tuple[Split | TextWindows, Split | None, Split],
    say: Say,
    launch: str | None = None,
) -> Choice:
    """Train ``optimizer`` at ``batch_size`` for every lr, extended past an edge up to
    ``compare.max_trials`` (:func:`~bigbatch.train.tuning.search_lr`); pick the best
    finished run by validation accuracy, then repeat it with ``compare.seeds``.

    With ``resume``, finished runs are read back and interrupted ones continued; ``launch``
    (torchrun's job id, after a restart) limits that to the files this job wrote.
    """
    select_by = cfg.compare.select_by
    if select_by == "validation" and splits[1] is None:
        select_by = "test"
    ctx = context()
    base = out_dir / f"b{batch_size}" / optimizer

    def train(lr: float, seed: int | None) -> RunResult:
        run_dir = base / f"lr{lr:g}" / ("" if seed is None else f"seed{seed}")
        done = from_main(ctx, partial(_finished, run_dir, launch)) if resume else None
        if done is None:
            tag = "" if seed is None else f" seed={seed}"
            run = TrainingRun(
                _run_config(cfg, optimizer, lr, batch_size, seed),
                dataset,
                run_dir,
                name=f"{optimizer} lr={lr:g} b={batch_size}{tag}",
                splits=splits,
            )
            own = partial(resumable_step, run.checkpoint_path, launch)
            started = resume and from_main(ctx, own) is not None
            done = run.run(resume=started)
        say(
            f"  {optimizer:>9} lr={lr:<8g} batch={batch_size:<6} {done.status:>8}  "
            f"test acc {done.last('test_acc'):.4f}  ({done.wall_s:.0f} s)"
            + ("" if seed is None else f"  seed {seed}")
        )
        return done

    def trial(lr: float) -> tuple[float, RunResult]:
        done = train(lr, None)
        return _score(done, select_by), done

    search = search_lr(
        lrs,
        trial,
        higher_is_better=True,
        max_trials=max(cfg.compare.max_trials, len(set(lrs))),
        factor=cfg.compare.search_factor,
    )
    chosen = search.best
    seeds = [s for s in dict.fromkeys(cfg.compare.seeds) if s != cfg.train.seed]
    seed_runs = [train(chosen.lr, s) for s in seeds] if chosen is not None else []
    return Choice(
        optimizer,
        batch_size,
        [r for _, _, r in search.trials],
        chosen,
        bound_hit=search.bound_hit,
        seed_runs=seed_runs,
    )


def _check_world(cfg: Config, batch_sizes: list[int]) -> None:
    """Fail before any training if the grid cannot run on this many processes."""
    check_distributed(
        init_from_env(cfg.train.device).world_size,
        batch_sizes=batch_sizes,
        micro_batch_size=cfg.train.micro_batch_size,
        optimizers=cfg.compare.optimizers,
        options=cfg.compare.options,
        options_key="compare.options.{name}",
    )


def _device(cfg: Config) -> torch.device:
    return local_device(resolve_device(cfg.train.device), context())


def _check_names(cfg: Config) -> None:
    for name in cfg.compare.optimizers:
        optimizer_spec(name, "compare.optimizers")  # fail before any training


def _run_plan(
    cfg: Config,
    dataset: Dataset,
    out_dir: Path,
    plan: list[tuple[str, int, tuple[float, ...]]],
    *,
    resume: bool,
    say: Say,
    launch: str | None,
) -> list[Choice]:
    """One grid per (optimizer, batch size, lrs) of ``plan``, on splits prepared once."""
    _check_world(cfg, sorted({batch for _, batch, _ in plan}))
    splits: Any
    if isinstance(dataset, TextDataset):
        splits = prepare_text(dataset, cfg.data.context, _device(cfg))
    else:
        splits = prepare_splits(dataset, cfg.data.validation_size, _device(cfg))
    return [
        run_grid(
            cfg,
            dataset,
            out_dir,
            name,
            batch,
            lrs,
            resume=resume,
            splits=splits,
            say=say,
            launch=launch,
        )
        for name, batch, lrs in plan
    ]


def run_compare(
    cfg: Config,
    dataset: Dataset,
    out_dir: Path,
    *,
    resume: bool,
    say: Say,
    launch: str | None = None,
) -> list[Choice]:
    """Every optimizer of ``compare.optimizers`` at ``train.batch_size``, each over its grid.

    ``launch``: see :func:`run_grid`."""
    _check_names(cfg)
    batch = cfg.train.batch_size
    plan = [(name, batch, lr_grid(cfg, name)) for name in cfg.compare.optimizers]
    started = time.perf_counter()
    choices = _run_plan(cfg, dataset, out_dir, plan, resume=resume, say=say, launch=launch)
    runs = sum(len(c.runs) for c in choices)
    say(f"compare: {runs} runs in {time.perf_counter() - started:.0f} s")
    return choices


def run_sweep(
    cfg: Config,
    dataset: Dataset,
    out_dir: Path,
    *,
    resume: bool,
    say: Say,
    launch: str | None = None,
) -> list[Choice]:
    """Optimizers x batch sizes, each with its lr grid scaled by ``sweep.lr_scaling``."""
    _check_names(cfg)
    plan = [
        (name, batch, scaled_grid(cfg, name, batch))
        for batch in cfg.sweep.batch_sizes
        for name in cfg.compare.optimizers
    ]
    return _run_plan(cfg, dataset, out_dir, plan, resume=resume, say=say, launch=launch)
