"""K-FAC-expand and K-FAC-reduce are exact where Eschenhagen et al. (2023) say they are.

On a deep linear network with weight sharing over a sequence and a Gaussian likelihood,
every layer's GGN block is a Kronecker product: K-FAC-expand's when every position has its
own loss term (the "expand" setting), K-FAC-reduce's when the positions are averaged before
the loss (the "reduce" setting). Each is compared with the exact GGN block from
``curvlinops.GGNLinearOperator`` in its own setting, and shown NOT to match in the other's.

The engine's type-2 G comes from its Monte Carlo path with the square root of the output
Hessian in place of samples (for MSE, one backward per output coordinate), so
``G = (1/M) sum J^T J``: the GGN of ``(1/M) sum_m 0.5 ||f_m - y_m||^2``. curvlinops'
``MSELoss()`` averages over all ``M C`` entries without the 0.5, i.e. ``2 / C`` times that;
with ``C = 2`` outputs both are the same matrix.
"""

from __future__ import annotations

import curvlinops
import pytest
import torch
from torch import Tensor, nn

from bigbatch.curvature import KFACEngine
from bigbatch.curvature.keys import Factor
from bigbatch.curvature.staleness import StalenessConfig

DT = torch.float64
N, T, C = 4, 5, 2


class _DeepLinear(nn.Module):
    """Three linear layers applied at every position; ``pool`` averages the positions."""

    def __init__(self, pool: bool) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, C))
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.layers(x)
        return out.mean(dim=1) if self.pool else out


def _kfac_blocks(model: _DeepLinear, x: Tensor, approx: str) -> dict[str, Tensor]:
    """Dense ``A (x) G`` per layer from the engine, in curvlinops' parameter order (the
    weight row-major, then the bias)."""
    engine = KFACEngine(
        model,
        fisher="mc",
        staleness=StalenessConfig(enabled=False),
        kfac_approx=approx,  # type: ignore[arg-type]
    )
    out = model(x)
    params = list(model.parameters())
    with engine.capture.monte_carlo():
        for c in range(C):  # the square root of the MSE output Hessian (identity)
            torch.autograd.grad(out[..., c].sum(), params, retain_graph=True)
    engine.refresh(lambda block: 1e-3)
    blocks = {}
    for name in ("layers.0", "layers.1", "layers.2"):
        a, g = engine.stats[(name, Factor.A)], engine.stats[(name, Factor.G)]
        full = torch.kron(g, a)  # row-major vec of the (out, in + 1) matrix [W | b]
        o, i = g.shape[0], a.shape[0]
        index = torch.arange(o * i).reshape(o, i)
        order = torch.cat([index[:, :-1].reshape(-1), index[:, -1]])
        blocks[name] = full[order][:, order]
    return blocks


def _exact_ggn_blocks(model: _DeepLinear, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    params = list(model.parameters())
    ggn = curvlinops.GGNLinearOperator(
        model, nn.MSELoss(), params, [(x, y)], check_deterministic=False
    )
    dense = ggn @ torch.eye(sum(p.numel() for p in params), dtype=DT)
    blocks, start = {}, 0
    for k, name in enumerate(("layers.0", "layers.1", "layers.2")):
        size = params[2 * k].numel() + params[2 * k + 1].numel()
        blocks[name] = dense[start : start + size, start : start + size]
        start += size
    return blocks


@pytest.mark.parametrize(("setting", "exact"), [("expand", "expand"), ("reduce", "reduce")])
def test_kfac_equals_the_exact_ggn_in_its_own_setting(setting: str, exact: str) -> None:
    torch.manual_seed(0)
    model = _DeepLinear(pool=setting == "reduce").to(DT)
    x = torch.randn(N, T, 3, dtype=DT)
    y = torch.randn((N, C) if model.pool else (N, T, C), dtype=DT)
    want = _exact_ggn_blocks(model, x, y)
    other = "reduce" if exact == "expand" else "expand"
    got, wrong = _kfac_blocks(model, x, exact), _kfac_blocks(model, x, other)
    for name, block in want.items():
        torch.testing.assert_close(got[name], block, rtol=1e-10, atol=1e-12)
        miss = float(torch.linalg.norm(wrong[name] - block) / torch.linalg.norm(block))
        assert miss > 1e-2, (name, other, miss)  # the other approximation is not exact here
