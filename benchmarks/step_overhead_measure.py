"""B1's measurements (``step_overhead.py``): timed training steps in interleaved rounds, the
optimizers' memory, the refresh statistics of the K-FAC contenders, and ratios over common
rounds, gathered into one JSON row per contender.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bigbatch
from common import MIB, summary_ms
from step_overhead_contenders import AMORTIZED, Contender, describe_optimizer


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
    """Every round one step of each active contender, shuffled; gc off inside a round."""
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


def state_nbytes(c: Contender) -> int:
    """NLCG: ``buffer_nbytes()``; SP-NGD: momentum plus statistics and inverses; ASDL:
    SGD state plus its Fisher tensors; torch optimizers: unique storages in ``state``."""
    if isinstance(c.optimizer, bigbatch.NLCG):
        return c.optimizer.buffer_nbytes()
    if isinstance(c.optimizer, bigbatch.SPNGD):
        engine = c.optimizer.engine
        return unique_nbytes(
            [
                *optimizer_tensors(c.optimizer),
                *engine.stats.values(),
                *(t for slots in engine.inverses.values() for t in slots.values()),
            ]
        )
    if c.grad_maker is not None:
        gm = c.grad_maker
        fisher = [getattr(m, gm._fisher_attr, None) for m in gm.modules_for_curvature]
        return unique_nbytes([*optimizer_tensors(c.optimizer), *tensors_in(fisher)])
    return storage_nbytes(c.optimizer)


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


def contender_row(c: Contender, sgd: Contender, adam: Contender | None) -> dict[str, Any]:
    """A contender's timings, ratios to SGD and Adam, memory and refreshes (no verdicts)."""
    full, step = summary_ms(c.full_s), summary_ms(c.step_s)
    fwd_bwd = [1e3 * (f - s) for f, s in zip(c.full_s, c.step_s, strict=True)]
    is_asdl = c.grad_maker is not None
    row: dict[str, Any] = {
        "optimizer": describe_optimizer(c),
        "full_step_ms": full,
        "optimizer_step_ms": step,
        "full_ratio_to_sgd": ratio_of(c, sgd, "full_s", statistics.median),
        "step_ratio_to_adam": None if is_asdl else ratio_of(c, adam, "step_s", statistics.median),
        "full_ratio_to_sgd_paired": paired_ratio(c, sgd, "full_s"),
        "step_ratio_to_adam_paired": None if is_asdl else paired_ratio(c, adam, "step_s"),
        "fwd_bwd_ms_median": statistics.median(fwd_bwd),
        "state_bytes": state_nbytes(c),
        "state_mib": state_nbytes(c) / MIB,
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
    return row
