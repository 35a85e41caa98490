"""Cost-balanced assignment of Fisher blocks to owner ranks (the model-parallel half of SP-NGD).

Each block is owned by exactly one rank, which refreshes, inverts and preconditions it. The
reference splits blocks into contiguous equal-count chunks; here (our choice) a block's cost
is the work its owner does for it, ``n^3`` for inverting each ``n x n`` factor plus the
``G^-1 grad A^-1`` products, and blocks are placed greedily, largest first, onto the least
loaded rank (longest-processing-time, LPT: the largest load is at most
``(4/3 - 1/(3W))`` times the optimum). Ties are broken by block order and by the lowest
rank, so every rank computes the same assignment without communicating.

This module only decides who owns what; it does not communicate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bigbatch.curvature.blocks.base import FisherBlock

__all__ = ["assign_owners", "block_cost", "loads", "owned_by"]


def block_cost(block: FisherBlock) -> float:
    """Work (multiply-adds, up to constants) one refresh and preconditioning of ``block``
    cost: its kind's own estimate (:meth:`FisherBlock.cost`)."""
    return block.cost()


def assign_owners(costs: Mapping[str, float], world_size: int) -> dict[str, int]:
    """Owner rank of every named block: greedy LPT on ``costs`` (deterministic)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    order = {name: k for k, name in enumerate(costs)}
    for name, cost in costs.items():
        if not cost >= 0.0:
            raise ValueError(f"cost of block {name!r} must be >= 0, got {cost!r}")
    load = [0.0] * world_size
    owner: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: (-costs[n], order[n])):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += costs[name]
    return {name: owner[name] for name in costs}


def loads(owner: Mapping[str, int], costs: Mapping[str, float], world_size: int) -> list[float]:
    """Total cost per rank under ``owner``."""
    out = [0.0] * world_size
    for name, rank in owner.items():
        out[rank] += costs[name]
    return out


def owned_by(owner: Mapping[str, int], rank: int, order: Sequence[str]) -> list[str]:
    """The blocks of ``rank`` in ``order``."""
    return [name for name in order if owner[name] == rank]
