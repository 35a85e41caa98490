"""Benchmark B1: per-step overhead of NLCG and SP-NGD against momentum SGD and Adam (CPU).

For each model (ResNet-20 on random 3x32x32 inputs, a 784-1024-1024-10 MLP on random 784
inputs; batch 128, 10 classes, cross-entropy) every contender gets its own copy of the model,
built from the same seed:

- ``sgd``: ``torch.optim.SGD(momentum=0.9, foreach=True)``, the baseline;
- ``adam``: ``torch.optim.Adam(foreach=True)``;
- ``nlcg-none``, ``nlcg-bfgs``, ``nlcg-adam``: ``bigbatch.NLCG(lr=0.01, preconditioner=P)``
  stepped as ``opt.step(loss=loss)``;
- K-FAC contenders (by default on ResNet-20 only, ``--kfac-models``), damping 1e-3, empirical
  Fisher, lr 0.01, momentum 0.9:

  - ``spngd-stale``: ``bigbatch.SPNGD(model)`` with stale statistics (default
    ``staleness=True``: per-statistic refresh intervals adapted up to 32 steps);
  - ``spngd-every``: ``bigbatch.SPNGD(model, staleness=False)``: every statistic refreshed
    and every block re-inverted on every step;
  - ``nlcg-kfac``: ``bigbatch.NLCG(preconditioner=bigbatch.KFACPreconditioner(model))``
    (stale statistics), stepped as ``opt.step(loss=loss)``;
  - ``asdl-kfac-every`` / ``asdl-kfac-10``: the peer K-FAC of ASDL (PyPI ``asdfghjkl``
    0.1a5, module ``asdl``): ``KfacGradientMaker(model, PreconditioningConfig(data_size=B,
    damping=1e-3, preconditioner_upd_interval=k, curvature_upd_interval=k),
    fisher_type="fisher_emp")`` with ``k = 1`` or ``10``, and momentum SGD
    (``foreach=True``) on the preconditioned gradient. Skipped with a note when ``asdl``
    cannot be imported (install: ``pip install --no-deps -r benchmarks/requirements-peers.txt``).

The contenders run INTERLEAVED: each round does one training step of every active
contender, in a freshly shuffled order, so drift of the machine (clock, other load) hits all
of them alike. A training step is ``zero_grad``, forward, backward, ``optimizer.step``; it is
timed with ``time.perf_counter`` as a whole ("full") and ``optimizer.step`` alone ("step").
For ASDL the forward and backward are ``grad_maker.forward_and_backward()``, which also
computes the curvature, inverts and preconditions, so its "step" is only the SGD update.
Python's garbage collector is off inside a round and run between rounds.

Contenders have their own warm-up and timed windows, all ENDING at the last round (so the
windows overlap and SGD, timed over the longest one, is measured alongside every contender):

- sgd, adam, nlcg-none/bfgs/adam: ``--warmup`` untimed + ``--rounds`` timed rounds;
- spngd-every, asdl-kfac-every: ``--warmup`` + ``--kfac-rounds``;
- spngd-stale: ``--stale-warmup`` (default 64, so the refresh intervals have grown to their
  steady state) + ``--amortized-rounds`` (default 128: four maximal 32-step intervals);
  nlcg-kfac: ``--stale-warmup`` + half of ``--amortized-rounds`` (to bound the run time);
  asdl-kfac-10: ``--warmup`` + ``--amortized-rounds`` rounded up to a multiple of 10 (so the
  window holds a whole number of its refresh periods).

Contenders that do extra work only on some steps (spngd-stale, nlcg-kfac, asdl-kfac-10) are
judged by the MEAN full step over their window (amortized cost); the others by the median.
Every contender's mean, median and slowest step are reported, with ratios to SGD computed
over the same rounds (SGD's steps in the contender's window). For the K-FAC contenders the
fraction of (statistic, step) pairs refreshed in the window is reported as well (for SP-NGD
from its refresh schedule, i.e. ``opt.refresh_fraction`` restricted to the window).

Targets: NLCG (none/bfgs/adam) full step <= 1.05x SGD's and ``step()`` alone <= 1.5x
Adam(foreach)'s (medians); SP-NGD with stale statistics, amortized (mean) <= 1.25x SGD;
SP-NGD refreshing every step <= 0.8x ASDL K-FAC refreshing every step (mean full step).

Optimizer memory: for torch optimizers the bytes of the unique tensor storages in
``opt.state``; for NLCG ``opt.buffer_nbytes()`` (flat state plus reusable workspace, plus
the K-FAC preconditioner's statistics and inverses); for SP-NGD the momentum buffers plus the
engine's statistics and inverses; for ASDL the SGD state plus the tensors of the Fisher
objects it attaches to the modules. Peak RSS (``getrusage``) is per process, so it is
cumulative over the models run before.

Run from the repository root::

    .venv/bin/python benchmarks/step_overhead.py                        # defaults
    .venv/bin/python benchmarks/step_overhead.py --contenders sgd spngd-stale
    .venv/bin/python benchmarks/step_overhead.py --rounds 3 --warmup 1 --kfac-rounds 2 \\
        --amortized-rounds 10 --stale-warmup 2                          # quick smoke run

Results go to ``benchmarks/results/step_overhead.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import resource
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bigbatch
from bigbatch.train.machine import cpu_model, git_revision
from models import MODEL_SPECS, ModelSpec

try:  # the peer K-FAC (PyPI "asdfghjkl"); optional
    import asdl
except ImportError as exc:  # pragma: no cover - depends on the environment
    asdl = None
    ASDL_IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    ASDL_IMPORT_ERROR = None

FULL_TARGET = 1.05  # NLCG full step / SGD full step
STEP_TARGET = 1.5  # NLCG step() / Adam(foreach) step()
FUSED_STEP_TARGET = 1.2  # NLCG(fused=True) step() / Adam(foreach) step()
STALE_TARGET = 1.25  # SP-NGD (stale statistics) mean full step / SGD mean full step
PEER_TARGET = 0.8  # SP-NGD (every step) mean full step / ASDL K-FAC (every step) mean
DEFAULT_ROUNDS = {"resnet20": 30, "mlp": 100}
DEFAULT_KFAC_ROUNDS = 30
DEFAULT_AMORTIZED_ROUNDS = 128
DEFAULT_STALE_WARMUP = 64
NUM_CLASSES = 10
NUM_BATCHES = 4  # distinct random batches, cycled through (generated before timing)
FUSED_NLCG = ("nlcg-bfgs-fused", "nlcg-adam-fused")  # NLCG(fused=True)
BASE_CONTENDERS = ("sgd", "adam", "nlcg-none", "nlcg-bfgs", "nlcg-adam", *FUSED_NLCG)
KFAC_CONTENDERS = ("spngd-stale", "spngd-every", "nlcg-kfac", "asdl-kfac-every", "asdl-kfac-10")
CONTENDERS = BASE_CONTENDERS + KFAC_CONTENDERS
CHEAP_NLCG = ("nlcg-none", "nlcg-bfgs", "nlcg-adam", *FUSED_NLCG)  # judged by the NLCG targets
AMORTIZED = ("spngd-stale", "nlcg-kfac", "asdl-kfac-10")  # extra work on some steps only
EVERY_STEP_KFAC = ("spngd-every", "asdl-kfac-every")
ASDL_INTERVAL = 10  # asdl-kfac-10: curvature and inverse every 10 steps
NLCG_LR = 0.01
KFAC_LR = 0.01
KFAC_MOMENTUM = 0.9
KFAC_DAMPING = 1e-3
# ratios to SGD measured earlier on this machine type (ResNet-20, batch 128, mean of 30 steps)
REFERENCE_RATIOS = {
    "asdl-kfac-every": 6.4,
    "asdl-kfac-10": 1.54,
    "kfac-pytorch (every step)": 7.3,
}
MIB = 1024.0 * 1024.0
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "step_overhead.json"


@dataclass(frozen=True)
class Plan:
    """A contender's untimed warm-up and timed rounds."""

    warmup: int
    rounds: int


