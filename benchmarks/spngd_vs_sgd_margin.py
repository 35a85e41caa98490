"""Benchmark B2: SP-NGD against momentum SGD on Fashion-MNIST in a few large-batch steps.

What it measures: the test accuracy a small CNN with BatchNorm reaches after a fixed, small
number of large-batch steps, trained by :class:`bigbatch.SPNGD` and by momentum SGD
(``torch.optim.SGD``, momentum 0.9, Nesterov), and the MARGIN between the two over seeds:
``min over seeds of SP-NGD's accuracy - max over seeds of SGD's``. The end-to-end test
``tests/test_spngd_fashion_mnist.py`` asserts a margin measured with this script.

Everything except the optimizer is held equal:

- model: ``Conv(1, C1, 5, stride 2, pad 2) - BN - ReLU - Conv(C1, C2, 3, stride 2, pad 1) - BN
  - ReLU - Flatten - Linear(C2 * 7 * 7, 10)`` (convolutions without bias, since a BatchNorm
  follows), built from the run's seed, so both optimizers start from the same weights;
- data: Fashion-MNIST standardized with the mean and standard deviation of the training
  split; ``--val-size`` training images (a fixed permutation, seed ``--split-seed``) are held
  out for tuning; every run draws its batches from a seeded ``torch.randperm`` per epoch
  (the last partial batch is dropped), the same order for both optimizers at one seed;
- schedule: ``--steps`` steps of ``--batch-size`` samples; linear warm-up of the learning
  rate over the first ``--warmup`` steps, then constant; no weight decay; mean
  cross-entropy loss; after training, the BatchNorm running statistics are recomputed
  exactly from 10,000 training images ("precise BN", so that running averages lagging
  behind fast-moving weights do not decide the comparison) and the model is evaluated in
  ``eval()`` mode;
- tuning: each optimizer gets a grid of the SAME size (SGD: ``--sgd-lrs``; SP-NGD: every
  pair of ``--spngd-lrs`` and ``--spngd-dampings``, so the two products must match in
  size), every setting trained with each of ``--tune-seeds`` and scored by its mean
  VALIDATION accuracy; the best setting of each is then retrained with each of ``--seeds``
  (disjoint from the tuning seeds) and scored on the TEST split.

Measured with the defaults (batch 4096, 20 steps, 3 warm-up steps, C1, C2 = 8, 16; one
thread, AMD EPYC, torch 2.13.0+cpu; 283 s wall): best SGD lr 0.05, best SP-NGD lr 0.0125
(damping 1e-3), both inside their grids; test accuracy over seeds 10-14 SGD 0.8051-0.8106,
SP-NGD 0.8393-0.8539, paired differences +0.029 to +0.046, margin +0.0287. At 10 steps
(``--steps 10``) SP-NGD still wins every seed but is noisier: margin +0.0088.

Run from the repository root::

    .venv/bin/python benchmarks/spngd_vs_sgd_margin.py            # the default sweep
    .venv/bin/python benchmarks/spngd_vs_sgd_margin.py --sgd-lrs 0.05 --spngd-lrs 0.0125 \\
        --tune-seeds 0 --seeds 10 11 12 13 14 --out /tmp/b2.json    # one fixed setting

Results go to ``benchmarks/results/spngd_vs_sgd_margin.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import bigbatch
from bigbatch.train import DatasetError, ImageDataset, load_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine as describe_machine
from common import utc_iso, write_results

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = ROOT.parent / "shared" / "data" / "fashion-mnist"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "spngd_vs_sgd_margin.json"

# Defaults of the sweep (see the module docstring and the JSON for the measured numbers).
BATCH_SIZE = 4096
STEPS = 20
WARMUP = 3
CHANNELS = (8, 16)
VAL_SIZE = 5000
BN_SAMPLES = 10_000  # training images the BatchNorm statistics are recomputed from
SPLIT_SEED = 1234
# Both grids: six values a factor 2 apart, placed around each optimizer's best value found
# in the same exploratory sweep (seeds 0-4, lrs 0.0125-1, at 10 and 20 steps).
SGD_LRS = (0.0125, 0.025, 0.05, 0.1, 0.2, 0.4)
SPNGD_LRS = (0.00625, 0.0125, 0.025, 0.05, 0.1, 0.2)
SPNGD_DAMPINGS = (1e-3,)
TUNE_SEEDS = (0, 1, 2)
SEEDS = (10, 11, 12, 13, 14)
MOMENTUM = 0.9
# One intra-op thread: the results then do not depend on the machine's core count (the
# reduction order of multi-threaded kernels does), so the test's numbers reproduce anywhere,
# and a shared machine cannot stall OpenMP barriers (seen with 2 threads on a busy 2-core
# box: a 0.5 s forward pass took over a minute).
THREADS = 1
OPTIMIZERS = ("sgd", "spngd")


@dataclass(frozen=True)
class Splits:
    """Standardized tensors: training part, held-out validation part, and the test split."""

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor


@dataclass(frozen=True)
class Setting:
    """One optimizer configuration: ``damping`` is ``None`` for SGD."""

    optimizer: str
    lr: float
    damping: float | None = None

    def label(self) -> str:
        extra = "" if self.damping is None else f", damping={self.damping:g}"
        return f"{self.optimizer}(lr={self.lr:g}{extra})"


def load_splits(data_dir: Path, val_size: int, split_seed: int) -> Splits:
    """Load Fashion-MNIST, hold out ``val_size`` training images, standardize everything.

    The mean and standard deviation are those of the training part (after the hold-out).
    """
    data = load_dataset("fashion-mnist", data_dir)
    if not isinstance(data, ImageDataset):
        raise DatasetError(f"{data_dir}: not Fashion-MNIST images")
    all_x, test_x = data.train_x.float() / 255, data.test_x.float() / 255  # pixels in [0, 1]
    perm = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    train_x = all_x[train_idx]
    mean, std = train_x.mean(), train_x.std()

    def standardize(x: Tensor) -> Tensor:
        return (x - mean) / std

    return Splits(
        standardize(train_x),
        data.train_y[train_idx],
        standardize(all_x[val_idx]),
        data.train_y[val_idx],
        standardize(test_x),
        data.test_y,
    )


def build_model(channels: tuple[int, int]) -> nn.Sequential:
    """The small CNN with BatchNorm (28x28 -> 14x14 -> 7x7 by strided convolutions)."""
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 5, stride=2, padding=2, bias=False),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c2 * 7 * 7, 10),
    )


def make_optimizer(setting: Setting, model: nn.Module) -> torch.optim.Optimizer:
    """Nesterov momentum SGD, or SP-NGD with its defaults except lr and damping."""
    if setting.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=setting.lr, momentum=MOMENTUM, nesterov=True)
    if setting.optimizer == "spngd":
        assert setting.damping is not None
        return bigbatch.SPNGD(model, lr=setting.lr, momentum=MOMENTUM, damping=setting.damping)
    raise ValueError(f"unknown optimizer {setting.optimizer!r}")


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> list[Tensor]:
    """Index tensors of ``steps`` batches: a seeded permutation per epoch, no partial batch."""
    gen = torch.Generator().manual_seed(seed)
    per_epoch = n // batch_size
    batches: list[Tensor] = []
    while len(batches) < steps:
        perm = torch.randperm(n, generator=gen)
        batches += [perm[i * batch_size : (i + 1) * batch_size] for i in range(per_epoch)]
    return batches[:steps]


def warmup_lr(base_lr: float, step: int, warmup: int) -> float:
    """Linear warm-up over the first ``warmup`` steps (step 0 gets ``base_lr / warmup``)."""
    return base_lr * min(1.0, (step + 1) / warmup) if warmup > 0 else base_lr


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 5000) -> float:
    """Top-1 accuracy in ``eval()`` mode."""
    model.eval()
    correct = sum(
        int((model(x[i : i + chunk]).argmax(1) == y[i : i + chunk]).sum())
        for i in range(0, len(y), chunk)
    )
    return correct / len(y)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: Tensor, chunk: int = 2500) -> None:
    """Recompute every BatchNorm's running statistics exactly from ``x`` ("precise BN").

    The running averages kept during a few large-batch steps lag behind weights that change
    fast (more so at large learning rates), which makes ``eval()`` accuracy noisy and
    penalizes whichever optimizer moves the weights further; recomputing them from a fixed
    set of training images after training removes that confound for both optimizers.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the chunks below
    model.train()
    for i in range(0, len(x), chunk):
        model(x[i : i + chunk])
    model.eval()


