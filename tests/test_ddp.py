"""The optimizers in a user's own data-parallel loop on 2 gloo ranks, found by themselves.

Each rank runs forward/backward on its half of every global batch with the mean loss over
that half, passes its LOCAL loss to NLCG, and either wraps the model in
``DistributedDataParallel`` (before or after building the optimizer) or does nothing
(the optimizer then averages the gradients itself). After the run every rank holds the
same parameters, equal (float64, 1e-9) to one process on the global batch. A rank whose
parameters were changed behind the optimizer's back is caught by the consistency check.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from bigbatch import NLCG, SPNGD, KFACPreconditioner, StalenessConfig
from bigbatch.distributed import DistributedCurvature, RanksDivergedError
from bigbatch.distributed.local_ranks import run_on_ranks

pytestmark = pytest.mark.slow  # multi-process or end to end: not in make test-fast

GLOBAL_BATCH = 16
STEPS = 12


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
    ).double()


def _batch(step: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(50 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (GLOBAL_BATCH,), generator=gen)


def _optimizer(kind: str, model: nn.Module) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "spngd":
            return SPNGD(
                model,
                lr=0.1,
                damping=1e-2,
                staleness=StalenessConfig(threshold=0.5, max_interval=4),
            )
        if kind == "nlcg":
            return NLCG(model.parameters(), lr=0.1, step_control_period=2)
        return NLCG(
            model.parameters(),
            lr=0.1,
            step_control_period=2,
            preconditioner=KFACPreconditioner(
                model, 1e-2, staleness=StalenessConfig(threshold=0.5)
            ),
        )


def _train(rank: int, world: int, kind: str, wrap: str) -> dict[str, Any]:
    """``wrap``: "before" (DDP, then the optimizer), "after" (the optimizer on the bare
    model, then DDP) or "none" (no DDP)."""
    model = _model()
    net: nn.Module = model
    if wrap == "before":
        net = DDP(model)
    opt = _optimizer(kind, net if wrap == "before" else model)
    if wrap == "after":
        net = DDP(model)
    shard = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = _batch(step)
        x, y = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)  # this rank's local mean
        loss.backward()
        if kind == "spngd":
            opt.step()
        else:
            opt.step(loss=loss)
    out: dict[str, Any] = {"params": [p.detach().clone() for p in model.parameters()]}
    engine = getattr(opt, "engine", None) or getattr(opt.preconditioner, "engine", None)
    if engine is not None and isinstance(engine.strategy, DistributedCurvature):
        out["averaged"] = engine.strategy.agreement.averaged
        out["bytes"] = dict(engine.strategy.comm.counter.bytes_sent)
    return out


def _all_cases(rank: int, world: int) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (kind, wrap): _train(rank, world, kind, wrap)
        for kind in ("spngd", "nlcg", "nlcg-kfac")
        for wrap in ("before", "after", "none")
    }


@pytest.fixture(scope="module")
def ranks() -> list[dict[tuple[str, str], dict[str, Any]]]:
    return run_on_ranks(_all_cases, 2)


@pytest.mark.parametrize("kind", ["spngd", "nlcg", "nlcg-kfac"])
@pytest.mark.parametrize("wrap", ["before", "after", "none"])
def test_user_loop_on_two_ranks_equals_one_process(
    ranks: list[dict[tuple[str, str], dict[str, Any]]], kind: str, wrap: str
) -> None:
    expected = _train(0, 1, kind, "none")["params"]
    for r in ranks:
        for p, q in zip(r[(kind, wrap)]["params"], expected, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
    first, second = (r[(kind, wrap)]["params"] for r in ranks)
    assert all(torch.equal(p, q) for p, q in zip(first, second, strict=True))
    if kind == "spngd":  # DDP averaged the gradients: SP-NGD did not send them again
        assert ranks[0][(kind, wrap)]["averaged"] is (wrap != "none")


def _diverge(rank: int, world: int, kind: str) -> str:
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "spngd":
            opt: Any = SPNGD(model, lr=0.1, consistency_every=3)
        else:
            opt = NLCG(model.parameters(), lr=0.1, consistency_every=3)
    try:
        for step in range(6):
            x, y = _batch(step)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step() if kind == "spngd" else opt.step(loss=loss)
            if step == 1 and rank == 1:
                with torch.no_grad():
                    model[0].weight[0, 0] += 1e-6  # behind the optimizer's back
    except RanksDivergedError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("kind", ["spngd", "nlcg"])
def test_ranks_that_drift_apart_are_caught(kind: str) -> None:
    messages = run_on_ranks(_diverge, 2, kind)
    for message in messages:
        assert "the ranks hold different parameters after step 3" in message
        assert "rank 0:" in message
        assert "rank 1:" in message


def test_ddp_over_a_single_rank_trains_like_no_ddp() -> None:
    """A DDP script run with one process (a debugging run of the same script): SPNGD trains
    locally, exactly like the unwrapped model, instead of refusing."""
    from bigbatch.distributed.local_ranks import free_port

    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:

        def run(wrap: bool) -> list[Tensor]:
            torch.manual_seed(0)
            model: nn.Module = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
            inner = model
            if wrap:
                model = nn.parallel.DistributedDataParallel(model)
            opt = SPNGD(model, lr=0.1, momentum=0.9, damping=1e-2)
            gen = torch.Generator().manual_seed(1)
            for _ in range(3):
                x = torch.randn(8, 6, generator=gen, dtype=torch.float64)
                y = torch.randint(0, 3, (8,), generator=gen)
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
            return [p.detach().clone() for p in inner.parameters()]

        for a, b in zip(run(True), run(False), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    finally:
        torch.distributed.destroy_process_group()
