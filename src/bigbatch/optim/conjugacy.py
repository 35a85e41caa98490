"""Conjugacy (beta) rules of nonlinear CG, on global scalar products.

With ``r = -g`` the negative gradient, ``z = P r`` the preconditioned one, ``d`` the previous
search direction and ``y = g - g_prev``, the new direction is ``d_new = z + beta * d``:

- ``"fr"``  Fletcher-Reeves:      ``r.z / (r_prev.z_prev + eps)``   (the reference's default)
- ``"pr"``  Polak-Ribiere (prec.): ``(r.z - r.z_prev) / (r_prev.z_prev + eps)``
- ``"pr+"`` ``max(0, PR)``
- ``"hs"``  Hestenes-Stiefel:     ``-z.y / d.y``
- ``"dy"``  Dai-Yuan:             ``r.z / d.y``
- ``"hs-dy"`` hybrid:             ``max(0, min(HS, DY))`` (Dai and Yuan, 2001)
- ``"fr-pr"`` hybrid:             ``max(-FR, min(PR, FR))`` (Gilbert and Nocedal, 1992)

A zero or non-finite denominator gives ``beta = 0`` (a restart). Clipping to the optimizer's
``beta_clip`` range happens after the rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["BETA_RULES", "ConjugacyScalars", "beta_from_rule"]

BETA_RULES = ("fr", "pr", "pr+", "hs", "dy", "hs-dy", "fr-pr")
#: Rules that need ``r.z_prev`` (so the optimizer keeps ``z_prev``).
RULES_NEEDING_Z_PREV = frozenset({"pr", "pr+", "fr-pr"})
#: Rules that need ``y = g - g_prev`` and ``d.y`` / ``z.y``.
RULES_NEEDING_Y = frozenset({"hs", "dy", "hs-dy"})


@dataclass(frozen=True)
class ConjugacyScalars:
    """The global scalar products a rule may use (``None`` when not computed)."""

    rz: float  # r.z
    rz_prev: float  # r_prev.z_prev
    r_zprev: float | None = None  # r.z_prev
    zy: float | None = None  # z.y
    dy: float | None = None  # d.y


def _div(num: float, den: float) -> float:
    if den == 0.0 or not math.isfinite(den):
        return 0.0
    out = num / den
    return out if math.isfinite(out) else 0.0


def beta_from_rule(rule: str, c: ConjugacyScalars, eps: float) -> float:
    """Raw beta of ``rule`` (before clipping)."""
    fr = _div(c.rz, c.rz_prev + eps)
    if rule == "fr":
        return fr
    if rule in RULES_NEEDING_Z_PREV:
        if c.r_zprev is None:
            raise ValueError(f"beta rule {rule!r} needs r.z_prev")
        pr = _div(c.rz - c.r_zprev, c.rz_prev + eps)
        if rule == "pr":
            return pr
        if rule == "pr+":
            return max(0.0, pr)
        return max(-fr, min(pr, fr))
    if rule in RULES_NEEDING_Y:
        if c.zy is None or c.dy is None:
            raise ValueError(f"beta rule {rule!r} needs z.y and d.y")
        hs = _div(-c.zy, c.dy)
        dy = _div(c.rz, c.dy)
        if rule == "hs":
            return hs
        if rule == "dy":
            return dy
        return max(0.0, min(hs, dy))
    raise ValueError(f"beta_rule must be one of {BETA_RULES}, got {rule!r}")
