"""Hyperparameter checks that raise a ``ValueError`` naming the parameter and its range."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any, TypeVar, cast

S = TypeVar("S", bound=str)

__all__ = [
    "FLOAT32_MAX",
    "check_bool",
    "check_choice",
    "check_int",
    "check_number",
    "check_unique_params",
]

#: hyperparameters enter float32 arithmetic: larger magnitudes would overflow there
FLOAT32_MAX = 3.4028234663852886e38
#: integer options beyond this are not meaningful and could overflow C integers
INT_MAX = 2**62


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number in ``[low, high]`` (``(`` / ``)`` when open); returns it as float."""
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    interval = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number in {interval}, got {value!r}")
    try:
        v = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}") from None
    if math.isfinite(v) and abs(v) > FLOAT32_MAX:
        raise ValueError(
            f"{name}={value!r} is too large: optimizer arithmetic is float32 or wider, whose "
            f"largest value is {FLOAT32_MAX:.4g}"
        )
    ok = math.isfinite(v)
    if ok and low is not None:
        ok = v > low if low_open else v >= low
    if ok and high is not None:
        ok = v < high if high_open else v <= high
    if not ok:
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return v


def check_int(name: str, value: Any, *, low: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= INT_MAX:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an integer in [{low}, 2**62]{extra}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``True`` or ``False`` itself (no truthy strings or numbers)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_unique_params(params: Any, what: str) -> None:
    """Refuse a parameter listed twice in one group (it would get twice the step)."""
    seen: set[int] = set()
    for k, p in enumerate(params):
        if id(p) in seen:
            raise ValueError(
                f"{what}: parameter {k} (shape {tuple(p.shape)}) is listed twice in its group; "
                "each parameter may appear once"
            )
        seen.add(id(p))


def check_choice(name: str, value: Any, choices: Collection[S]) -> S:
    """``value`` (lower-cased) when it is one of ``choices`` (typed by their Literal)."""
    if not isinstance(value, str) or value.lower() not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return cast(S, value.lower())
