"""Distributed SP-NGD on 2 and 4 gloo ranks: after several steps the parameters equal the
single-process run on the full batch (float64), in "simple" and "hybrid" mode, with and
without gradient accumulation and with stale statistics; every rank holds identical
parameters and schedule; the gathered checkpoint equals the single-process one; hybrid mode
sends fewer statistics bytes than simple mode."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bigbatch import SPNGD, StalenessConfig
from bigbatch.distributed.config import DistributedConfig
from bigbatch.distributed.kfac_sync import DistributedCurvature
from bigbatch.distributed.local_ranks import run_on_ranks

pytestmark = pytest.mark.slow  # multi-process or end to end: not in make test-fast

GLOBAL_BATCH = 16
STEPS = 8
SCENARIOS = [(mode, micro) for mode in ("simple", "hybrid") for micro in (1, 2)]


class _Scale(nn.Module):
    """A parameter without a Fisher block (plain momentum SGD, fallback owner)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(48, 6),
        nn.LayerNorm(6),
        nn.Tanh(),
        nn.Linear(6, 3),
        _Scale(),
    ).double()


def _data(step: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 2, 4, 4, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (GLOBAL_BATCH,), generator=gen)


def _optimizer(model: nn.Module, distributed: DistributedConfig | None) -> SPNGD:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback parameter's warning
        return SPNGD(
            model,
            lr=0.1,
            momentum=0.9,
            damping=1e-2,
            weight_decay=1e-4,
            kl_clip=1e-2,
            staleness=StalenessConfig(threshold=0.5, max_interval=4),
            distributed=distributed,
        )


def _train(
    rank: int, world: int, mode: str | None, micro: int
) -> tuple[nn.Module, SPNGD, list[int]]:
    model = _model()
    opt = _optimizer(model, None if mode is None else DistributedConfig(mode))
    stat_bytes: list[int] = []
    shard = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = _data(step)
        x, y = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
        opt.zero_grad()
        for xm, ym in zip(x.chunk(micro), y.chunk(micro), strict=True):
            (F.cross_entropy(model(xm), ym) / micro).backward()
        opt.step()
        if isinstance(opt.engine.strategy, DistributedCurvature):
            stat_bytes.append(opt.engine.strategy.last_stat_bytes)
    return model, opt, stat_bytes


def _summary(model: nn.Module, opt: SPNGD, stat_bytes: list[int]) -> dict[str, Any]:
    state = opt.state_dict()  # a collective in hybrid mode
    sync = opt.engine.strategy if isinstance(opt.engine.strategy, DistributedCurvature) else None
    reloaded = _optimizer(model, None if sync is None else sync.config)
    reloaded.load_state_dict(state)
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "momentum": [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()],
        "schedule": opt.engine.schedule.state_dict(),
        "stats": state["curvature"]["stats"],
        "stat_bytes": stat_bytes,
        "bytes": {} if sync is None else dict(sync.comm.counter.bytes_sent),
        "local_inverses": sorted(opt.engine.inverses),
        "reloaded_inverses": sorted(reloaded.engine.inverses),
        "state": state,
    }


def _embedding_model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


