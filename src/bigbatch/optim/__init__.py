"""The optimizers: ``torch.optim.Optimizer`` subclasses and their building blocks."""

from __future__ import annotations

from bigbatch.optim.kfac_preconditioner import KFACPreconditioner
from bigbatch.optim.line_search import LineSearch, LineSearchResult, StrongWolfe
from bigbatch.optim.nlcg import NLCG
from bigbatch.optim.preconditioners import (
    AdamDiagonal,
    DiagonalBFGS,
    IdentityPreconditioner,
    Preconditioner,
    SecantPair,
)
from bigbatch.optim.spngd import SPNGD

__all__ = [
    "NLCG",
    "SPNGD",
    "AdamDiagonal",
    "DiagonalBFGS",
    "IdentityPreconditioner",
    "KFACPreconditioner",
    "LineSearch",
    "LineSearchResult",
    "Preconditioner",
    "SecantPair",
    "StrongWolfe",
]
