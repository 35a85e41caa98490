"""Owner assignment of Fisher blocks (covers every block once, LPT-balanced, deterministic)
and the packed collectives of ``bigbatch.distributed.comm`` on 3 gloo ranks."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from torch import nn

from bigbatch.curvature.capture import CurvatureCapture
from bigbatch.distributed import assign_owners, block_cost, loads
from bigbatch.distributed.comm import (
    Communicator,
    pack_symmetric,
    symmetric_numel,
    unpack_symmetric,
)
from bigbatch.distributed.config import DistributedConfig
from bigbatch.distributed.local_ranks import run_on_ranks


def _lpt_bound(costs: list[float], world: int) -> float:
    """LPT's guarantee: max load <= (4/3 - 1/(3W)) OPT, with OPT >= max(mean load, max cost)."""
    opt_lower = max(sum(costs) / world, max(costs))
    return (4.0 / 3.0 - 1.0 / (3.0 * world)) * opt_lower


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_random_costs_covered_once_and_within_lpt_bound(world: int) -> None:
    rng = random.Random(world)
    for _ in range(50):
        costs = {f"b{i}": rng.choice([1.0, 8.0, 27.0, 1000.0]) * rng.random() for i in range(12)}
        owner = assign_owners(costs, world)
        assert set(owner) == set(costs)  # every block exactly once (a dict: one owner each)
        assert all(0 <= r < world for r in owner.values())
        load = loads(owner, costs, world)
        assert sum(load) == pytest.approx(sum(costs.values()))
        assert max(load) <= _lpt_bound(list(costs.values()), world) * (1 + 1e-12)
        assert assign_owners(dict(costs), world) == owner  # deterministic


def test_model_blocks_balanced_better_than_contiguous_chunks() -> None:
    model = nn.Sequential(
        nn.Linear(64, 64),
        nn.LayerNorm(64),
        nn.Linear(64, 8),
        nn.Linear(8, 8),
        nn.Conv2d(3, 8, 3),
        nn.Linear(8, 64),
        nn.Embedding(50, 8),
    )
    blocks = CurvatureCapture(model).blocks
    costs = {name: block_cost(b) for name, b in blocks.items()}
    assert all(c > 0 for c in costs.values())
    world = 3
    owner = assign_owners(costs, world)
    assert sorted(owner) == sorted(blocks)
    names = list(costs)
    chunk = -(-len(names) // world)
    contiguous = {n: k // chunk for k, n in enumerate(names)}
    assert max(loads(owner, costs, world)) <= max(loads(contiguous, costs, world))
    assert max(loads(owner, costs, world)) <= _lpt_bound(list(costs.values()), world)


def test_more_ranks_than_blocks_and_bad_world_size() -> None:
    owner = assign_owners({"a": 3.0, "b": 1.0}, 4)
    assert owner == {"a": 0, "b": 1}
    with pytest.raises(ValueError, match="world_size"):
        assign_owners({"a": 1.0}, 0)
    with pytest.raises(ValueError, match="cost"):
        assign_owners({"a": float("nan")}, 2)
    with pytest.raises(ValueError, match="mode"):
        DistributedConfig("ring")


def test_symmetric_packing_round_trip() -> None:
    m = torch.randn(5, 5, dtype=torch.float64)
    m = m + m.T
    packed = pack_symmetric(m)
    assert packed.shape == (symmetric_numel(5),)
    assert torch.equal(unpack_symmetric(packed, 5), m)
    batch = torch.randn(4, 2, 2)
    batch = batch + batch.transpose(-1, -2)
    assert torch.equal(unpack_symmetric(pack_symmetric(batch), 2), batch)


def _collectives(rank: int, world: int) -> dict[str, Any]:
    comm = Communicator()
    sizes = [3, 0, 5]
    segments = [torch.full((n,), float(rank + 1) * (k + 1)) for k, n in enumerate(sizes)]
    mine = comm.reduce_scatter(segments, "rs").clone()
    gathered = comm.all_gather(torch.arange(sizes[rank], dtype=torch.float32), sizes, "ag")
    total = comm.all_reduce(torch.ones(4), "ar")
    return {
        "mine": mine,
        "gathered": gathered,
        "total": total,
        "bytes": dict(comm.counter.bytes_sent),
    }


@pytest.mark.slow  # three processes
def test_collectives_on_three_ranks() -> None:
    world = 3
    outs = run_on_ranks(_collectives, world)
    rank_sum = float(sum(range(1, world + 1)))
    for rank, out in enumerate(outs):
        sizes = [3, 0, 5]
        assert torch.equal(out["mine"], torch.full((sizes[rank],), rank_sum * (rank + 1)))
        assert [g.tolist() for g in out["gathered"]] == [list(map(float, range(n))) for n in sizes]
        assert torch.equal(out["total"], torch.full((4,), float(world)))
        # per-owner reduce: the other owners' segments; uneven all-gather as one broadcast
        # per segment ((W-1)/W of all of them, not the padded (W-1) x largest); ring all-reduce
        assert out["bytes"]["rs"] == 4 * (8 - sizes[rank])
        assert out["bytes"]["ag"] == 4 * (world - 1) * 8 // world
        assert out["bytes"]["ag"] < 4 * (world - 1) * 5
        assert out["bytes"]["ar"] == 2 * (world - 1) * 16 // world
