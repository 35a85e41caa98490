"""The CUDA path (issue 16), run by benchmarks/gpu/run.py on a GPU machine: SPNGD, NLCG and
NLCG-K-FAC on CUDA equal the CPU in float64; bf16 autocast capture; NCCL (world size 1)
through SP-NGD's hybrid code path and DDP; torch.compile on CUDA equals eager; no host
synchronisation in a steady-state SP-NGD step that refreshes nothing. Without CUDA every
test here is skipped, with that reason (the only skip the suite has)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bigbatch import NLCG, SPNGD, DistributedConfig, KFACPreconditioner, StalenessConfig

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 32),
        nn.LayerNorm(32),
        nn.Tanh(),
        nn.Linear(32, 10),
    )


def _data(step: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(32, 3, 8, 8, generator=gen, dtype=dtype)
    return x.to(device), torch.randint(0, 10, (32,), generator=gen).to(device)


Build = Callable[[nn.Module], torch.optim.Optimizer]
OPTIMIZERS: dict[str, Build] = {
    "spngd": lambda m: SPNGD(m, lr=0.05, momentum=0.9, damping=1e-2),
    "nlcg-bfgs": lambda m: NLCG(m.parameters(), lr=0.05),
    "nlcg-kfac": lambda m: NLCG(m.parameters(), lr=0.05, preconditioner=KFACPreconditioner(m)),
}


def _train(name: str, device: torch.device, steps: int = 4) -> list[Tensor]:
    model = _model().double().to(device)
    opt = OPTIMIZERS[name](model)
    for step in range(steps):
        x, y = _data(step, device, torch.float64)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if isinstance(opt, NLCG):
            opt.step(loss=loss)
        else:
            opt.step()
    return [p.detach().cpu() for p in model.parameters()]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_cuda_equals_cpu_in_float64(name: str) -> None:
    for a, b in zip(_train(name, CUDA), _train(name, torch.device("cpu")), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_bf16_autocast_keeps_float32_statistics() -> None:
    model = _model().to(CUDA)
    opt = SPNGD(model, lr=0.05, damping=1e-2)
    for step in range(3):
        x, y = _data(step, CUDA, torch.float32)
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    stats = opt.engine.stats
    assert stats
    assert all(t.dtype == torch.float32 and bool(torch.isfinite(t).all()) for t in stats.values())
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


@pytest.fixture
def nccl_world_of_one() -> Any:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    torch.distributed.init_process_group("nccl", rank=0, world_size=1, device_id=CUDA)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def test_nccl_hybrid_and_ddp_with_one_rank_equal_one_process(nccl_world_of_one: Any) -> None:
    def run(mode: str) -> list[Tensor]:
        model = _model().to(CUDA)
        if mode == "ddp":
            model = nn.parallel.DistributedDataParallel(model, device_ids=[0])
        cfg = DistributedConfig("hybrid") if mode == "hybrid" else False
        opt = SPNGD(model, lr=0.05, damping=1e-2, distributed=cfg if mode != "ddp" else None)
        for step in range(3):
            x, y = _data(step, CUDA, torch.float32)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return [p.detach().cpu() for p in model.parameters()]

    local = run("local")
    for mode in ("hybrid", "ddp"):
        for a, b in zip(run(mode), local, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_model_on_cuda_equals_eager() -> None:
    def run(compiled: bool) -> list[Tensor]:
        model = _model().to(CUDA)
        opt = SPNGD(model, lr=0.05, damping=1e-2)
        fwd = torch.compile(model) if compiled else model
        for step in range(3):
            x, y = _data(step, CUDA, torch.float32)
            opt.zero_grad()
            F.cross_entropy(fwd(x), y).backward()
            opt.step()
        assert opt.refresh_fraction > 0  # the capture saw the compiled forwards
        return [p.detach().cpu() for p in model.parameters()]

    for a, b in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_no_host_sync_in_a_steady_state_step_without_refresh() -> None:
    model = _model().to(CUDA)
    never = StalenessConfig(threshold=1e9, max_interval=10_000)  # nothing due after step 1
    opt = SPNGD(model, lr=0.05, damping=1e-2, staleness=never, kl_clip=None)
    x, y = _data(0, CUDA, torch.float32)
    for _ in range(3):  # the first steps refresh and invert everything
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert not syncs, [str(w.message)[:200] for w in syncs]