def train(
    setting: Setting,
    splits: Splits,
    *,
    seed: int,
    steps: int,
    batch_size: int,
    warmup: int,
    channels: tuple[int, int],
) -> nn.Module:
    """Train one model; the seed fixes the initial weights and the batch order.

    Returns a hook-free copy of the trained model (SP-NGD registers hooks on the model it
    trains) whose BatchNorm statistics are recalibrated on the first :data:`BN_SAMPLES`
    training images.
    """
    torch.manual_seed(seed)
    model = build_model(channels)
    optimizer = make_optimizer(setting, model)
    model.train()
    for step, idx in enumerate(batch_order(len(splits.train_y), batch_size, steps, seed)):
        for group in optimizer.param_groups:
            group["lr"] = warmup_lr(setting.lr, step, warmup)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(splits.train_x[idx]), splits.train_y[idx])
        loss.backward()
        optimizer.step()
    trained = build_model(channels)
    trained.load_state_dict(model.state_dict())
    recalibrate_batchnorm(trained, splits.train_x[:BN_SAMPLES])
    return trained


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "min": min(values),
        "median": statistics.median(values),
        "max": max(values),
        "mean": statistics.fmean(values),
    }


def grid(args: argparse.Namespace) -> dict[str, list[Setting]]:
    sgd = [Setting("sgd", lr) for lr in args.sgd_lrs]
    spngd = [
        Setting("spngd", lr, damping)
        for lr, damping in itertools.product(args.spngd_lrs, args.spngd_dampings)
    ]
    if len(sgd) != len(spngd):
        raise SystemExit(
            f"the grids must have the same size for a fair comparison: SGD {len(sgd)} "
            f"settings, SP-NGD {len(spngd)} (lrs x dampings)"
        )
    return {"sgd": sgd, "spngd": spngd}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--warmup", type=int, default=WARMUP)
    p.add_argument("--channels", type=int, nargs=2, default=CHANNELS, metavar=("C1", "C2"))
    p.add_argument("--val-size", type=int, default=VAL_SIZE)
    p.add_argument("--split-seed", type=int, default=SPLIT_SEED)
    p.add_argument("--sgd-lrs", type=float, nargs="+", default=SGD_LRS)
    p.add_argument("--spngd-lrs", type=float, nargs="+", default=SPNGD_LRS)
    p.add_argument("--spngd-dampings", type=float, nargs="+", default=SPNGD_DAMPINGS)
    p.add_argument("--tune-seeds", type=int, nargs="+", default=TUNE_SEEDS)
    p.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    p.add_argument("--threads", type=int, default=THREADS)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if set(args.seeds) & set(args.tune_seeds):
        p.error("--seeds must be disjoint from --tune-seeds")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    machine = describe_machine(torch.get_num_threads())
    print(
        f"B2 SP-NGD vs SGD margin | {machine['cpu_model']} | {machine['cpus_available']} CPUs "
        f"| torch {machine['torch']} | {machine['torch_threads']} threads"
    )
    try:
        splits = load_splits(args.data_dir, args.val_size, args.split_seed)
    except DatasetError as exc:
        print(f"error: Fashion-MNIST not found or invalid: {exc}", file=sys.stderr)
        return 2
    channels = (args.channels[0], args.channels[1])
    common = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "warmup": args.warmup,
        "channels": channels,
    }
    settings = grid(args)

    tuning: dict[str, list[dict[str, Any]]] = {name: [] for name in OPTIMIZERS}
    best: dict[str, Setting] = {}
    for name in OPTIMIZERS:
        print(f"\ntuning {name} on the validation split (seeds {args.tune_seeds})")
        for setting in settings[name]:
            t0 = time.perf_counter()
            accs = [
                accuracy(train(setting, splits, seed=s, **common), splits.val_x, splits.val_y)
                for s in args.tune_seeds
            ]
            seconds = (time.perf_counter() - t0) / len(args.tune_seeds)
            tuning[name].append(
                {
                    "lr": setting.lr,
                    "damping": setting.damping,
                    "val_acc": accs,
                    "val_acc_mean": statistics.fmean(accs),
                    "seconds_per_run": seconds,
                }
            )
            print(
                f"  {setting.label():34s} val acc "
                + " ".join(f"{a:.4f}" for a in accs)
                + f"  mean {statistics.fmean(accs):.4f}  ({seconds:.1f} s/run)"
            )
        top = max(tuning[name], key=lambda r: r["val_acc_mean"])
        best[name] = Setting(name, top["lr"], top["damping"])
        print(f"  best: {best[name].label()}")

    final: dict[str, dict[str, Any]] = {}
    for name in OPTIMIZERS:
        accs = []
        t0 = time.perf_counter()
        for s in args.seeds:
            model = train(best[name], splits, seed=s, **common)
            accs.append(accuracy(model, splits.test_x, splits.test_y))
        seconds = (time.perf_counter() - t0) / len(args.seeds)
        final[name] = {
            "setting": {"lr": best[name].lr, "damping": best[name].damping},
            "test_acc": dict(zip(map(str, args.seeds), accs, strict=True)),
            "summary": summary(accs),
            "seconds_per_run": seconds,
        }
    sgd_accs = list(final["sgd"]["test_acc"].values())
    spngd_accs = list(final["spngd"]["test_acc"].values())
    paired = [a - b for a, b in zip(spngd_accs, sgd_accs, strict=True)]
    margin = min(spngd_accs) - max(sgd_accs)

    print(f"\ntest accuracy after {args.steps} steps of batch {args.batch_size}")
    print(
        f"  {'seed':>6s} " + " ".join(f"{s:>7d}" for s in args.seeds) + "     min  median     max"
    )
    for name in OPTIMIZERS:
        accs = list(final[name]["test_acc"].values())
        sm = final[name]["summary"]
        print(
            f"  {name:>6s} "
            + " ".join(f"{a:7.4f}" for a in accs)
            + f"  {sm['min']:.4f}  {sm['median']:.4f}  {sm['max']:.4f}   {best[name].label()}"
        )
    print("  paired SP-NGD - SGD per seed: " + " ".join(f"{d:+.4f}" for d in paired))
    print(f"  margin (min SP-NGD - max SGD): {margin:+.4f}")

    wall = time.perf_counter() - started
    report = {
        "benchmark": "B2 SP-NGD vs momentum SGD: test accuracy margin after few large-batch steps",
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "date_utc": utc_iso(),
        "machine": machine,
        "settings": {
            "data_dir": str(args.data_dir),
            "model": (
                f"Conv(1,{channels[0]},5,s2,p2)-BN-ReLU-Conv({channels[0]},{channels[1]},3,s2,p1)"
                f"-BN-ReLU-Flatten-Linear({channels[1] * 49},10)"
            ),
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup_steps": args.warmup,
            "schedule": "linear warm-up over warmup_steps, then constant; no weight decay",
            "val_size": args.val_size,
            "split_seed": args.split_seed,
            "standardization": "mean/std of the training part (after the hold-out)",
            "batchnorm_eval": f"running statistics recomputed from {BN_SAMPLES} training images",
            "sgd": f"torch.optim.SGD(momentum={MOMENTUM}, nesterov=True), lrs {args.sgd_lrs}",
            "spngd": (
                f"bigbatch.SPNGD(momentum={MOMENTUM}, staleness=True, fisher='empirical'), "
                f"lrs {args.spngd_lrs} x dampings {args.spngd_dampings}"
            ),
            "tune_seeds": args.tune_seeds,
            "seeds": args.seeds,
            "threads": args.threads,
        },
        "tuning_val_acc": tuning,
        "results": final,
        "paired_diff_spngd_minus_sgd": dict(zip(map(str, args.seeds), paired, strict=True)),
        "margin_min_spngd_minus_max_sgd": margin,
        "wall_s": wall,
    }
    write_results(args.out, report, indent=2)
    print(f"\nwrote {args.out} (wall time {wall:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
