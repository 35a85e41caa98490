"""The optimizers: ``torch.optim.Optimizer`` subclasses and their building blocks."""

from __future__ import annotations

from bigbatch.optim.line_search import LineSearch, LineSearchResult, StrongWolfe
from bigbatch.optim.nlcg import NLCG
from bigbatch.optim.preconditioners import (
    AdamDiagonal,
    DiagonalBFGS,
    IdentityPreconditioner,
    Preconditioner,
    SecantPair,
)

__all__ = [
    "NLCG",
    "AdamDiagonal",
    "DiagonalBFGS",
    "IdentityPreconditioner",
    "LineSearch",
    "LineSearchResult",
    "Preconditioner",
    "SecantPair",
    "StrongWolfe",
]
