"""Distributed SP-NGD: owner assignment of Fisher blocks and packed collectives.

``DistributedConfig`` is what users pass as ``SPNGD(..., distributed=...)``; ``comm`` wraps
``torch.distributed``; ``assignment`` balances blocks over ranks; ``kfac_sync`` runs one
distributed curvature step for :class:`bigbatch.curvature.engine.KFACEngine` (imported
lazily by the engine, not here, to keep the import graph acyclic).
"""

from __future__ import annotations

from bigbatch.distributed.assignment import assign_owners, block_cost, loads
from bigbatch.distributed.comm import ByteCounter, Communicator
from bigbatch.distributed.config import DistributedConfig

__all__ = [
    "ByteCounter",
    "Communicator",
    "DistributedConfig",
    "assign_owners",
    "block_cost",
    "loads",
]
