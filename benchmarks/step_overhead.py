"""Benchmark B1: per-step overhead of NLCG against momentum SGD and Adam (CPU).

For each model (ResNet-20 on random 3x32x32 inputs, a 784-1024-1024-10 MLP on random 784
inputs; batch 128, 10 classes, cross-entropy) every contender gets its own copy of the model,
built from the same seed:

- ``sgd``: ``torch.optim.SGD(momentum=0.9, foreach=True)``, the baseline;
- ``adam``: ``torch.optim.Adam(foreach=True)``;
- ``nlcg-none``, ``nlcg-bfgs``, ``nlcg-adam``: ``bigbatch.NLCG(lr=0.01, preconditioner=P)``
  stepped as ``opt.step(loss=loss)``.

The contenders run INTERLEAVED: each round does one training step of every contender, in a
freshly shuffled order, so drift of the machine (clock, other load) hits all of them alike.
A training step is ``zero_grad``, forward, backward, ``optimizer.step``; it is timed with
``time.perf_counter`` as a whole ("full") and ``optimizer.step`` alone ("step"). After
``--warmup`` untimed rounds, ``--rounds`` rounds are timed and the MEDIANS reported, with
ratios to SGD's full step and Adam's ``step()``. Python's garbage collector is off inside a
round and run between rounds.

Targets: NLCG full step <= 1.05x SGD's; NLCG ``step()`` alone <= 1.5x Adam(foreach)'s.

Optimizer memory: for torch optimizers the bytes of the unique tensor storages in
``opt.state``; for NLCG ``opt.buffer_nbytes()`` (flat state plus reusable workspace). Peak RSS
(``getrusage``) is per process, so it is cumulative over the models run before.

Run from the repository root::

    .venv/bin/python benchmarks/step_overhead.py                        # defaults
    .venv/bin/python benchmarks/step_overhead.py --rounds 3 --warmup 1  # quick smoke run

Results go to ``benchmarks/results/step_overhead.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bigbatch
from models import MODEL_SPECS, ModelSpec

FULL_TARGET = 1.05  # NLCG full step / SGD full step
STEP_TARGET = 1.5  # NLCG step() / Adam(foreach) step()
DEFAULT_ROUNDS = {"resnet20": 30, "mlp": 100}
NUM_CLASSES = 10
NUM_BATCHES = 4  # distinct random batches, cycled through (generated before timing)
CONTENDERS = ("sgd", "adam", "nlcg-none", "nlcg-bfgs", "nlcg-adam")
NLCG_LR = 0.01
MIB = 1024.0 * 1024.0
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "step_overhead.json"


@dataclass
class Contender:
    """One model copy with its optimizer, and the timings collected for it."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    full_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    last_loss: float = float("nan")

    @property
    def is_nlcg(self) -> bool:
        return isinstance(self.optimizer, bigbatch.NLCG)

    def optimizer_step(self, loss: Tensor) -> None:
        if isinstance(self.optimizer, bigbatch.NLCG):
            self.optimizer.step(loss=loss)
        else:
            self.optimizer.step()

    def state_nbytes(self) -> int:
        """NLCG: ``buffer_nbytes()``; torch optimizers: unique storages in ``state``."""
        if isinstance(self.optimizer, bigbatch.NLCG):
            return self.optimizer.buffer_nbytes()
        return storage_nbytes(self.optimizer)


