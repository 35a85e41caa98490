"""The curvature engine: Kronecker-factored and unit-wise Fisher blocks for SP-NGD and NLCG.

Data flows one way: ``capture`` (module hooks) -> per-layer statistics (``layers``) ->
accumulation over micro-batches (``accumulator``) -> refresh scheduling (``staleness``) ->
damped inversion (``linalg``) -> preconditioned gradients (``blocks``). Every statistic is
a plain tensor keyed by block and name, so it can be packed, sent to an owner rank, inverted
there and gathered back (the distributed layer) without touching the math.
"""

from __future__ import annotations
