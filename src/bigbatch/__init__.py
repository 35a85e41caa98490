"""bigbatch: optimizers and tools for training with very large mini-batches.

Public API: :class:`NLCG` (stochastic preconditioned nonlinear conjugate gradient) with its
preconditioners (K-FAC among them), and :class:`SPNGD` (K-FAC natural gradient with stale
statistics). The curvature engine is in :mod:`bigbatch.curvature`.
"""

from __future__ import annotations

from bigbatch.curvature.linalg import InversionConfig
from bigbatch.curvature.staleness import StalenessConfig
from bigbatch.distributed import DistributedConfig
from bigbatch.optim import (
    NLCG,
    SPNGD,
    AdamDiagonal,
    DiagonalBFGS,
    IdentityPreconditioner,
    KFACPreconditioner,
    LineSearch,
    LineSearchResult,
    Preconditioner,
    SecantPair,
    StrongWolfe,
)

__version__ = "0.2.0"

__all__ = [
    "NLCG",
    "SPNGD",
    "AdamDiagonal",
    "DiagonalBFGS",
    "DistributedConfig",
    "IdentityPreconditioner",
    "InversionConfig",
    "KFACPreconditioner",
    "LineSearch",
    "LineSearchResult",
    "Preconditioner",
    "SecantPair",
    "StalenessConfig",
    "StrongWolfe",
    "__version__",
]
