"""Learning-rate schedules as factor functions of the step, for ``LambdaLR``.

For: the large-batch recipes' schedules (linear warm-up, then constant, polynomial, step or
cosine decay), evaluated every optimizer step as in SP-NGD's recipe, e.g.::

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor_fn("polynomial", total_steps=T, warmup_steps=W, power=2.9)
    )
    for step in range(T):
        ...; optimizer.step(); scheduler.step()

Not for: choosing the base learning rate (the optimizer's ``lr``, which the factor
multiplies), momentum schedules, or per-epoch stepping.

The factor ``f(s)`` at step ``s`` (0-based: ``LambdaLR`` uses ``f(s)`` for the ``s``-th
optimizer step, ``f(0)`` for the first) is ``f(s) = warm(s) * decay(s)`` with, for
``W = warmup_steps``, ``T = total_steps``, ``D = T - W`` decay steps and ``F = final_factor``:

- warm-up: ``warm(s) = (s + 1) / W`` for ``s < W``, else 1; the first step uses ``1 / W``,
  step ``W - 1`` the full rate (no step runs at rate exactly 0);
- ``"constant"``: ``decay(s) = 1``;
- ``"polynomial"`` (SP-NGD's schedule, generalised to a final rate): with
  ``u = (s - W) / D`` clipped to ``[0, 1]``, ``decay(s) = F + (1 - F) (1 - u) ** power``;
  ``F = 0`` gives the reference's ``(1 - t/T) ** p`` over the post-warm-up steps;
- ``"cosine"``: ``decay(s) = F + (1 - F) (1 + cos(pi u)) / 2`` with the same ``u``;
- ``"step"``: ``decay(s) = gamma ** k`` where ``k`` counts the milestones ``m`` (fractions of
  ``T``) with ``s >= round(m T)``; milestones count from step 0, not from the end of warm-up,
  so one that falls inside the warm-up also scales the warm-up ramp.

For the polynomial and cosine decays, ``decay(W) = 1`` and ``decay(T) = F``: the last training
step ``T - 1`` uses ``F + (1 - F) (1/D) ** power`` (polynomial), slightly above ``F``, so that
with ``F = 0`` no step is wasted at rate 0. Steps past ``T`` keep the value at ``T``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from itertools import pairwise

__all__ = ["SCHEDULE_NAMES", "lr_factor_fn"]

SCHEDULE_NAMES = ("constant", "polynomial", "step", "cosine")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def lr_factor_fn(
    kind: str,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    power: float = 2.0,
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
    final_factor: float = 0.0,
) -> Callable[[int], float]:
    """The learning-rate factor ``step -> float`` of schedule ``kind`` (module docstring).

    Args:
        kind: one of :data:`SCHEDULE_NAMES`.
        total_steps: optimizer steps of the whole run (``>= 1``).
        warmup_steps: linear warm-up steps, ``0 <= warmup_steps <= total_steps``.
        power: exponent of the polynomial decay (``> 0``).
        milestones: strictly increasing fractions of ``total_steps`` in ``(0, 1]`` at which
            the step schedule multiplies the rate by ``gamma``.
        gamma: step schedule factor per milestone (``> 0``).
        final_factor: factor reached at ``total_steps`` by the polynomial and cosine decays,
            in ``[0, 1]``.

    Raises:
        ValueError: unknown ``kind`` or an invalid argument (named in the message).
    """
    if kind not in SCHEDULE_NAMES:
        raise ValueError(f"unknown schedule {kind!r}; valid kinds: {', '.join(SCHEDULE_NAMES)}")
    if not _is_int(total_steps) or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
    if not _is_int(warmup_steps) or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps must be an integer in [0, total_steps={total_steps}], "
            f"got {warmup_steps!r}"
        )
    if not (isinstance(power, (int, float)) and math.isfinite(power) and power > 0):
        raise ValueError(f"power must be a finite number > 0, got {power!r}")
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
    if not (isinstance(final_factor, (int, float)) and 0.0 <= final_factor <= 1.0):
        raise ValueError(f"final_factor must be in [0, 1], got {final_factor!r}")
    marks = [float(m) for m in milestones]
    if any(not 0.0 < m <= 1.0 for m in marks) or any(b <= a for a, b in pairwise(marks)):
        raise ValueError(
            f"milestones must be strictly increasing fractions in (0, 1], got {list(milestones)}"
        )
    milestone_steps = [round(m * total_steps) for m in marks]
    decay_steps = total_steps - warmup_steps
    final = float(final_factor)

    def progress(step: int) -> float:
        if decay_steps == 0:
            return 1.0 if step >= total_steps else 0.0
        return min(max((step - warmup_steps) / decay_steps, 0.0), 1.0)

    def factor(step: int) -> float:
        if not _is_int(step) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        warm = (step + 1) / warmup_steps if step < warmup_steps else 1.0
        if kind == "constant":
            decay = 1.0
        elif kind == "polynomial":
            decay = final + (1.0 - final) * (1.0 - progress(step)) ** power
        elif kind == "cosine":
            decay = final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress(step)))
        else:
            passed = sum(step >= m for m in milestone_steps)
            decay = float(gamma) ** passed
        return warm * decay

    return factor