@dataclass
class Contender:
    """One model copy with its optimizer, and the timings collected for it."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    plan: Plan
    grad_maker: Any = None  # ASDL's KfacGradientMaker, which runs forward and backward
    first_round: int = 0  # set by the schedule: first round it takes part in
    timed_from: int = 0  # first timed round
    full_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    timed_rounds: list[int] = field(default_factory=list)
    refreshed: list[int] = field(default_factory=list)  # statistics refreshed, per timed step
    last_loss: float = float("nan")

    @property
    def is_nlcg(self) -> bool:
        return isinstance(self.optimizer, bigbatch.NLCG)

    @property
    def engine(self) -> Any:
        """The bigbatch K-FAC engine (SP-NGD or NLCG's K-FAC preconditioner), if any."""
        if isinstance(self.optimizer, bigbatch.SPNGD):
            return self.optimizer.engine
        if isinstance(self.optimizer, bigbatch.NLCG) and isinstance(
            self.optimizer.preconditioner, bigbatch.KFACPreconditioner
        ):
            return self.optimizer.preconditioner.engine
        return None

    @property
    def n_statistics(self) -> int:
        """Curvature statistics (Kronecker factors, unit-wise blocks); 0 without any."""
        if self.engine is not None:
            return len(self.engine.schedule.intervals)
        if self.grad_maker is not None:
            gm = self.grad_maker
            return 2 * len(gm.modules_for(asdl.SHAPE_KRON)) + len(
                gm.modules_for(asdl.SHAPE_UNIT_WISE)
            )
        return 0

    def refresh_due(self) -> int:
        """Statistics the next step will refresh (read before the step, outside timing)."""
        if self.engine is not None:
            return -1  # counted from the schedule's counter after the step instead
        if self.grad_maker is not None:
            gm = self.grad_maker
            return self.n_statistics if gm.do_update_curvature(gm.state["step"]) else 0
        return 0

    def optimizer_step(self, loss: Tensor) -> None:
        if isinstance(self.optimizer, bigbatch.NLCG):
            self.optimizer.step(loss=loss)
        else:
            self.optimizer.step()

    def state_nbytes(self) -> int:
        """NLCG: ``buffer_nbytes()``; SP-NGD: momentum plus statistics and inverses; ASDL:
        SGD state plus its Fisher tensors; torch optimizers: unique storages in ``state``."""
        if isinstance(self.optimizer, bigbatch.NLCG):
            return self.optimizer.buffer_nbytes()
        if isinstance(self.optimizer, bigbatch.SPNGD):
            engine = self.optimizer.engine
            return unique_nbytes(
                [
                    *optimizer_tensors(self.optimizer),
                    *engine.stats.values(),
                    *(t for slots in engine.inverses.values() for t in slots.values()),
                ]
            )
        if self.grad_maker is not None:
            gm = self.grad_maker
            fisher = [getattr(m, gm._fisher_attr, None) for m in gm.modules_for_curvature]
            return unique_nbytes([*optimizer_tensors(self.optimizer), *tensors_in(fisher)])
        return storage_nbytes(self.optimizer)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [
        v for entry in optimizer.state.values() for v in entry.values() if isinstance(v, Tensor)
    ]


def unique_nbytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the unique storages behind ``tensors``."""
    seen: dict[tuple[str, int], int] = {}
    for value in tensors:
        storage = value.untyped_storage()
        seen[(str(value.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def storage_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the unique tensor storages referenced from ``optimizer.state``."""
    return unique_nbytes(optimizer_tensors(optimizer))


def tensors_in(obj: Any, depth: int = 4) -> list[Tensor]:
    """Tensors reachable from ``obj`` through attributes, lists and dicts (bounded depth)."""
    if isinstance(obj, Tensor):
        return [obj]
    if depth == 0 or obj is None or isinstance(obj, (str, bytes, int, float, bool, nn.Module)):
        return []
    if isinstance(obj, dict):
        children: Iterable[Any] = obj.values()
    elif isinstance(obj, (list, tuple)):
        children = obj
    elif hasattr(obj, "__dict__"):
        children = vars(obj).values()
    else:
        return []
    return [t for child in children for t in tensors_in(child, depth - 1)]


def describe_optimizer(c: Contender) -> str:
    """Class name and the settings that matter here, e.g. ``NLCG(DiagonalBFGS(eps=1e-08))``."""
    optimizer = c.optimizer
    name = type(optimizer).__name__
    if isinstance(optimizer, bigbatch.NLCG):
        fused = ", fused=True" if optimizer.fused else ""
        return f"{name}(beta_rule={optimizer.beta_rule!r}, {optimizer.preconditioner!r}{fused})"
    group = optimizer.param_groups[0]
    keys = [k for k in ("lr", "momentum", "damping", "betas", "foreach") if k in group]
    text = f"{name}(" + ", ".join(f"{k}={group[k]!r}" for k in keys)
    if isinstance(optimizer, bigbatch.SPNGD):
        cfg = optimizer.engine.schedule.config
        text += (
            f", staleness={cfg.enabled}"
            + (f" (max_interval={cfg.max_interval})" if cfg.enabled else "")
            + f", inversion={optimizer.engine.inverter.config.method!r}"
        )
    text += ")"
    if c.grad_maker is not None:
        cfg = c.grad_maker.config
        text = (
            f"asdl.KfacGradientMaker(fisher_type={c.grad_maker.fisher_type!r}, "
            f"damping={cfg.damping}, interval={cfg.preconditioner_upd_interval}) + {text}"
        )
    return text


def make_contender(name: str, model: nn.Module, plan: Plan, batch_size: int) -> Contender:
    params = list(model.parameters())
    grad_maker = None
    optimizer: torch.optim.Optimizer
    if name == "sgd":
        optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, foreach=True)
    elif name == "adam":
        optimizer = torch.optim.Adam(params, lr=1e-3, foreach=True)
    elif name == "nlcg-kfac":
        pre = bigbatch.KFACPreconditioner(model, damping=KFAC_DAMPING)
        optimizer = bigbatch.NLCG(params, lr=NLCG_LR, preconditioner=pre)
    elif name in CHEAP_NLCG:
        optimizer = bigbatch.NLCG(
            params,
            lr=NLCG_LR,
            preconditioner=name.removeprefix("nlcg-").removesuffix("-fused"),
            fused=name in FUSED_NLCG,
        )
    elif name in ("spngd-stale", "spngd-every"):
        optimizer = bigbatch.SPNGD(
            model,
            lr=KFAC_LR,
            momentum=KFAC_MOMENTUM,
            damping=KFAC_DAMPING,
            staleness=name == "spngd-stale",
        )
    elif name in ("asdl-kfac-every", "asdl-kfac-10"):
        if asdl is None:
            raise RuntimeError(f"{name} needs the asdl package ({ASDL_IMPORT_ERROR})")
        interval = 1 if name == "asdl-kfac-every" else ASDL_INTERVAL
        config = asdl.PreconditioningConfig(
            data_size=batch_size,
            damping=KFAC_DAMPING,
            preconditioner_upd_interval=interval,
            curvature_upd_interval=interval,
        )
        grad_maker = asdl.KfacGradientMaker(model, config, fisher_type=asdl.FISHER_EMP)
        optimizer = torch.optim.SGD(params, lr=KFAC_LR, momentum=KFAC_MOMENTUM, foreach=True)
    else:
        raise ValueError(f"unknown contender {name!r}")
    return Contender(name, model, optimizer, plan, grad_maker=grad_maker)


