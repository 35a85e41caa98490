"""Line searches for NLCG's deterministic (full-batch) mode.

A line search receives ``phi(t) -> (f, g)``, which evaluates the objective and its flat
gradient at ``w + t*d``, and returns the accepted step. :class:`StrongWolfe` wraps PyTorch's
own strong-Wolfe search (the one ``torch.optim.LBFGS`` uses: bracketing and cubic
interpolation), so this project does not carry a second implementation of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor
from torch.optim.lbfgs import _strong_wolfe

__all__ = ["LineSearch", "LineSearchResult", "Phi", "StrongWolfe"]

Phi = Callable[[float], tuple[float, Tensor]]


@dataclass(frozen=True)
class LineSearchResult:
    t: float  # accepted step length
    loss: float  # objective at w + t*d
    grad: Tensor  # flat gradient at w + t*d (a tensor the caller may keep)
    evaluations: int  # closure calls spent


class LineSearch(Protocol):
    def __call__(
        self, phi: Phi, loss: float, grad: Tensor, direction: Tensor, gtd: float, t0: float
    ) -> LineSearchResult: ...


class StrongWolfe:
    """Strong-Wolfe conditions ``f(t) <= f + c1 t g.d`` and ``|g(t).d| <= c2 |g.d|``.

    ``c2 = 0.1`` (the usual choice for conjugate gradients, which need a more accurate
    search than quasi-Newton methods). ``max_evals`` bounds closure calls per search.
    """

    def __init__(
        self,
        c1: float = 1e-4,
        c2: float = 0.1,
        max_evals: int = 25,
        tolerance_change: float = 1e-12,
    ) -> None:
        if not 0.0 < c1 < 1.0:
            raise ValueError(f"StrongWolfe c1 must be in (0, 1), got {c1!r}")
        if not c1 < c2 < 1.0:
            raise ValueError(f"StrongWolfe c2 must be in (c1, 1) = ({c1}, 1), got {c2!r}")
        if not (isinstance(max_evals, int) and max_evals >= 1):
            raise ValueError(f"StrongWolfe max_evals must be an int >= 1, got {max_evals!r}")
        if not (tolerance_change >= 0.0 and math.isfinite(tolerance_change)):
            raise ValueError(
                f"StrongWolfe tolerance_change must be finite and >= 0, got {tolerance_change!r}"
            )
        self.c1, self.c2, self.max_evals = c1, c2, max_evals
        self.tolerance_change = tolerance_change

    def __call__(
        self, phi: Phi, loss: float, grad: Tensor, direction: Tensor, gtd: float, t0: float
    ) -> LineSearchResult:
        def obj_func(_x: object, t: float, _d: Tensor) -> tuple[float, Tensor]:
            return phi(float(t))

        f_new, g_new, t, evals = _strong_wolfe(
            obj_func,
            None,
            t0,
            direction,
            loss,
            grad,
            gtd,
            c1=self.c1,
            c2=self.c2,
            tolerance_change=self.tolerance_change,
            max_ls=self.max_evals,
        )
        return LineSearchResult(float(t), float(f_new), g_new, int(evals))

    def __repr__(self) -> str:
        return f"StrongWolfe(c1={self.c1}, c2={self.c2}, max_evals={self.max_evals})"
