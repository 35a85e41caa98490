"""Sharded checkpoints of SPNGD's hybrid state through torch.distributed.checkpoint: each of
2 gloo ranks writes only the Fisher blocks it owns; a run resumed from the checkpoint on 2
ranks equals the uninterrupted one bit for bit; the checkpoint loads in one process and
continues like the 2-rank run and like the rank-0 (gathered) checkpoint; wrong checkpoints
are refused with the reason and leave the optimizer as it was."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.nn import functional as F

from bigbatch import NLCG, SPNGD
from bigbatch.distributed.checkpoint import load_sharded, save_sharded
from bigbatch.distributed.config import DistributedConfig
from bigbatch.distributed.local_ranks import run_on_ranks

pytestmark = pytest.mark.slow  # multi-process or end to end: not in make test-fast

GLOBAL_BATCH = 16
STEPS = 4
MORE = 2


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(48, 6),
        nn.LayerNorm(6),
        nn.Tanh(),
        nn.Linear(6, 3),
    ).double()


def _optimizer(model: nn.Module, hybrid: bool) -> SPNGD:
    return SPNGD(
        model,
        lr=0.1,
        momentum=0.9,
        damping=1e-2,
        distributed=DistributedConfig("hybrid") if hybrid else None,
    )


def _train(model: nn.Module, opt: SPNGD, steps: range, rank: int, world: int) -> None:
    shard = GLOBAL_BATCH // world
    for step in steps:
        gen = torch.Generator().manual_seed(100 + step)
        x = torch.randn(GLOBAL_BATCH, 2, 4, 4, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (GLOBAL_BATCH,), generator=gen)
        x, y = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _params(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _ranks(rank: int, world: int, root: str) -> dict[str, Any]:
    model = _model()
    opt = _optimizer(model, hybrid=True)
    _train(model, opt, range(STEPS), rank, world)
    saved = _params(model)
    save_sharded(opt, f"{root}/optim")
    gathered = copy.deepcopy(opt.state_dict())  # the rank-0 path (a copy: buffers live on)
    _train(model, opt, range(STEPS, STEPS + MORE), rank, world)
    uninterrupted = _params(model)

    resumed_model = _model(seed=5)
    with torch.no_grad():
        for p, q in zip(resumed_model.parameters(), saved, strict=True):
            p.copy_(q)
    resumed = _optimizer(resumed_model, hybrid=True)
    load_sharded(resumed, f"{root}/optim")
    owned = sorted(resumed.engine.inverses)
    _train(resumed_model, resumed, range(STEPS, STEPS + MORE), rank, world)
    dist.barrier()
    return {
        "saved": saved,
        "gathered": gathered,
        "uninterrupted": uninterrupted,
        "resumed": _params(resumed_model),
        "owned": sorted(opt.engine.inverses),
        "reloaded_owned": owned,
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("dcp")
    return root, run_on_ranks(_ranks, 2, str(root))


def test_resumed_run_equals_uninterrupted(run: tuple[Path, list[dict[str, Any]]]) -> None:
    _, ranks = run
    for out in ranks:
        assert out["reloaded_owned"] == out["owned"]  # each rank got back its own blocks
        for p, q in zip(out["resumed"], out["uninterrupted"], strict=True):
            assert torch.equal(p, q)
    assert ranks[0]["owned"]
    assert ranks[1]["owned"]
    assert not set(ranks[0]["owned"]) & set(ranks[1]["owned"])  # really sharded


def test_each_rank_writes_only_its_blocks(run: tuple[Path, list[dict[str, Any]]]) -> None:
    root, ranks = run
    metadata = dcp.FileSystemReader(str(root / "optim")).read_metadata()
    files: dict[str, set[str]] = {}
    for index, info in metadata.storage_data.items():
        files.setdefault(index.fqn, set()).add(info.relative_path)
    assert all(len(where) == 1 for where in files.values())  # nothing written twice
    for rank, out in enumerate(ranks):
        for block in out["owned"]:
            mine = [k for k in files if f"/inverses/{block}/" in k or f"/stats/{block}/" in k]
            assert mine, block
            for key in mine:
                (path,) = files[key]
                assert path.startswith(f"__{rank}_"), (key, path)


def test_loads_in_one_process_like_the_gathered_checkpoint(
    run: tuple[Path, list[dict[str, Any]]],
) -> None:
    root, ranks = run
    results = []
    for load in ("sharded", "gathered"):
        model = _model(seed=7)
        with torch.no_grad():
            for p, q in zip(model.parameters(), ranks[0]["saved"], strict=True):
                p.copy_(q)
        opt = _optimizer(model, hybrid=False)
        if load == "sharded":
            load_sharded(opt, root / "optim")
            state = opt.state_dict()
            gathered = ranks[0]["gathered"]["curvature"]
            assert state["curvature"]["stats"].keys() == gathered["stats"].keys()
            for block, factors in gathered["stats"].items():
                for factor, value in factors.items():
                    assert torch.equal(state["curvature"]["stats"][block][factor], value)
        else:
            opt.load_state_dict(ranks[0]["gathered"])
        _train(model, opt, range(STEPS, STEPS + MORE), 0, 1)
        results.append(_params(model))
    for p, q, r in zip(results[0], results[1], ranks[0]["uninterrupted"], strict=True):
        assert torch.equal(p, q)
        torch.testing.assert_close(p, r, rtol=1e-9, atol=1e-11)


def test_wrong_checkpoints_are_refused_and_nothing_changes(tmp_path: Path) -> None:
    model = _model()
    opt = _optimizer(model, hybrid=False)
    _train(model, opt, range(2), 0, 1)
    before = opt.state_dict()

    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_sharded(opt, tmp_path / "absent")
    dcp.save({"x": torch.zeros(3)}, checkpoint_id=str(tmp_path / "other"))
    with pytest.raises(ValueError, match="not a bigbatch sharded optimizer checkpoint"):
        load_sharded(opt, tmp_path / "other")

    other = nn.Linear(3, 2).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nlcg = NLCG(other.parameters(), lr=0.1)
    save_sharded(nlcg, tmp_path / "nlcg")
    with pytest.raises(ValueError, match="holds the state of a NLCG, not of this SPNGD"):
        load_sharded(opt, tmp_path / "nlcg")

    wider = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(48, 7),
        nn.LayerNorm(7),
        nn.Tanh(),
        nn.Linear(7, 3),
    ).double()
    wide_opt = _optimizer(wider, hybrid=False)
    gen = torch.Generator().manual_seed(0)
    F.cross_entropy(
        wider(torch.randn(4, 2, 4, 4, generator=gen, dtype=torch.float64)),
        torch.tensor([0, 1, 2, 0]),
    ).backward()
    wide_opt.step()
    save_sharded(wide_opt, tmp_path / "wider")
    with pytest.raises(ValueError, match="shape"):
        load_sharded(opt, tmp_path / "wider")

    after = opt.state_dict()
    assert after["curvature"]["step"] == before["curvature"]["step"]
    for block, factors in before["curvature"]["stats"].items():
        for factor, value in factors.items():
            assert torch.equal(after["curvature"]["stats"][block][factor], value)
    for p, q in zip(
        [s["momentum_buffer"] for s in after["state"].values()],
        [s["momentum_buffer"] for s in before["state"].values()],
        strict=True,
    ):
        assert torch.equal(p, q)
