"""``torch.compile``d models under SPNGD and NLCG-K-FAC, in every order a user may write it:
compiled before or after the optimizer is built, a compiled forward before the optimizer
exists, two compiled copies of one model class in one process. Each trains like eager
(float32, within 1e-5) and records every statistic. Dynamo's ``aot_eager`` backend keeps the
test fast on a CPU: the hooks' tracing and guards are dynamo's, whatever the backend."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bigbatch import NLCG, SPNGD, KFACPreconditioner

pytestmark = pytest.mark.slow  # torch.compile's first compilations take seconds each

BACKEND = "aot_eager"


class _Mix(nn.Module):
    """Embedding and self-attention (MultiheadAttention's projections are functional)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, idx: Tensor) -> Tensor:
        h = self.emb(idx)
        a, _ = self.attn(h, h, h, need_weights=False)
        return h + a


class _Pool(nn.Module):
    def forward(self, h: Tensor) -> Tensor:
        return h.mean(1)


def _Net() -> nn.Module:
    """A Sequential at the top: its forward's code is shared by every instance, which is
    what lets a graph compiled before the hooks existed be reused without them."""
    torch.manual_seed(0)
    return nn.Sequential(
        _Mix(), nn.LayerNorm(8), nn.Linear(8, 8), nn.Tanh(), _Pool(), nn.Linear(8, 3)
    )


IDX = torch.randint(0, 11, (16, 5), generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))


def _optimizer(kind: str, model: nn.Module) -> Any:
    if kind == "spngd":
        return SPNGD(model, lr=0.1, damping=1e-2, staleness=False)
    return NLCG(
        model.parameters(), lr=0.1, preconditioner=KFACPreconditioner(model, 1e-2, staleness=False)
    )


def _engine(opt: Any) -> Any:
    return opt.engine if isinstance(opt, SPNGD) else opt.preconditioner.engine


def _train(net: Callable[[Tensor], Tensor], opt: Any, steps: int = 3) -> None:
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(net(IDX), Y)
        loss.backward()
        if isinstance(opt, NLCG):
            opt.step(loss=loss)
        else:
            opt.step()


def _eager(kind: str) -> list[Tensor]:
    model = _Net()
    opt = _optimizer(kind, model)
    _train(model, opt)
    return [p.detach().clone() for p in model.parameters()]


def _check(model: nn.Module, opt: Any, want: list[Tensor]) -> None:
    engine = _engine(opt)
    assert len(engine.stats) == sum(len(b.factors()) for b in engine.blocks.values())
    assert engine.schedule.refresh_fraction == 1.0
    for p, q in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["spngd", "nlcg-kfac"])
@pytest.mark.parametrize(
    "order", ["compile-then-optimizer", "optimizer-then-compile", "forward-before-optimizer"]
)
def test_compiled_model_trains_like_eager(kind: str, order: str) -> None:
    torch._dynamo.reset()
    want = _eager(kind)
    model = _Net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if order == "optimizer-then-compile":
            opt = _optimizer(kind, model)
            net = torch.compile(model, backend=BACKEND)
        else:
            net = torch.compile(model, backend=BACKEND)
            if order == "forward-before-optimizer":
                with torch.no_grad():
                    net(IDX)
                net(IDX).sum().backward()  # a training forward/backward without hooks
                model.zero_grad()
            opt = _optimizer(kind, model)
        _train(net, opt)
    assert not [w for w in caught if "curvature:" in str(w.message)]  # nothing went missing
    _check(model, opt, want)


def test_two_compiled_copies_of_one_model_class() -> None:
    torch._dynamo.reset()
    want = _eager("spngd")
    models = [_Net(), _Net()]
    nets = [torch.compile(m, backend=BACKEND) for m in models]
    nets[0](IDX)  # the class's forward is compiled once before any optimizer exists
    opts = [_optimizer("spngd", m) for m in models]
    for net, opt in zip(nets, opts, strict=True):
        _train(net, opt)
    for model, opt in zip(models, opts, strict=True):
        _check(model, opt, want)


def test_deep_copies_of_a_compiled_batchnorm_cnn_stepped_in_turn() -> None:
    """SGD, SPNGD and NLCG-K-FAC on deep copies of one compiled BatchNorm CNN, stepped in
    turn (the SGD copy compiles first, without hooks): both curvature optimizers record."""
    import copy

    torch._dynamo.reset()
    torch.manual_seed(0)
    base = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3)
    )
    models = [copy.deepcopy(torch.compile(base, backend=BACKEND)) for _ in range(3)]
    opts: list[Any] = [
        torch.optim.SGD(models[0].parameters(), lr=0.1),
        SPNGD(models[1], lr=0.05),
        NLCG(models[2].parameters(), lr=0.05, preconditioner=KFACPreconditioner(models[2])),
    ]
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    for _ in range(6):
        for model, opt in zip(models, opts, strict=True):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step(loss=loss) if isinstance(opt, NLCG) else opt.step()
    for opt in opts[1:]:
        engine = _engine(opt)
        assert len(engine.stats) == 5  # conv A, G; BN F; linear A, G
        assert engine.schedule.refresh_fraction > 0.3
