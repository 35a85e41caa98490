"""NLCG's element-wise passes fused into a few compiled kernels (``NLCG(fused=True)``).

On parameter-sized flat buffers the unfused step is memory-bound: the diagonal-BFGS update
alone makes about a dozen passes (the gradient change ``y``, ``h*s``, two dot products, the
update of ``h``, the division, the new direction). Each function here does in one pass what
the unfused code does in several, and is compiled once per buffer size and dtype by
``torch.compile`` (inductor: C++ on the CPU, Triton on CUDA), the first time it runs (a few
seconds per kernel). Scalars are passed as 0-d tensors, so a new value never recompiles.

When compilation is not possible (no C++ compiler, an unsupported platform) a warning says
so once and the same functions run eagerly: the results stay correct, only not fused.
Every function is plain PyTorch, and the eager run is the reference the tests compare to.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "adam_update_apply",
    "bfgs_apply",
    "bfgs_secant_products",
    "bfgs_update_apply",
    "new_direction",
    "reset_compilation",
]

F = TypeVar("F", bound=Callable[..., Any])

_compiled: dict[str, Callable[..., Any]] = {}
_failed: list[str] = []


def _fused(fn: F) -> F:
    """Run ``fn`` compiled (compiling at the first call); eagerly when that fails."""
    name = fn.__name__

    def run(*args: Any) -> Any:
        if _failed:
            return fn(*args)
        compiled = _compiled.get(name)
        if compiled is None:
            compiled = torch.compile(fn, fullgraph=True, dynamic=False)
            _compiled[name] = compiled
        try:
            return compiled(*args)
        except Exception as error:  # compilation failed: the eager function is the same math
            _failed.append(f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")
            warnings.warn(
                f"NLCG(fused=True): torch.compile could not build the fused step "
                f"({_failed[0]}); running the same passes unfused from now on",
                RuntimeWarning,
                stacklevel=3,
            )
            return fn(*args)

    run.__name__ = name
    run.__doc__ = fn.__doc__
    return run  # type: ignore[return-value]


def reset_compilation() -> None:
    """Forget compiled kernels and an earlier failure (tests)."""
    _compiled.clear()
    _failed.clear()


@_fused
def bfgs_secant_products(g: Tensor, g_prev: Tensor, d: Tensor, h: Tensor) -> Tensor:
    """``[sum((g - g_prev) d), sum(d h d)]`` in one pass (``y`` is never stored)."""
    y = g - g_prev
    return torch.stack([(y * d).sum(), (d * h * d).sum()])


@_fused
def bfgs_update_apply(
    g: Tensor,
    g_prev: Tensor,
    d: Tensor,
    h: Tensor,
    a: Tensor,
    b: Tensor,
    const: Tensor,
    eps: Tensor,
    out: Tensor,
) -> Tensor:
    """``h <- |h - a (h d)^2 + b y^2 + const|``, ``out <- g / (h + eps)``; returns ``g.out``."""
    y = g - g_prev
    hd = h * d
    h_new = torch.abs(h - a * hd * hd + b * y * y + const)
    z = g / (h_new + eps)
    h.copy_(h_new)
    out.copy_(z)
    return (g * z).sum()


@_fused
def bfgs_apply(g: Tensor, h: Tensor, eps: Tensor, out: Tensor) -> Tensor:
    """``out <- g / (h + eps)`` (the update was skipped); returns ``g.out``."""
    z = g / (h + eps)
    out.copy_(z)
    return (g * z).sum()


@_fused
def adam_update_apply(
    g: Tensor,
    v: Tensor,
    beta2: Tensor,
    one_minus_beta2: Tensor,
    root_bc: Tensor,
    eps_root_bc: Tensor,
    out: Tensor,
) -> Tensor:
    """``v <- beta2 v + (1 - beta2) g^2``, ``out <- root_bc g / (sqrt(v) + eps root_bc)``;
    returns ``g.out``. (``1 - beta2`` comes in double-precision-rounded, as the unfused
    step's: formed from a float32 ``beta2`` it would be off by 5e-5 relative.)"""
    v_new = beta2 * v + one_minus_beta2 * g * g
    z = root_bc * g / (torch.sqrt(v_new) + eps_root_bc)
    v.copy_(v_new)
    out.copy_(z)
    return (g * z).sum()


@_fused
def new_direction(d: Tensor, z: Tensor, beta: Tensor) -> None:
    """``d <- beta d - z`` in one pass."""
    d.copy_(beta * d - z)
