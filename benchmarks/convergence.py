"""Benchmarks B2, B3 and B5 and issue 14's study: accuracy, steps and seconds to target
across batch sizes, every contender tuned the same way.

Every contender (momentum SGD, LARS, LAMB, Adam(W), SOAP, Shampoo, PSGD Kron, Muon,
Schedule-Free AdamW, ASDL's K-FAC, NLCG with each preconditioner, SP-NGD) is trained by the
harness (:func:`bigbatch.train.experiments.run_grid`, the loop ``bigbatch compare`` uses) on the
same data, model, epoch budget, schedule (linear warm-up, then cosine to 0), weight decay
and evaluation points, at each batch size. The protocol is the same for all:

- a learning-rate grid, factor 2 apart, around each contender's centre (given at the
  task's reference batch and moved to each batch size by sqrt(B / reference)), extended
  past an edge while the best is there, up to the budget's trial bound
  (:func:`bigbatch.train.tuning.search_lr`);
- seed 0 runs the search; the lr with the best last *validation* accuracy (data held out of
  the training set) is chosen; every other seed runs at that lr;
- reported: the final test metric over the seeds (mean, min, max), steps and training
  seconds to the task's targets per seed, the step time, the load average, whether the
  chosen lr is at an edge of what was tried, and each contender's critical batch size.

Tasks: ``fashion-mnist-cnn`` and ``fashion-mnist-mlp`` (CPU); ``kjv-gpt`` (the
character-level transformer LM on the KJV text, batch sizes in windows of 64 characters,
target on test token accuracy); ``cifar10-resnet20`` (B3, meant for a GPU; ``tiny`` runs it
on a CPU in seconds on a slice). Budgets: ``quick``, ``full``, ``study`` (issue 14: batch
sizes 16x apart, extending search, 3 seeds) and ``study-quick`` (the study's pipeline in
minutes). Finished runs are kept under ``--out`` and reused on the next call, so an
interrupted background run continues where it stopped; a study split by ``--contenders``
and ``--tag`` is put together with ``--merge``.

Run from the project's root (``python benchmarks/convergence.py --help``); results go to
``<results>/convergence_<task>[_<budget>][_<tag>].{json,md}`` with PNGs beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from cycler import cycler

from bigbatch.train.batches import Split, prepare_splits, prepare_text
from bigbatch.train.config import Config, config_from_mapping
from bigbatch.train.critical_batch import critical_batch_size
from bigbatch.train.data import Dataset, ImageDataset, TextDataset, load_dataset
from bigbatch.train.experiments import run_grid
from bigbatch.train.malloc_tuning import tune_malloc
from bigbatch.train.plots import plot_scaling
from bigbatch.train.results import RunResult

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, machine, utc_now, write_results

# 12+ contenders: ten colours, solid then dashed, so no two curves look alike
matplotlib.rcParams["axes.prop_cycle"] = cycler(linestyle=["-", "--"]) * cycler(
    color=plt.get_cmap("tab10").colors
)

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
        # the peer K-FAC (ASDL, a benchmark extra): SP-NGD's momentum and damping
        Contender("asdl-kfac", "asdl-kfac", {}, 1e-2, "SP-NGD's centre (not scanned)"),
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
    "asdl-kfac",
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
    #: the batch the contenders' lr centres are given at (moved by sqrt(B / this))
    reference_batch: int = REFERENCE_BATCH
    #: the model's options (width; depth and heads for gpt)
    model_options: dict[str, Any] = field(default_factory=dict)
    #: text: characters per window (0 for images)
    context: int = 0
    #: text: the file inside --data-dir (--data-dir may also be the file itself)
    data_file: str | None = None
    #: text: validation and test windows kept (the first ones of each part); None = all
    eval_windows: int | None = None
    warmup_epochs: float = 1.0
    #: None: the harness's default (5e-4 on weights)
    weight_decay: float | None = None
    #: contenders whose options or centres differ on this task (same labels)
    contenders: dict[str, Contender] = field(default_factory=dict)

    @property
    def is_text(self) -> bool:
        return self.data == "text"

    @property
    def metric(self) -> str:
        return "test token accuracy" if self.is_text else "test top-1"

    def contender(self, label: str) -> Contender:
        return self.contenders.get(label) or CONTENDERS[label]


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
_LM_PROBE = "lm.py's 60-step probe at batch 512 (benchmarks/results/lm_kjv.json)"
_LM_CONTENDERS = {
    c.label: c
    for c in (
        Contender("adamw", "adamw", {}, 2e-3, _LM_PROBE),
        Contender("lamb", "lamb", {}, 0.04, _LM_PROBE),
        Contender("soap", "soap", {}, 2e-3, "AdamW's centre (not scanned)"),
        Contender("muon", "muon", {}, 0.02, _DEFAULT),
        Contender(
            "spngd-emp",
            "spngd",
            {"fisher": "empirical", "weight_rescale": False, "damping": 1e-3},
            0.015,
            _LM_PROBE + "; weight rescaling off (it is for BatchNorm networks)",
        ),
        Contender(
            "nlcg-kfac",
            "nlcg",
            {"preconditioner": "kfac", "kfac_damping": 1e-3},
            0.015,
            _LM_PROBE,
        ),
        # not probed on the LM: the CNN centre moved by AdamW's LM / CNN ratio (2e-3 / 3e-3)
        *(
            replace(
                CONTENDERS[label],
                centre=float(f"{CONTENDERS[label].centre * 2e-3 / 3e-3:.4g}"),
                origin="CNN centre x AdamW's LM/CNN centre ratio (2e-3 / 3e-3; not probed)",
            )
            for label in ("momentum", "lars", "shampoo", "kron", "sfadamw", "nlcg-bfgs")
        ),
    )
}
#: the LM study's contenders: the CNN study's but ASDL's K-FAC, which refuses the model
#: (asdfghjkl 0.1a5: "Not supported module" on torch's MultiheadAttention projection)
LM_STUDY = tuple(c for c in STUDY if c != "asdl-kfac")
_LM_BUDGETS = {
    # batch sizes in sequences of 64 characters, 16x apart; half an epoch of tokens each
    "study": Budget(
        (32, 128, 512),
        epochs=0.5,
        seeds=3,
        grid_points=3,
        max_trials=5,
        evals_per_epoch=20,
        contenders=LM_STUDY,
    ),
    # the pipeline in a minute (a check, never a figure)
    "study-quick": Budget(
        (16, 64),
        epochs=0.002,
        seeds=2,
        grid_points=2,
        max_trials=3,
        evals_per_epoch=1000,
        contenders=("adamw", "spngd-emp"),
    ),
}
TASKS: dict[str, Task] = {
    "kjv-gpt": Task(
        "text",
        "gpt",
        0.35,
        budgets=_LM_BUDGETS,
        extra_targets=(0.30, 0.40),
        reference_batch=512,
        model_options={"width": 64, "depth": 2, "heads": 4},
        context=64,
        data_file="kjv/kjv.txt.gz",
        eval_windows=512,
        warmup_epochs=0.05,
        weight_decay=0.0,
        contenders=_LM_CONTENDERS,
    ),
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


def lr_grid(
    contender: Contender, batch: int, points: int, reference: int = REFERENCE_BATCH
) -> tuple[float, ...]:
    """``points`` lrs factor 2 apart around the centre, moved by sqrt(batch / reference)."""
    centre = contender.centre * math.sqrt(batch / reference)
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
    data: dict[str, Any] = {"name": task.data, "data_dir": data_location(task, args.data_dir)}
    if task.is_text:
        data["context"] = task.context
    else:
        data["validation_size"] = budget.validation_size
    optimizer = {} if task.weight_decay is None else {"weight_decay": task.weight_decay}
    return config_from_mapping(
        {
            "data": data,
            "model": {"name": task.model, **task.model_options},
            "optimizer": optimizer,
            "schedule": {"kind": "cosine", "warmup_epochs": task.warmup_epochs},
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


def data_location(task: Task, data_dir: str | None) -> str | None:
    """Images: the folder as given. Text: ``data_dir`` itself when it is a file, else the
    task's file inside it."""
    if not task.is_text or data_dir is None or Path(data_dir).is_file():
        return data_dir
    assert task.data_file is not None
    return str(Path(data_dir) / task.data_file)


