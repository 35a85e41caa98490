"""The critical batch size: where steps-to-target stops falling linearly with the batch.

Perfect scaling from the smallest batch ``B0`` (which needed ``S0`` steps) is
``S0 * B0 / B`` steps at batch ``B``. Following Zhang et al. (2024, "How does critical batch
size scale in pre-training?"), the critical batch size is where the measured steps exceed
that line by a ``tolerance`` (20%): with ``r(B) = S(B) * B / (S0 * B0)`` (1 on the line), it
is the ``B`` at which ``r`` first reaches ``1 + tolerance``, interpolated linearly in
``log B`` between the two batch sizes around the crossing. A batch size that never reached
the target counts as beyond the line, with no slope to interpolate on: the estimate is then
the last batch size still within the line. When no measured batch size crosses, the critical
batch size is at least the largest one measured (``lower_bound``); when the smallest one
already misses the target, nothing can be said.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["CriticalBatch", "critical_batch_size"]


@dataclass(frozen=True)
class CriticalBatch:
    """The estimate: ``value`` (a batch size), or None when the smallest batch missed."""

    value: float | None
    #: True: no measured batch exceeded the line, so the true value is >= ``value``
    lower_bound: bool
    #: ``r(B)`` per measured batch (inf where the target was not reached)
    excess: tuple[float, ...]


def critical_batch_size(
    points: Sequence[tuple[int, int | None]], tolerance: float = 0.2
) -> CriticalBatch:
    """``points``: (batch size, steps to target or None); any order, distinct sizes."""
    pts = sorted(points)
    if not pts:
        raise ValueError("critical_batch_size needs at least one (batch, steps) point")
    sizes = [b for b, _ in pts]
    if len(set(sizes)) != len(sizes) or any(b <= 0 for b in sizes):
        raise ValueError(f"critical_batch_size: batch sizes must be distinct and > 0: {sizes}")
    if tolerance <= 0:
        raise ValueError(f"critical_batch_size: tolerance must be > 0, got {tolerance}")
    b0, s0 = pts[0]
    if s0 is None or s0 <= 0:
        return CriticalBatch(None, False, tuple(math.inf for _ in pts))
    excess = tuple(math.inf if s is None else s * b / (s0 * b0) for b, s in pts)
    limit = 1.0 + tolerance
    for k in range(1, len(pts)):
        if excess[k] >= limit:
            lo, hi = math.log(sizes[k - 1]), math.log(sizes[k])
            r_lo, r_hi = excess[k - 1], excess[k]
            if math.isinf(r_hi):  # missed the target: no slope to interpolate on
                return CriticalBatch(float(sizes[k - 1]), False, excess)
            frac = (limit - r_lo) / (r_hi - r_lo) if r_hi > r_lo else 1.0
            return CriticalBatch(math.exp(lo + frac * (hi - lo)), False, excess)
    return CriticalBatch(float(sizes[-1]), True, excess)