class _TinyLM(nn.Module):
    """A causal transformer LM: MultiheadAttention blocks, LayerNorms and a head tied to
    the embedding through F.linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.emb = nn.Embedding(7, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(8)

    def forward(self, idx: Tensor) -> Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1], dtype=torch.float64)
        h = self.body(self.emb(idx), mask=mask, is_causal=True)
        return F.linear(self.norm(h), self.emb.weight)


def _variant(rank: int, world: int, variant: str, mode: str | None) -> dict[str, Any]:
    """Sequence models with accumulation (Embedding block and Linear over positions; a
    transformer LM with attention and a tied head), or the conv model with a NaN gradient
    on the last rank at step 1 (every rank skips it)."""
    models = {"embedding": _embedding_model, "transformer": lambda: _TinyLM().double()}
    model = models.get(variant, _model)()
    vocab = 7 if variant == "transformer" else 3
    opt = _optimizer(model, None if mode is None else DistributedConfig(mode))
    shard = GLOBAL_BATCH // world
    for step in range(STEPS // 2):
        gen = torch.Generator().manual_seed(200 + step)
        if variant in models:
            x = torch.randint(0, 7, (GLOBAL_BATCH, 3), generator=gen)
            y = torch.randint(0, vocab, (GLOBAL_BATCH, 3), generator=gen)
        else:
            x, y = _data(step)
        x, y = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
        opt.zero_grad()
        micro = 2 if variant in models else 1
        for xm, ym in zip(x.chunk(micro), y.chunk(micro), strict=True):
            out = model(xm)
            (F.cross_entropy(out.reshape(-1, vocab), ym.reshape(-1)) / micro).backward()
        if variant == "nan" and step == 1 and rank == world - 1:
            next(model.parameters()).grad[0].fill_(float("nan"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skipped step's warning
            opt.step()
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "schedule": opt.engine.schedule.state_dict(),
        "skipped": opt.skipped_steps,
    }


def _ranks(rank: int, world: int) -> dict[Any, dict[str, Any]]:
    out: dict[Any, dict[str, Any]] = {
        (mode, micro): _summary(*_train(rank, world, mode, micro)) for mode, micro in SCENARIOS
    }
    for variant in ("embedding", "transformer", "nan"):
        out[variant] = _variant(rank, world, variant, "hybrid")
    return out


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    return _summary(*_train(0, 1, None, 1))


@pytest.fixture(scope="module", params=[2, 4])
def ranks(request: pytest.FixtureRequest) -> list[dict[Any, dict[str, Any]]]:
    return run_on_ranks(_ranks, int(request.param))


@pytest.mark.parametrize(("mode", "micro"), SCENARIOS)
def test_equals_single_process_full_batch(
    ranks: list[dict[Any, dict[str, Any]]],
    reference: dict[str, Any],
    mode: str,
    micro: int,
) -> None:
    first = ranks[0][(mode, micro)]
    for p, q in zip(first["params"], reference["params"], strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
    for p, q in zip(first["momentum"], reference["momentum"], strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
    assert first["schedule"] == reference["schedule"]  # same stale-statistics decisions
    assert 0 < first["schedule"]["refreshed"] < first["schedule"]["total"]  # some stale
    assert sorted(first["stats"]) == sorted(reference["stats"])  # full gathered checkpoint
    for name, value in reference["stats"].items():
        torch.testing.assert_close(first["stats"][name], value, rtol=1e-9, atol=1e-12)
    for other in ranks[1:]:  # every rank identical, bit for bit
        out = other[(mode, micro)]
        assert all(torch.equal(p, q) for p, q in zip(out["params"], first["params"], strict=True))
        assert all(
            torch.equal(p, q) for p, q in zip(out["momentum"], first["momentum"], strict=True)
        )
        assert out["schedule"] == first["schedule"]


def _continue(params: list[Tensor], state: dict[str, Any]) -> list[Tensor]:
    """One more single-process step from ``params`` and an optimizer ``state``."""
    model = _model()
    with torch.no_grad():
        for p, q in zip(model.parameters(), params, strict=True):
            p.copy_(q)
    opt = _optimizer(model, None)
    opt.load_state_dict(state)
    x, y = _data(STEPS)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return [p.detach() for p in model.parameters()]


def test_checkpoint_resumes_in_one_process(
    ranks: list[dict[Any, dict[str, Any]]], reference: dict[str, Any]
) -> None:
    expected = _continue(reference["params"], reference["state"])
    out = ranks[-1][("hybrid", 2)]  # saved by the last rank: every rank has the full state
    for p, q in zip(_continue(out["params"], out["state"]), expected, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
    assert out["reloaded_inverses"] == out["local_inverses"]  # each rank reloads its own


@pytest.mark.parametrize("variant", ["embedding", "transformer", "nan"])
def test_sequence_models_and_nonfinite_gradient_match_single_process(
    ranks: list[dict[Any, dict[str, Any]]], variant: str
) -> None:
    expected = _variant(0, 1, variant, None)
    assert expected["skipped"] == (1 if variant == "nan" else 0)
    for r in ranks:
        out = r[variant]
        assert out["skipped"] == expected["skipped"]
        assert out["schedule"] == expected["schedule"]
        for p, q in zip(out["params"], expected["params"], strict=True):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
            assert bool(torch.isfinite(p).all())


def test_hybrid_partitions_inverses_and_sends_fewer_statistic_bytes(
    ranks: list[dict[Any, dict[str, Any]]],
) -> None:
    world = len(ranks)
    held = [r[("hybrid", 1)]["local_inverses"] for r in ranks]
    everything = ranks[0][("simple", 1)]["local_inverses"]
    assert sorted(n for h in held for n in h) == everything  # each block on one owner only
    simple = [sum(r[("simple", 1)]["stat_bytes"][k] for r in ranks) for k in range(STEPS)]
    hybrid = [sum(r[("hybrid", 1)]["stat_bytes"][k] for r in ranks) for k in range(STEPS)]
    # stale statistics: later steps send less than the first (where every statistic is due)
    assert min(simple) == 0 < simple[0]
    assert sum(simple[STEPS // 2 :]) < (STEPS - STEPS // 2) * simple[0]
    # reduce-scatter to owners instead of all-reduce to everyone: (W-1) S against 2 (W-1) S
    assert sum(hybrid) < sum(simple)
    assert sum(hybrid[STEPS // 2 :]) < sum(simple[STEPS // 2 :])  # steady state
    for k in range(STEPS):
        assert hybrid[k] * 2 == pytest.approx(simple[k], rel=0.01, abs=8)
    assert all(r[("hybrid", 1)]["bytes"]["directions"] > 0 for r in ranks)
    print(
        f"\nW={world} statistic bytes/step simple={ranks[0][('simple', 1)]['stat_bytes']} "
        f"hybrid={ranks[0][('hybrid', 1)]['stat_bytes']}; total bytes over {STEPS} steps "
        f"simple={ranks[0][('simple', 1)]['bytes']} hybrid={ranks[0][('hybrid', 1)]['bytes']}"
    )
