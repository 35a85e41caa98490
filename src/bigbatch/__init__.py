"""bigbatch: optimizers and tools for training with very large mini-batches.

Public API: :class:`NLCG` (stochastic preconditioned nonlinear conjugate gradient) and its
preconditioners. The SP-NGD optimizer, the curvature engine and the training harness come in
their own subpackages.
"""

from __future__ import annotations

from bigbatch.optim import (
    NLCG,
    AdamDiagonal,
    DiagonalBFGS,
    IdentityPreconditioner,
    LineSearch,
    LineSearchResult,
    Preconditioner,
    SecantPair,
    StrongWolfe,
)

__version__ = "0.1.0"

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
    "__version__",
]