def storage_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the unique tensor storages referenced from ``optimizer.state``."""
    seen: dict[tuple[str, int], int] = {}
    for entry in optimizer.state.values():
        for value in entry.values():
            if isinstance(value, Tensor):
                storage = value.untyped_storage()
                seen[(str(value.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    """Class name and the settings that matter here, e.g. ``NLCG(DiagonalBFGS(eps=1e-08))``."""
    name = type(optimizer).__name__
    if isinstance(optimizer, bigbatch.NLCG):
        return f"{name}(beta_rule={optimizer.beta_rule!r}, {optimizer.preconditioner!r})"
    group = optimizer.param_groups[0]
    keys = [k for k in ("lr", "momentum", "betas", "foreach") if k in group]
    return f"{name}(" + ", ".join(f"{k}={group[k]!r}" for k in keys) + ")"


def make_optimizer(name: str, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9, foreach=True)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3, foreach=True)
    if name.startswith("nlcg-"):
        return bigbatch.NLCG(params, lr=NLCG_LR, preconditioner=name.removeprefix("nlcg-"))
    raise ValueError(f"unknown contender {name!r}")


def build_contenders(spec: ModelSpec, seed: int) -> list[Contender]:
    contenders = []
    for name in CONTENDERS:
        torch.manual_seed(seed)  # the same initial weights for every contender
        model = spec.build()
        model.train()
        optimizer = make_optimizer(name, list(model.parameters()))
        contenders.append(Contender(name, model, optimizer))
    return contenders


def train_step(c: Contender, x: Tensor, y: Tensor) -> tuple[float, float]:
    """One training step; returns (full seconds, optimizer.step seconds)."""
    t0 = time.perf_counter()
    c.optimizer.zero_grad()
    loss = F.cross_entropy(c.model(x), y)
    loss.backward()
    t1 = time.perf_counter()
    c.optimizer_step(loss)
    t2 = time.perf_counter()
    c.last_loss = float(loss.detach())  # outside the timed region
    return t2 - t0, t2 - t1


def run_rounds(
    contenders: list[Contender],
    batches: list[tuple[Tensor, Tensor]],
    rounds: int,
    rng: random.Random,
    record: bool,
    on_round: Callable[[int], None] | None = None,
) -> None:
    order = list(range(len(contenders)))
    gc_was_enabled = gc.isenabled()
    try:
        for r in range(rounds):
            rng.shuffle(order)
            x, y = batches[r % len(batches)]
            gc.collect()
            gc.disable()
            times = [(i, train_step(contenders[i], x, y)) for i in order]
            gc.enable()
            if record:
                for i, (full, step) in times:
                    contenders[i].full_s.append(full)
                    contenders[i].step_s.append(step)
            if on_round is not None:
                on_round(r)
    finally:
        if gc_was_enabled:
            gc.enable()


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    ms = [1e3 * s for s in seconds]
    return {
        "median": statistics.median(ms),
        "min": min(ms),
        "max": max(ms),
        "mean": statistics.fmean(ms),
        "stdev": statistics.stdev(ms) if len(ms) > 1 else 0.0,
    }


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of the per-round ratio (robust to drift between rounds)."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def load_average() -> float | None:
    """1-minute load average (includes this process); ``None`` where unsupported."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MIB