def load_splits(
    task: Task, budget: Budget, cfg: Config, args: argparse.Namespace, device: torch.device
) -> tuple[Dataset, Any, Callable[[int], int]]:
    """The dataset, its (train, validation, test) splits and steps per epoch by batch size
    (text: one pass over the training characters in windows of ``context``)."""
    loaded = load_dataset(task.data, cfg.data.data_dir, cache_dir=args.cache_dir)
    if task.is_text:
        if not isinstance(loaded, TextDataset):
            raise SystemExit(f"{task.data} is not a text dataset")
        train, val, test = prepare_text(loaded, task.context, device)
        keep = task.eval_windows
        splits = (train, Split(val.x[:keep], val.y[:keep]), Split(test.x[:keep], test.y[:keep]))
        chars = int(loaded.part("train").numel())
        return loaded, splits, lambda b: max(1, chars // (b * task.context))
    if not isinstance(loaded, ImageDataset):
        raise SystemExit(f"{task.data} is not an image dataset")
    dataset = limited(loaded, budget.train_limit, budget.test_limit)
    image_splits = prepare_splits(dataset, cfg.data.validation_size, device)
    n_train = int(image_splits[0].y.shape[0])
    return dataset, image_splits, lambda b: steps_per_epoch(n_train, b)


def steps_per_epoch(n_train: int, batch: int) -> int:
    return max(1, n_train // batch)


def _say(prefix: str, line: str) -> None:
    print(prefix + line, flush=True)


def run_contender(
    cfg: Config,
    dataset: Dataset,
    splits: Any,
    out: Path,
    contender: Contender,
    batch: int,
    budget: Budget,
    task: Task,
    epoch_steps: Callable[[int], int],
) -> dict[str, Any]:
    """Seed 0 over the lr search, the other seeds at the chosen lr; a JSON-ready summary."""
    every = max(1, epoch_steps(batch) // budget.evals_per_epoch)
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
    grid = lr_grid(contender, batch, budget.grid_points, task.reference_batch)
    load_before = load_average()
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
        reference_batch=task.reference_batch,
    )
    row["load_average_1min"] = {"before": load_before, "after": load_average()}
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
    reference_batch: int = REFERENCE_BATCH,
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
        "centre_at_8192": contender.centre,  # at reference_batch (the key predates it)
        "reference_batch": reference_batch,
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
    if r.get("bound_hit"):
        text += f" (bound hit, {r['bound_hit']})"
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


def _time_cell(r: dict[str, Any], machines: dict[str, str] | None = None) -> str:
    """Seconds to the target, ms/step and load; ``machines``: part file -> its machine's
    letter, shown when the parts ran on more than one machine."""
    if r["chosen_lr"] is None:
        return "diverged"
    seconds = _median(r.get("seconds_to_target", []))
    step = [v for v in r.get("step_ms", []) if v is not None]
    step_text = f"{statistics.median(step):.0f} ms/step" if step else "-"
    load = r.get("load_average_1min", {}).get("before")
    step_text += "" if load is None else f", load {load:.1f}"
    if machines and r.get("part") in machines:
        step_text += f", machine {machines[r['part']]}"
    return f"{'-' if seconds is None else f'{seconds:.0f} s'} ({step_text})"


def _retimed_cell(r: dict[str, Any], key: str) -> str:
    """Re-timed seconds to target ``key`` (median over seeds) and the re-timed ms/step."""
    if r["chosen_lr"] is None:
        return "diverged"
    timed = r.get("retimed")
    if timed is None:
        return "-"
    seconds = _median(timed["seconds_to"][key])
    step = "-" if timed["step_ms"] is None else f"{timed['step_ms']:.0f} ms/step"
    return f"{'-' if seconds is None else f'{seconds:.1f} s'} ({step})"


def _machine_key(m: dict[str, Any]) -> str:
    return f"{m['cpu_model']}, {m['cpus_available']} cores, torch {m['torch']}"


def part_machines(ctx: dict[str, Any]) -> dict[str, str]:
    """Part file -> a letter per distinct machine (empty when every part ran on one)."""
    keys = {p["file"]: _machine_key(p["machine"]) for p in ctx.get("parts", []) if "machine" in p}
    distinct = list(dict.fromkeys(keys.values()))
    if len(distinct) < 2:
        return {}
    return {f: chr(ord("A") + distinct.index(k)) for f, k in keys.items()}


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
    metric = results.get("metric", "test top-1")
    batches = sorted({r["batch_size"] for r in rows})
    labels = list(dict.fromkeys(r["contender"] for r in rows))
    cell = {(r["contender"], r["batch_size"]): r for r in rows}
    lines = [f"# {ctx['title']}", ""]
    lines += [
        f"- {k}: {v}" for k, v in ctx.items() if k not in ("title", "machine", "parts", "retimed")
    ]
    parts = ctx.get("parts", [])
    machines = part_machines(ctx)
    if machines:
        letters = {
            letter: _machine_key(p["machine"]) for p in parts if (letter := machines.get(p["file"]))
        }
        lines += [f"- machine {k}: {v}" for k, v in sorted(letters.items())]
    else:
        lines += [f"- machine: {_machine_key(ctx['machine'])}"]
    if parts:
        where = (
            f"on {len(set(machines.values()))} different machines (the machine column: "
            "seconds compare only between parts on the same machine; see the re-timed table)"
            if machines
            else "on the same machine"
        )
        lines += ["", f"Run in parts, one invocation each, {where}:", ""]
        lines += ["| part | date | wall (s) | machine | command |", "|---|---|---|---|---|"]
        lines += [
            f"| {p['file']} | {p['date']} | {p['wall_s']:.0f} | "
            f"{machines.get(p['file'], '-' if 'machine' not in p else 'same')} | "
            f"`{p['command']}` |"
            for p in parts
        ]
    lines += [
        "",
        f"Final {metric} (%), mean over the seeds (min-max) at the chosen lr; "
        "`*` = the chosen lr is at an edge of the lrs tried; `(bound hit, high/low)` = the "
        "search stopped at its trial bound with the best at that edge, so a better lr may lie "
        "beyond; `k/n lrs div` = grid runs (seed 0) that "
        "diverged; `k/n seeds div` = seeds that diverged at the chosen lr (left out of the "
        "mean).",
        "",
        *_grid_table(labels, batches, cell, _accuracy_cell),
    ]
    keys = list(rows[0].get("steps_to", {f"{target:g}": None})) if rows else []
    for key in keys:
        lines += [
            "",
            f"Steps to {100 * float(key):g}% {metric} per seed at the chosen lr (`-` = not "
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
            "seed missed it), the mean step time in ms and the 1-minute load average when the "
            "cell started, "
            + (
                "each part in its own invocation on its own machine (the machine letter; "
                "seconds on different machines do not compare):"
                if machines
                else "each part in its own invocation on the same machine (compare loads):"
                if parts
                else "measured in the same invocation on the same machine, contenders run "
                "back to back:"
            ),
            "",
            *_grid_table(labels, batches, cell, partial(_time_cell, machines=machines)),
        ]
    )
    again = ctx.get("retimed")
    if again is not None and any("retimed" in r for r in rows):
        for key in keys:
            lines += [
                "",
                f"Training seconds to {100 * float(key):g}% {metric}, re-timed in one "
                f"invocation on one machine ({_machine_key(again['machine'])}, "
                f"{again['date']}, load {_load_text(again['load_average_1min'])}; "
                f"`{again['command']}`): {again['how']}; median over the seeds, and the "
                "mean ms per step (`-` = a seed missed it):",
                "",
                *_grid_table(labels, batches, cell, partial(_retimed_cell, key=key)),
            ]
    for key, critical in results.get("critical_batch", {}).items():
        lines += [
            "",
            f"Critical batch size for {100 * float(key):g}% {metric} (where the mean steps to "
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
    ref = next((r.get("reference_batch") for r in rows if r.get("reference_batch")), 8192)
    lines += ["", f"Learning-rate grid centres (at batch {ref}; x sqrt(B/{ref}) per batch):", ""]
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


def _load_text(load: dict[str, float | None]) -> str:
    values = [v for v in (load.get("before"), load.get("after")) if v is not None]
    return " to ".join(f"{v:.1f}" for v in values) or "unknown"


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
    axes[0].set_ylabel("final validation accuracy (%)")
    axes[-1].legend(fontsize=6, ncol=2)
    fig.suptitle(f"sensitivity to the learning rate: {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_time_to_target(
    rows: Sequence[dict[str, Any]],
    path: Path,
    target: float,
    title: str,
    metric: str = "test top-1",
) -> Path:
    """Median training seconds to the target against batch size (missing: not reached);
    the re-timed seconds (``retime.py``) where the rows have them."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    again = any("retimed" in r for r in rows)

    def seconds(r: dict[str, Any]) -> float | None:
        if not again:
            return _median(r["seconds_to_target"])
        timed = r.get("retimed")
        return None if timed is None else _median(timed["seconds_to"][f"{target:g}"])

    for label in dict.fromkeys(r["contender"] for r in rows):
        pts = [(r["batch_size"], seconds(r)) for r in rows if r["contender"] == label]
        pts = [(b, t) for b, t in pts if t is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    how = ", re-timed interleaved" if again else ""
    ax.set_ylabel(f"training seconds to {100 * target:g}% {metric}\n(median over seeds{how})")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_accuracy_vs_batch(
    rows: Sequence[dict[str, Any]], path: Path, title: str, metric: str = "test top-1"
) -> Path:
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
    ax.set_ylabel(f"final {metric} (%)")
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


def _targets(results: dict[str, Any]) -> list[float]:
    """The task's target, then the lower ones also reported (files written before
    ``extra_targets`` was recorded: the targets the rows have steps for)."""
    main = results["target_accuracy"]
    if "extra_targets" in results:
        return [main, *results["extra_targets"]]
    keys = results["results"][0].get("steps_to", {}) if results["results"] else {}
    return [main, *(float(k) for k in keys if float(k) != main)]


def write_outputs(results: dict[str, Any], stem: Path) -> None:
    """``results`` (critical batch sizes added) as ``stem``.json/.md and its plots."""
    rows, title = results["results"], results["context"]["title"]
    metric = results.get("metric", "test top-1")
    results["critical_batch"] = {
        f"{t:g}": critical_batches(rows, f"{t:g}") for t in _targets(results)
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_results(stem.with_suffix(".json"), results, indent=1)
    table = markdown(results)
    stem.with_suffix(".md").write_text(table)
    plot_accuracy_vs_batch(rows, stem.parent / f"{stem.name}_accuracy.png", title, metric)
    for t in _targets(results):
        suffix = "" if t == results["target_accuracy"] else f"_{round(100 * t)}"
        plot_scaling(
            scaling_curves(rows, f"{t:g}"),
            stem.parent / f"{stem.name}_scaling{suffix}.png",
            target=t,
            title=f"steps to {100 * t:g}% {metric}, {results['context']['dataset']}",
        )
    plot_sensitivity(rows, stem.parent / f"{stem.name}_sensitivity.png", title)
    plot_time_to_target(
        rows, stem.parent / f"{stem.name}_time.png", results["target_accuracy"], title, metric
    )
    print(table)


def merge_parts(parts: Sequence[Path], stem: Path) -> dict[str, Any]:
    """One study from the results files of its parts (same task, budget and batch sizes,
    each part some contenders): rows in the parts' order by batch size, critical batch sizes
    recomputed, every part's command, date, machine and wall time kept."""
    loaded = [json.loads(p.read_text()) for p in parts]
    first = loaded[0]

    def same(data: dict[str, Any]) -> dict[str, Any]:
        # files written before "metric" and "extra_targets" were recorded: their defaults
        return {
            "target_accuracy": data["target_accuracy"],
            "metric": data.get("metric", "test top-1"),
            "extra_targets": sorted(_targets(data)[1:]),
        }

    reference = same(first)
    for path, data in zip(parts, loaded, strict=True):
        for key, value in same(data).items():
            if value != reference[key]:
                raise SystemExit(f"{path}: {key} {value!r} differs from {parts[0]}")
        for key in ("dataset", "model", "budget", "epochs", "seeds", "grid", "schedule"):
            if data["context"].get(key) != first["context"].get(key):
                raise SystemExit(f"{path}: context.{key} differs from {parts[0]}")
    cells = [(r["contender"], r["batch_size"]) for d in loaded for r in d["results"]]
    if len(set(cells)) != len(cells):
        raise SystemExit("the parts overlap: a (contender, batch) cell is in more than one part")
    labels = [label for label, _ in cells]
    rows = sorted(
        (r | {"part": p.name} for p, d in zip(parts, loaded, strict=True) for r in d["results"]),
        key=lambda r: (r["batch_size"], labels.index(r["contender"])),
    )
    context = {
        k: v for k, v in first["context"].items() if not k.startswith(("command", "date", "wall"))
    }
    context["title"] = first["context"]["title"] + " (all parts)"
    context["parts"] = [
        {
            "file": p.name,
            "command": d["context"]["command"],
            "date": d["context"]["date"],
            "wall_s": next(v for k, v in d["context"].items() if k.startswith("wall_s")),
            "machine": d["context"]["machine"],
        }
        for p, d in zip(parts, loaded, strict=True)
    ]
    context["command"] = "python benchmarks/convergence.py --merge " + " ".join(
        str(p) for p in parts
    )
    merged = {k: v for k, v in first.items() if k not in ("context", "results")}
    merged |= reference | {"context": context, "results": rows}
    write_outputs(merged, stem)
    return merged


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
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        metavar="PART",
        help="combine the results files of a split study's parts (written as --task and "
        "--budget's file with --tag, default no tag) instead of training",
    )
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
    budget_tag = "" if args.budget == "full" else f"_{args.budget}"
    if args.merge:
        tag = f"_{args.tag}" if args.tag else ""
        stem = args.results / f"convergence_{args.task}{budget_tag}{tag}"
        merge_parts(args.merge, stem)
        print(f"written: {stem}.json/.md and PNGs")
        return 0
    tune_malloc()
    task, budget = TASKS[args.task], TASKS[args.task].budgets[args.budget]
    if args.batch_sizes:
        budget = replace(budget, batch_sizes=tuple(args.batch_sizes))
    contenders = [task.contender(c) for c in (args.contenders or budget.contenders or CONTENDERS)]
    cfg = base_config(task, budget, args)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    dataset, splits, epoch_steps = load_splits(task, budget, cfg, args, device)
    out = args.out / f"{args.task}-{args.budget}"
    started = time.perf_counter()
    rows = [
        run_contender(cfg, dataset, splits, out, c, batch, budget, task, epoch_steps)
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
    n_val = int(splits[1].y.shape[0]) if splits[1] is not None else 0
    unit = f"windows of {task.context} characters" if task.is_text else "images"
    train_size = (
        {"train_characters": int(dataset.part("train").numel())}
        if isinstance(dataset, TextDataset)
        else {"train_images": int(splits[0].y.shape[0])}
    )
    decay = "5e-4 on weights" if task.weight_decay is None else f"{task.weight_decay:g}"
    results = {
        "context": {
            "title": title,
            "command": command,
            "date": utc_now(),
            "machine": machine(torch.get_num_threads()),
            "device": _device_name(device),
            "dataset": dataset.display_name,
            **({"data_note": dataset.notes} if dataset.notes else {}),
            "model": task.model + (f" {task.model_options}" if task.model_options else ""),
            "recipe": task.recipe or "none",
            "budget": args.budget,
            "epochs": budget.epochs,
            "seeds": budget.seeds,
            "grid": f"{budget.grid_points} lrs factor 2 apart around each centre x "
            f"sqrt(B/{task.reference_batch})"
            + (
                f", extended by factor 2 past an edge while the best is there, at most "
                f"{budget.max_trials} trials"
                if budget.max_trials > budget.grid_points
                else ""
            ),
            "schedule": f"{task.warmup_epochs:g} epoch linear warm-up, cosine to 0; "
            f"weight decay {decay}",
            "selection": f"lr by last validation accuracy of seed 0 ({n_val} held-out {unit})",
            **train_size,
            f"test_{'windows' if task.is_text else 'images'}": int(splits[2].y.shape[0]),
            "steps_per_epoch": {b: epoch_steps(b) for b in budget.batch_sizes},
            "wall_s (this invocation; reused runs cost nothing)": round(wall, 1),
        },
        "metric": task.metric,
        "target_accuracy": task.target,
        "extra_targets": list(task.extra_targets),
        "results": rows,
    }
    subset = (
        f"_{args.tag}" if args.tag else "_subset" if args.contenders or args.batch_sizes else ""
    )
    stem = args.results / f"convergence_{args.task}{budget_tag}{subset}"
    write_outputs(results, stem)
    print(f"written: {stem}.json/.md and PNGs ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
