"""Precision rules shared by every block kind's statistics.

Statistics are computed in float64 when the input is float64 and in float32 otherwise
(bf16/fp16 activations from autocast are upcast first, and autocast is switched off around
the products so they really run in float32). Nothing else lives here.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = ["autocast_off", "stat_dtype", "to_stat"]


def stat_dtype(t: Tensor) -> torch.dtype:
    """The dtype statistics of ``t`` are computed in: float64 stays, everything else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def to_stat(t: Tensor) -> Tensor:
    """``t`` detached and cast to its statistics dtype (no copy when already there)."""
    return t.detach().to(stat_dtype(t))


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """A context that disables autocast on ``device`` (a no-op where autocast does not exist)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):
        return contextlib.nullcontext()
