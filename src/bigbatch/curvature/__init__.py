"""The curvature engine: Kronecker-factored and unit-wise Fisher blocks for SP-NGD and NLCG.

Data flows one way: ``blocks`` (one file per layer kind; ``blocks.registry`` maps modules to
kinds) -> ``capture`` (module hooks and ``functional`` uses record each block's sums) ->
``staleness`` (when each statistic is refreshed) -> ``linalg`` (damped inversion) ->
``engine`` (absorbs, inverts, preconditions, checkpoints), run by a ``strategy`` (one
process here; data-parallel ones in :mod:`bigbatch.distributed`, which this package does
not import). Statistics are keyed by ``(block, Factor)`` (``keys``).
"""

from __future__ import annotations

from bigbatch.curvature.capture import CurvatureCapture
from bigbatch.curvature.engine import KFACEngine
from bigbatch.curvature.keys import BlockKind, Factor
from bigbatch.curvature.strategy import (
    CurvatureStrategy,
    LocalCurvature,
    RefreshReport,
    StepOutcome,
)

__all__ = [
    "BlockKind",
    "CurvatureCapture",
    "CurvatureStrategy",
    "Factor",
    "KFACEngine",
    "LocalCurvature",
    "RefreshReport",
    "StepOutcome",
]
