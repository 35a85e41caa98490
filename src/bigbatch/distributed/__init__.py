"""Distributed curvature: owner assignment of Fisher blocks, packed collectives, strategies.

``DistributedConfig`` is what users pass as ``SPNGD(..., distributed=...)``; ``comm`` wraps
``torch.distributed``; ``assignment`` balances blocks over ranks; ``kfac_sync`` holds
:class:`DistributedCurvature`, the data-parallel
:class:`~bigbatch.curvature.strategy.CurvatureStrategy` of the curvature engine. This
package imports the curvature engine; the engine never imports it.
"""

from __future__ import annotations

from bigbatch.distributed.assignment import assign_owners, block_cost, loads
from bigbatch.distributed.comm import ByteCounter, Communicator
from bigbatch.distributed.config import DistributedConfig
from bigbatch.distributed.data_parallel import RanksDivergedError
from bigbatch.distributed.kfac_sync import DistributedCurvature

__all__ = [
    "ByteCounter",
    "Communicator",
    "DistributedConfig",
    "DistributedCurvature",
    "RanksDivergedError",
    "assign_owners",
    "block_cost",
    "loads",
]