def plan_contenders(
    names: Sequence[str], fast_rounds: int, args: argparse.Namespace
) -> dict[str, Plan]:
    """Warm-up and timed rounds per contender; SGD is timed over the longest window."""
    plans: dict[str, Plan] = {}
    for name in names:
        if name == "spngd-stale":
            plans[name] = Plan(args.stale_warmup, args.amortized_rounds)
        elif name == "nlcg-kfac":  # half the window, to bound the run time
            plans[name] = Plan(args.stale_warmup, max(1, args.amortized_rounds // 2))
        elif name == "asdl-kfac-10":
            rounds = ASDL_INTERVAL * math.ceil(args.amortized_rounds / ASDL_INTERVAL)
            plans[name] = Plan(args.warmup, rounds)
        elif name in EVERY_STEP_KFAC:
            plans[name] = Plan(args.warmup, args.kfac_rounds)
        else:
            plans[name] = Plan(args.warmup, fast_rounds)
    plans["sgd"] = Plan(args.warmup, max(p.rounds for p in plans.values()))
    return plans


def build_contenders(
    spec: ModelSpec, names: Sequence[str], plans: dict[str, Plan], batch_size: int, seed: int
) -> list[Contender]:
    contenders = []
    for name in names:
        torch.manual_seed(seed)  # the same initial weights for every contender
        model = spec.build()
        model.train()
        contenders.append(make_contender(name, model, plans[name], batch_size))
    total = max(c.plan.warmup + c.plan.rounds for c in contenders)
    for c in contenders:  # every window ends at the last round
        c.timed_from = total - c.plan.rounds
        c.first_round = c.timed_from - c.plan.warmup
    return contenders


def train_step(c: Contender, x: Tensor, y: Tensor) -> tuple[float, float, int]:
    """One training step; returns (full seconds, optimizer.step seconds, refreshed stats)."""
    due = c.refresh_due()
    before = int(c.engine.schedule.refreshed) if c.engine is not None else 0
    if c.grad_maker is not None:
        gm = c.grad_maker
        t0 = time.perf_counter()
        c.optimizer.zero_grad()
        dummy_y = gm.setup_model_call(c.model, x)
        gm.setup_loss_call(F.cross_entropy, dummy_y, y)
        _, loss = gm.forward_and_backward()  # curvature, inverse and preconditioning too
        t1 = time.perf_counter()
        c.optimizer.step()
        t2 = time.perf_counter()
    else:
        t0 = time.perf_counter()
        c.optimizer.zero_grad()
        loss = F.cross_entropy(c.model(x), y)
        loss.backward()
        t1 = time.perf_counter()
        c.optimizer_step(loss)
        t2 = time.perf_counter()
    c.last_loss = float(loss.detach())  # outside the timed region
    refreshed = int(c.engine.schedule.refreshed) - before if c.engine is not None else due
    return t2 - t0, t2 - t1, refreshed


def run_rounds(
    contenders: list[Contender],
    batches: list[tuple[Tensor, Tensor]],
    rng: random.Random,
    on_round: Callable[[int, int], None] | None = None,
) -> None:
    total = max(c.plan.warmup + c.plan.rounds for c in contenders)
    gc_was_enabled = gc.isenabled()
    try:
        for r in range(total):
            active = [c for c in contenders if c.first_round <= r]
            rng.shuffle(active)
            x, y = batches[r % len(batches)]
            gc.collect()
            gc.disable()
            times = [(c, train_step(c, x, y)) for c in active]
            gc.enable()
            for c, (full, step, refreshed) in times:
                if r >= c.timed_from:
                    c.full_s.append(full)
                    c.step_s.append(step)
                    c.refreshed.append(refreshed)
                    c.timed_rounds.append(r)
            if on_round is not None:
                on_round(r, total)
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


def aligned(
    num: Contender, den: Contender, attr: str = "full_s"
) -> tuple[list[float], list[float]]:
    """The two contenders' timings (``full_s`` or ``step_s``) in the rounds both timed."""
    den_by_round = dict(zip(den.timed_rounds, getattr(den, attr), strict=True))
    pairs = [
        (v, den_by_round[r])
        for r, v in zip(num.timed_rounds, getattr(num, attr), strict=True)
        if r in den_by_round
    ]
    return [a for a, _ in pairs], [b for _, b in pairs]


def ratio_of(
    num: Contender, den: Contender | None, attr: str, stat: Callable[[Sequence[float]], float]
) -> float | None:
    """``stat`` of ``num``'s whole window over ``stat`` of ``den`` in the same rounds."""
    if den is None:
        return None
    _, den_values = aligned(num, den, attr)
    if not den_values:
        return None
    return stat(getattr(num, attr)) / stat(den_values)


def paired_ratio(num: Contender, den: Contender | None, attr: str) -> float | None:
    """Median over common rounds of the per-round ratio (robust to drift between rounds)."""
    if den is None:
        return None
    a, b = aligned(num, den, attr)
    return statistics.median(x / y for x, y in zip(a, b, strict=True)) if a else None


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


def refresh_summary(c: Contender) -> dict[str, Any] | None:
    """Refresh statistics of a K-FAC contender over its timed window."""
    n_stats = c.n_statistics
    if not n_stats:
        return None
    steps = len(c.refreshed)
    refresh_ms = [1e3 * f for f, n in zip(c.full_s, c.refreshed, strict=True) if n]
    other_ms = [1e3 * f for f, n in zip(c.full_s, c.refreshed, strict=True) if not n]
    out: dict[str, Any] = {
        "statistics": n_stats,
        "fraction_window": sum(c.refreshed) / (steps * n_stats),
        "steps_with_refresh": len(refresh_ms),
        "full_ms_mean_refresh_steps": statistics.fmean(refresh_ms) if refresh_ms else None,
        "full_ms_mean_other_steps": statistics.fmean(other_ms) if other_ms else None,
    }
    if c.engine is not None:
        intervals = list(c.engine.schedule.intervals.values())
        out["fraction_total"] = c.engine.schedule.refresh_fraction
        out["intervals_at_end"] = {
            "min": min(intervals),
            "median": statistics.median(intervals),
            "max": max(intervals),
        }
    if isinstance(c.optimizer, bigbatch.SPNGD):
        out["opt_refresh_fraction"] = c.optimizer.refresh_fraction
    return out


def benchmark_model(
    spec: ModelSpec,
    names: Sequence[str],
    fast_rounds: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    batch_size, seed = args.batch_size, args.seed
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [spec.random_batch(batch_size, NUM_CLASSES, gen) for _ in range(args.batches)]
    plans = plan_contenders(names, fast_rounds, args)
    contenders = build_contenders(spec, names, plans, batch_size, seed)
    total = max(c.plan.warmup + c.plan.rounds for c in contenders)
    n_params = sum(p.numel() for p in contenders[0].model.parameters())
    windows = "; ".join(
        f"{c.name} {c.plan.warmup}+{c.plan.rounds}" for c in contenders if c.name != "sgd"
    )
    print(
        f"\n== {spec.name}: {n_params:,} parameters, batch {batch_size}, {len(contenders)} "
        f"contenders, {total} rounds; warm-up+timed rounds: sgd {plans['sgd'].warmup}+"
        f"{plans['sgd'].rounds}; {windows}",
        flush=True,
    )
    if any(n in KFAC_CONTENDERS for n in names):
        print(
            "   K-FAC windows: spngd-stale and nlcg-kfac warm up untimed for "
            f"{args.stale_warmup} steps (refresh intervals reach their steady state) before "
            "their timed window; asdl-kfac-10's window is a whole number of its 10-step "
            "periods; every window ends at the last round, next to SGD's",
            flush=True,
        )
    rng = random.Random(seed)
    load_before = load_average()
    started = time.perf_counter()

    def progress(r: int, total: int) -> None:
        if (r + 1) % max(1, total // 8) == 0 or r + 1 == total:
            elapsed = time.perf_counter() - started
            print(f"   round {r + 1}/{total} ({elapsed:.1f} s)", file=sys.stderr, flush=True)

    run_rounds(contenders, batches, rng, on_round=progress)
    wall_s = time.perf_counter() - started
    load_after = load_average()

    by_name = {c.name: c for c in contenders}
    sgd, adam = by_name["sgd"], by_name.get("adam")
    rows: dict[str, Any] = {}
    for c in contenders:
        full, step = summary_ms(c.full_s), summary_ms(c.step_s)
        fwd_bwd = [1e3 * (f - s) for f, s in zip(c.full_s, c.step_s, strict=True)]
        is_asdl = c.grad_maker is not None
        row: dict[str, Any] = {
            "optimizer": describe_optimizer(c),
            "full_step_ms": full,
            "optimizer_step_ms": step,
            "full_ratio_to_sgd": ratio_of(c, sgd, "full_s", statistics.median),
            "step_ratio_to_adam": None
            if is_asdl
            else ratio_of(c, adam, "step_s", statistics.median),
            "full_ratio_to_sgd_paired": paired_ratio(c, sgd, "full_s"),
            "step_ratio_to_adam_paired": None if is_asdl else paired_ratio(c, adam, "step_s"),
            "fwd_bwd_ms_median": statistics.median(fwd_bwd),
            "state_bytes": c.state_nbytes(),
            "state_mib": c.state_nbytes() / MIB,
            "state_storage_bytes": storage_nbytes(c.optimizer),
            "final_loss": c.last_loss,
            "warmup": c.plan.warmup,
            "timed_rounds": c.plan.rounds,
            "first_timed_round": c.timed_from,
            "full_ratio_to_sgd_mean": ratio_of(c, sgd, "full_s", statistics.fmean),
            "fwd_bwd_ms_mean": statistics.fmean(fwd_bwd),
            "amortized": c.name in AMORTIZED,
            "figure": "mean" if c.name in AMORTIZED else "median",
            "full_step_ms_series": [round(1e3 * f, 2) for f in c.full_s],
        }
        if is_asdl:
            row["step_timing"] = (
                "optimizer.step() is the SGD update only; curvature, inversion and "
                "preconditioning run inside grad_maker.forward_and_backward()"
            )
        refresh = refresh_summary(c)
        if refresh is not None:
            row["refresh"] = refresh
        if isinstance(c.optimizer, bigbatch.NLCG | bigbatch.SPNGD):
            row["skipped_steps"] = c.optimizer.skipped_steps
            if c.optimizer.skipped_steps:
                print(
                    f"   warning: {c.name} skipped {c.optimizer.skipped_steps} non-finite steps",
                    file=sys.stderr,
                )
        if c.name in CHEAP_NLCG:
            row["full_pass"] = row["full_ratio_to_sgd"] <= FULL_TARGET
            step_ratio = row["step_ratio_to_adam"]
            target = FUSED_STEP_TARGET if c.name in FUSED_NLCG else STEP_TARGET
            row["step_target"] = target
            row["step_pass"] = None if step_ratio is None else step_ratio <= target
        rows[c.name] = row
    result = {
        "model": spec.name,
        "parameters": n_params,
        "param_bytes": sum(p.numel() * p.element_size() for p in contenders[0].model.parameters()),
        "input_shape": list(spec.input_shape),
        "batch_size": batch_size,
        "rounds": fast_rounds,
        "warmup": args.warmup,
        "total_rounds": total,
        "timed_wall_s": wall_s,  # all rounds, warm-up included (windows overlap)
        "load_average_1min": {"before": load_before, "after": load_after},
        "peak_rss_mib_after": peak_rss_mib(),
        "contenders": rows,
        "kfac_targets": kfac_targets(by_name),
    }
    print_table(result)
    return result


def kfac_targets(by_name: dict[str, Contender]) -> dict[str, Any]:
    """SP-NGD's two targets, where their contenders ran."""
    out: dict[str, Any] = {}
    sgd = by_name["sgd"]
    if "spngd-stale" in by_name:
        ratio = ratio_of(by_name["spngd-stale"], sgd, "full_s", statistics.fmean)
        out["spngd_stale_mean_vs_sgd"] = ratio
        out["spngd_stale_pass"] = ratio is not None and ratio <= STALE_TARGET
    if "spngd-every" in by_name and "asdl-kfac-every" in by_name:
        ratio = ratio_of(
            by_name["spngd-every"], by_name["asdl-kfac-every"], "full_s", statistics.fmean
        )
        out["spngd_every_mean_vs_asdl_every"] = ratio
        out["spngd_every_vs_asdl_every_median"] = ratio_of(
            by_name["spngd-every"], by_name["asdl-kfac-every"], "full_s", statistics.median
        )
        out["spngd_every_vs_asdl_every_paired"] = paired_ratio(
            by_name["spngd-every"], by_name["asdl-kfac-every"], "full_s"
        )
        out["spngd_every_pass"] = ratio is not None and ratio <= PEER_TARGET
    return out


def _fmt(value: float | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def print_table(result: dict[str, Any]) -> None:
    rows = result["contenders"]
    header = (
        f"{'contender':<15} {'full ms':>9} {'x SGD':>7} {'(paired)':>8} {'step() ms':>10} "
        f"{'x Adam':>7} {'(paired)':>8} {'state MiB':>10}  verdict"
    )
    print("medians:")
    print(header)
    print("-" * (len(header) + 22))
    for name, row in rows.items():
        verdict = ""
        if "full_pass" in row:
            full_v = "PASS" if row["full_pass"] else "FAIL"
            step_v = {True: "PASS", False: "FAIL", None: "n/a"}[row["step_pass"]]
            verdict = f"full {full_v}, step() {step_v}"
        step_ms = None if "step_timing" in row else row["optimizer_step_ms"]["median"]
        print(
            f"{name:<15} {row['full_step_ms']['median']:>9.2f} "
            f"{_fmt(row['full_ratio_to_sgd'], '.3f', 7)} "
            f"{_fmt(row['full_ratio_to_sgd_paired'], '.3f', 8)} "
            f"{_fmt(step_ms, '.3f', 10)} {_fmt(row['step_ratio_to_adam'], '.2f', 7)} "
            f"{_fmt(row['step_ratio_to_adam_paired'], '.2f', 8)} {row['state_mib']:>10.2f}  "
            f"{verdict}"
        )
    print(
        f"targets: NLCG (none/bfgs/adam) full step <= {FULL_TARGET:.2f}x SGD full step; "
        f"NLCG step() <= {STEP_TARGET:.2f}x Adam(foreach) step(), fused=True <= "
        f"{FUSED_STEP_TARGET:.2f}x (verdicts use the ratios of "
        "medians over the same rounds; '(paired)' is the median of per-round ratios); ASDL's "
        "step() is only its SGD update (its curvature work is in the forward/backward), so '-'"
    )
    header2 = (
        f"{'contender':<15} {'rounds':>9} {'mean ms':>9} {'median ms':>10} {'max ms':>9} "
        f"{'x SGD mean':>10} {'x SGD med':>9} {'fwd/bwd ms':>10} {'refreshed':>9}  figure"
    )
    print("\nmean (amortized), median and slowest full step over each contender's window:")
    print(header2)
    print("-" * (len(header2) + 4))
    for name, row in rows.items():
        full = row["full_step_ms"]
        refresh = row.get("refresh")
        fraction = None if refresh is None else refresh["fraction_window"]
        print(
            f"{name:<15} {row['warmup']:>3}+{row['timed_rounds']:<5} {full['mean']:>9.2f} "
            f"{full['median']:>10.2f} {full['max']:>9.2f} "
            f"{_fmt(row['full_ratio_to_sgd_mean'], '.3f', 10)} "
            f"{_fmt(row['full_ratio_to_sgd'], '.3f', 9)} {row['fwd_bwd_ms_mean']:>10.2f} "
            f"{_fmt(fraction, '.3f', 9)}  {row['figure']}"
        )
    print(
        "rounds: warm-up+timed; ratios to SGD use SGD's steps in the same rounds; fwd/bwd: "
        "mean full minus step() (includes the curvature hooks; for ASDL all its K-FAC work); "
        "refreshed: fraction of (statistic, step) pairs refreshed in the window"
    )
    for name, row in rows.items():
        refresh = row.get("refresh")
        if refresh is None:
            continue
        extra = ""
        if "intervals_at_end" in refresh:
            iv = refresh["intervals_at_end"]
            extra = (
                f"; whole run {refresh['fraction_total']:.3f}; intervals at the end "
                f"min/median/max {iv['min']}/{iv['median']:g}/{iv['max']}"
            )
        with_r, without = refresh["full_ms_mean_refresh_steps"], refresh["full_ms_mean_other_steps"]
        print(
            f"  {name}: {refresh['statistics']} statistics, refreshed fraction in window "
            f"{refresh['fraction_window']:.3f} ({refresh['steps_with_refresh']}/"
            f"{row['timed_rounds']} steps refresh something{extra}); mean full step "
            f"{_fmt(with_r, '.1f', 0)} ms with a refresh, {_fmt(without, '.1f', 0)} ms without"
        )
    targets = result["kfac_targets"]
    if "spngd_stale_mean_vs_sgd" in targets:
        ratio = targets["spngd_stale_mean_vs_sgd"]
        print(
            f"target SP-NGD stale, amortized (mean) <= {STALE_TARGET:.2f}x SGD: "
            f"{_fmt(ratio, '.3f', 0)}x -> {'PASS' if targets['spngd_stale_pass'] else 'FAIL'}"
        )
    if "spngd_every_mean_vs_asdl_every" in targets:
        ratio = targets["spngd_every_mean_vs_asdl_every"]
        print(
            f"target SP-NGD every step <= {PEER_TARGET:.2f}x ASDL K-FAC every step (mean): "
            f"{_fmt(ratio, '.3f', 0)}x (medians "
            f"{_fmt(targets['spngd_every_vs_asdl_every_median'], '.3f', 0)}x, paired "
            f"{_fmt(targets['spngd_every_vs_asdl_every_paired'], '.3f', 0)}x) -> "
            f"{'PASS' if targets['spngd_every_pass'] else 'FAIL'}"
        )
    if result["model"] == "resnet20" and any(n.startswith("asdl-") for n in rows):
        ref = ", ".join(f"{k} {v}x" for k, v in REFERENCE_RATIOS.items())
        print(f"reference ratios to SGD measured earlier (ResNet-20, mean of 30 steps): {ref}")
    load = result["load_average_1min"]
    cpus = _available_cpus()
    if cpus and any(v is not None and v > cpus + 0.5 for v in load.values()):
        print(
            f"warning: load average {load['before']:.2f} -> {load['after']:.2f} on {cpus} CPUs: "
            "other processes competed for the CPU; the timings are unreliable"
        )
    print(
        f"parameters: {result['param_bytes'] / MIB:.2f} MiB; {result['total_rounds']} rounds "
        f"took {result['timed_wall_s']:.1f} s; "
        f"process peak RSS so far {result['peak_rss_mib_after']:.0f} MiB",
        flush=True,
    )


def _available_cpus() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def _asdl_version() -> str | None:
    if asdl is None:
        return None
    try:
        from importlib.metadata import version

        return version("asdfghjkl")
    except Exception:  # pragma: no cover - metadata missing
        return getattr(asdl, "__version__", "unknown")


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
        "asdfghjkl": _asdl_version(),
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
        "--contenders",
        nargs="+",
        choices=CONTENDERS,
        default=list(CONTENDERS),
        help="contenders to run (sgd, the baseline, is always added; ASDL ones are skipped "
        "with a note when asdl is not installed)",
    )
    parser.add_argument(
        "--kfac-models",
        nargs="*",
        choices=sorted(MODEL_SPECS),
        default=["resnet20"],
        help="models on which the K-FAC contenders (spngd-*, nlcg-kfac, asdl-*) run",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"timed rounds of sgd/adam/nlcg-* per model (default per model: {DEFAULT_ROUNDS})",
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds per contender")
    parser.add_argument(
        "--kfac-rounds",
        type=int,
        default=DEFAULT_KFAC_ROUNDS,
        help="timed rounds of spngd-every and asdl-kfac-every",
    )
    parser.add_argument(
        "--amortized-rounds",
        type=int,
        default=DEFAULT_AMORTIZED_ROUNDS,
        help="timed rounds of spngd-stale and asdl-kfac-10 (rounded up to a multiple of "
        f"{ASDL_INTERVAL}); nlcg-kfac gets half of them",
    )
    parser.add_argument(
        "--stale-warmup",
        type=int,
        default=DEFAULT_STALE_WARMUP,
        help="untimed rounds of spngd-stale and nlcg-kfac (refresh intervals reach steady state)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--batches",
        type=int,
        default=NUM_BATCHES,
        help="distinct random batches, generated before timing and cycled through",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if min(args.kfac_rounds, args.amortized_rounds) < 1:
        parser.error("--kfac-rounds and --amortized-rounds must be >= 1")
    if min(args.warmup, args.stale_warmup) < 0 or min(args.threads, args.batch_size) < 1:
        parser.error("--warmup and --stale-warmup must be >= 0, --threads and --batch-size >= 1")
    if args.batches < 1:
        parser.error("--batches must be >= 1")
    return args


def select_contenders(
    requested: Sequence[str], model: str, kfac_models: Sequence[str]
) -> list[str]:
    """The contenders to run on ``model``, in the canonical order, SGD always first."""
    names = [n for n in CONTENDERS if n in requested or n == "sgd"]
    if model not in kfac_models:
        names = [n for n in names if n not in KFAC_CONTENDERS]
    if asdl is None:
        names = [n for n in names if not n.startswith("asdl-")]
    return names


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # ASDL's hooks trigger torch's deprecation warning on every forward
    warnings.filterwarnings("ignore", message="Using a non-full backward hook")
    started = time.perf_counter()
    machine = machine_info()
    print(
        f"B1 step overhead | {machine['cpu_model']} | {machine['cpus_available']} CPUs | "
        f"torch {machine['torch']} | {machine['torch_threads']} threads | load average "
        f"{_fmt(load_average(), '.2f', 0)}"
    )
    requested_asdl = [n for n in args.contenders if n.startswith("asdl-")]
    if requested_asdl and asdl is None:
        print(
            f"note: {', '.join(requested_asdl)} skipped: asdl not importable "
            f"({ASDL_IMPORT_ERROR}); pip install --no-deps -r benchmarks/requirements-peers.txt"
        )
    skipped_models = [m for m in args.models if m not in args.kfac_models]
    if skipped_models and any(n in KFAC_CONTENDERS for n in args.contenders):
        print(
            f"note: K-FAC contenders run on {', '.join(args.kfac_models) or 'no model'} only "
            f"(not on {', '.join(skipped_models)}; see --kfac-models)"
        )
    results = []
    for name in args.models:
        rounds = args.rounds if args.rounds is not None else DEFAULT_ROUNDS[name]
        names = select_contenders(args.contenders, name, args.kfac_models)
        results.append(benchmark_model(MODEL_SPECS[name], names, rounds, args))
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
            "kfac_rounds": args.kfac_rounds,
            "amortized_rounds": args.amortized_rounds,
            "stale_warmup": args.stale_warmup,
            "kfac_models": args.kfac_models,
            "threads": args.threads,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "num_batches": args.batches,
            "contenders": {
                "sgd": "torch.optim.SGD(lr=0.01, momentum=0.9, foreach=True)",
                "adam": "torch.optim.Adam(lr=1e-3, foreach=True)",
                "nlcg-<P>": f"bigbatch.NLCG(lr={NLCG_LR}, preconditioner=P); step(loss=loss)",
                "nlcg-<P>-fused": f"bigbatch.NLCG(lr={NLCG_LR}, preconditioner=P, fused=True); "
                "step(loss=loss)",
                "spngd-stale": f"bigbatch.SPNGD(model, lr={KFAC_LR}, momentum={KFAC_MOMENTUM}, "
                f"damping={KFAC_DAMPING}) (staleness=True)",
                "spngd-every": f"bigbatch.SPNGD(model, lr={KFAC_LR}, momentum={KFAC_MOMENTUM}, "
                f"damping={KFAC_DAMPING}, staleness=False)",
                "nlcg-kfac": f"bigbatch.NLCG(lr={NLCG_LR}, preconditioner=bigbatch."
                f"KFACPreconditioner(model, damping={KFAC_DAMPING})); step(loss=loss)",
                "asdl-kfac-<k>": "asdl.KfacGradientMaker(model, PreconditioningConfig("
                f"data_size=batch, damping={KFAC_DAMPING}, preconditioner_upd_interval=k, "
                "curvature_upd_interval=k), fisher_type='fisher_emp') + torch.optim.SGD("
                f"lr={KFAC_LR}, momentum={KFAC_MOMENTUM}, foreach=True); k = 1 (every) or "
                f"{ASDL_INTERVAL}",
            },
            "amortized_contenders": list(AMORTIZED),
            "timing": "perf_counter; interleaved rounds in shuffled order; gc off in a round; "
            "per-contender windows ending at the last round; ratios over common rounds",
        },
        "targets": {
            "nlcg_full_step_vs_sgd_max": FULL_TARGET,
            "nlcg_step_vs_adam_foreach_max": STEP_TARGET,
            "nlcg_fused_step_vs_adam_foreach_max": FUSED_STEP_TARGET,
            "spngd_stale_mean_vs_sgd_max": STALE_TARGET,
            "spngd_every_mean_vs_asdl_every_max": PEER_TARGET,
        },
        "reference_ratios_to_sgd": REFERENCE_RATIOS,
        "results": {r["model"]: r for r in results},
        "wall_s": wall,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out} (wall time {wall:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