def benchmark_model(
    spec: ModelSpec, rounds: int, warmup: int, batch_size: int, seed: int
) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [spec.random_batch(batch_size, NUM_CLASSES, gen) for _ in range(NUM_BATCHES)]
    contenders = build_contenders(spec, seed)
    n_params = sum(p.numel() for p in contenders[0].model.parameters())
    print(
        f"\n== {spec.name}: {n_params:,} parameters, batch {batch_size}, "
        f"{warmup} warm-up + {rounds} timed rounds of {len(contenders)} contenders",
        flush=True,
    )
    rng = random.Random(seed)
    run_rounds(contenders, batches, warmup, rng, record=False)
    load_before = load_average()
    started = time.perf_counter()

    def progress(r: int) -> None:
        if (r + 1) % max(1, rounds // 5) == 0 or r + 1 == rounds:
            elapsed = time.perf_counter() - started
            print(f"   round {r + 1}/{rounds} ({elapsed:.1f} s)", file=sys.stderr, flush=True)

    run_rounds(contenders, batches, rounds, rng, record=True, on_round=progress)
    timed_s = time.perf_counter() - started
    load_after = load_average()

    by_name = {c.name: c for c in contenders}
    sgd, adam = by_name["sgd"], by_name["adam"]
    sgd_full = statistics.median(sgd.full_s)
    adam_step = statistics.median(adam.step_s)
    rows: dict[str, Any] = {}
    for c in contenders:
        full, step = summary_ms(c.full_s), summary_ms(c.step_s)
        row: dict[str, Any] = {
            "optimizer": describe_optimizer(c.optimizer),
            "full_step_ms": full,
            "optimizer_step_ms": step,
            "full_ratio_to_sgd": full["median"] / (1e3 * sgd_full),
            "step_ratio_to_adam": step["median"] / (1e3 * adam_step),
            "full_ratio_to_sgd_paired": paired_ratio(c.full_s, sgd.full_s),
            "step_ratio_to_adam_paired": paired_ratio(c.step_s, adam.step_s),
            "fwd_bwd_ms_median": statistics.median(
                1e3 * (f - s) for f, s in zip(c.full_s, c.step_s, strict=True)
            ),
            "state_bytes": c.state_nbytes(),
            "state_mib": c.state_nbytes() / MIB,
            "state_storage_bytes": storage_nbytes(c.optimizer),
            "final_loss": c.last_loss,
        }
        if isinstance(c.optimizer, bigbatch.NLCG):
            row["skipped_steps"] = c.optimizer.skipped_steps
            row["full_pass"] = row["full_ratio_to_sgd"] <= FULL_TARGET
            row["step_pass"] = row["step_ratio_to_adam"] <= STEP_TARGET
            if c.optimizer.skipped_steps:
                print(
                    f"   warning: {c.name} skipped {c.optimizer.skipped_steps} non-finite steps",
                    file=sys.stderr,
                )
        rows[c.name] = row
    result = {
        "model": spec.name,
        "parameters": n_params,
        "param_bytes": sum(p.numel() * p.element_size() for p in contenders[0].model.parameters()),
        "input_shape": list(spec.input_shape),
        "batch_size": batch_size,
        "rounds": rounds,
        "warmup": warmup,
        "timed_wall_s": timed_s,
        "load_average_1min": {"before": load_before, "after": load_after},
        "peak_rss_mib_after": peak_rss_mib(),
        "contenders": rows,
    }
    print_table(result)
    return result


def print_table(result: dict[str, Any]) -> None:
    header = (
        f"{'contender':<11} {'full ms':>9} {'x SGD':>7} {'(paired)':>8} {'step() ms':>10} "
        f"{'x Adam':>7} {'(paired)':>8} {'state MiB':>10}  verdict"
    )
    print(header)
    print("-" * (len(header) + 22))
    for name, row in result["contenders"].items():
        verdict = ""
        if "full_pass" in row:
            full_v = "PASS" if row["full_pass"] else "FAIL"
            step_v = "PASS" if row["step_pass"] else "FAIL"
            verdict = f"full {full_v}, step() {step_v}"
        print(
            f"{name:<11} {row['full_step_ms']['median']:>9.2f} {row['full_ratio_to_sgd']:>7.3f} "
            f"{row['full_ratio_to_sgd_paired']:>8.3f} "
            f"{row['optimizer_step_ms']['median']:>10.3f} {row['step_ratio_to_adam']:>7.2f} "
            f"{row['step_ratio_to_adam_paired']:>8.2f} {row['state_mib']:>10.2f}  {verdict}"
        )
    print(
        f"targets: NLCG full step <= {FULL_TARGET:.2f}x SGD full step; "
        f"NLCG step() <= {STEP_TARGET:.2f}x Adam(foreach) step() (verdicts use the ratios of "
        "medians; '(paired)' is the median of per-round ratios)"
    )
    load = result["load_average_1min"]
    cpus = _available_cpus()
    if cpus and any(v is not None and v > cpus + 0.5 for v in load.values()):
        print(
            f"warning: load average {load['before']:.2f} -> {load['after']:.2f} on {cpus} CPUs: "
            "other processes competed for the CPU; the timings are unreliable"
        )
    print(
        f"parameters: {result['param_bytes'] / MIB:.2f} MiB; timed rounds took "
        f"{result['timed_wall_s']:.1f} s; "
        f"process peak RSS so far {result['peak_rss_mib_after']:.0f} MiB",
        flush=True,
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_revision() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("-dirty" if dirty else "")


def _available_cpus() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def machine_info() -> dict[str, Any]:
    affinity = _available_cpus()
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": affinity,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "bigbatch": bigbatch.__version__,
        "git_revision": git_revision(),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=sorted(MODEL_SPECS),
        default=["resnet20", "mlp"],
        help="models to benchmark, in this order",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"timed rounds per model (default per model: {DEFAULT_ROUNDS})",
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds per model")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.warmup < 0 or args.threads < 1 or args.batch_size < 1:
        parser.error("--warmup must be >= 0, --threads and --batch-size >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    machine = machine_info()
    print(
        f"B1 step overhead | {machine['cpu_model']} | {machine['cpus_available']} CPUs | "
        f"torch {machine['torch']} | {machine['torch_threads']} threads"
    )
    results = []
    for name in args.models:
        rounds = args.rounds if args.rounds is not None else DEFAULT_ROUNDS[name]
        results.append(
            benchmark_model(MODEL_SPECS[name], rounds, args.warmup, args.batch_size, args.seed)
        )
    wall = time.perf_counter() - started
    report = {
        "benchmark": "B1 step overhead",
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {
            "rounds": args.rounds,
            "default_rounds": DEFAULT_ROUNDS,
            "warmup": args.warmup,
            "threads": args.threads,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "num_batches": NUM_BATCHES,
            "contenders": {
                "sgd": "torch.optim.SGD(lr=0.01, momentum=0.9, foreach=True)",
                "adam": "torch.optim.Adam(lr=1e-3, foreach=True)",
                "nlcg-<P>": f"bigbatch.NLCG(lr={NLCG_LR}, preconditioner=P); step(loss=loss)",
            },
            "timing": "perf_counter; interleaved rounds in shuffled order; gc off in a round",
        },
        "targets": {
            "nlcg_full_step_vs_sgd_max": FULL_TARGET,
            "nlcg_step_vs_adam_foreach_max": STEP_TARGET,
        },
        "results": {r["model"]: r for r in results},
        "wall_s": wall,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out} (wall time {wall:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
