"""The hooks' fast paths against float64 references: x_hat recovered from a normalisation
layer's output (with its fallback), and the unit-wise Fisher the capture records with it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bigbatch import SPNGD
from bigbatch.curvature.blocks.norm import (
    XHAT_FROM_OUTPUT_MAX_RATIO,
    batchnorm_normalized_input,
    layernorm_normalized_input,
    normalized_from_output,
)
from bigbatch.curvature.keys import Factor

DT = torch.float64


def _affine(norm: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.weight.shape, generator=gen, dtype=DT) + 0.5)
        norm.bias.copy_(torch.randn(norm.bias.shape, generator=gen, dtype=DT))


@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 5), (5, 3, 4, 7)])
@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_xhat_from_output_equals_renormalised_input(
    shape: tuple[int, ...], train: bool
) -> None:
    torch.manual_seed(0)
    bn = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(shape[1]).to(DT)
    _affine(bn, 1)
    assert bn.running_mean is not None
    assert bn.running_var is not None
    bn.running_mean.copy_(torch.randn(shape[1], dtype=DT))
    bn.running_var.copy_(torch.rand(shape[1], dtype=DT) + 0.5)
    bn.train(train)
    x = 3.0 * torch.randn(shape, dtype=DT) + 1.0
    want = batchnorm_normalized_input(bn, x)
    with torch.no_grad():
        got = normalized_from_output(bn(x), bn.weight, bn.bias)
    assert got is not None
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_layernorm_xhat_from_output_equals_renormalised_input() -> None:
    torch.manual_seed(0)
    ln = nn.LayerNorm((3, 5)).to(DT)
    _affine(ln, 2)
    x = 2.0 * torch.randn(4, 6, 3, 5, dtype=DT) - 0.5
    with torch.no_grad():
        got = normalized_from_output(ln(x), ln.weight, ln.bias, 2)
    assert got is not None
    torch.testing.assert_close(got, layernorm_normalized_input(ln, x), rtol=1e-12, atol=1e-12)


def test_xhat_from_output_refuses_small_or_zero_gamma() -> None:
    y = torch.randn(4, 3, 2, 2)
    beta = torch.tensor([0.0, 1.0, -1.0])
    assert normalized_from_output(y, torch.tensor([1.0, 1.0, 0.0]), beta) is None
    ratio = XHAT_FROM_OUTPUT_MAX_RATIO
    assert normalized_from_output(y, torch.tensor([1.0, 0.5 / ratio, 1.0]), beta) is None
    assert normalized_from_output(y, torch.tensor([1.0, 2.0 / ratio, 1.0]), beta) is not None
    # gamma == 0 with beta == 0 is not "safe" either (x_hat is undefined)
    assert normalized_from_output(y, torch.zeros(3), torch.zeros(3)) is None
    # half-precision outputs are refused (the input path is more accurate there)
    assert normalized_from_output(y.half(), torch.ones(3), beta) is None
    assert normalized_from_output(y.bfloat16(), torch.ones(3), beta) is None
    out = normalized_from_output(y, torch.ones(3), beta)
    assert out is not None
    assert out.dtype == torch.float32


def _unitwise_oracle(model: nn.Sequential, bn: nn.BatchNorm2d, x: Tensor, y: Tensor) -> Tensor:
    """F_c = (1/N) sum_i v_ic v_ic^T from the retained output gradient of the mean loss
    (per-sample gradient N * gy_i) and x_hat from the input's batch statistics."""
    store: dict[str, Tensor] = {}

    def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
        store["x"] = args[0].detach().clone()
        kept = out.clone()
        kept.retain_grad()
        store["out"] = kept
        return kept * 1.0  # a later in-place op must not touch what we keep

    handle = bn.register_forward_hook(hook)
    F.cross_entropy(model(x), y).backward()
    handle.remove()
    model.zero_grad()
    xin = store["x"]
    var, mean = torch.var_mean(xin, dim=(0, 2, 3), correction=0, keepdim=True)
    x_hat = (xin - mean) / torch.sqrt(var + bn.eps)
    gy = store["out"].grad
    assert gy is not None
    n = x.shape[0]
    v = torch.stack([(gy * x_hat).sum((2, 3)), gy.sum((2, 3))], dim=-1) * n  # (N, C, 2)
    return torch.einsum("nci,ncj->cij", v, v) / n


@pytest.mark.parametrize("gamma_zero", [False, True])
def test_captured_unitwise_fisher_matches_oracle_with_inplace_activation(
    gamma_zero: bool,
) -> None:
    torch.manual_seed(3)
    bn = nn.BatchNorm2d(3)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), bn, nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(48, 4)
    ).to(DT)
    _affine(bn, 4)
    if gamma_zero:  # x_hat cannot come from the output: the input path must be used
        with torch.no_grad():
            bn.weight[1] = 0.0
    x, y = torch.randn(10, 2, 4, 4, dtype=DT), torch.randint(0, 4, (10,))
    want = _unitwise_oracle(model, bn, x, y)
    opt = SPNGD(model, lr=0.0, momentum=0.0, staleness=False)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    torch.testing.assert_close(opt.engine.stats[("1", Factor.F)], want, rtol=1e-9, atol=1e-12)


def test_unitwise_blocks_preconditioned_together_equal_one_by_one() -> None:
    """All BatchNorm/LayerNorm blocks go through one batched product; each result equals
    its own (F_c + lambda I)^-1 [g_gamma_c, g_beta_c], also for a 2-D LayerNorm shape."""
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.LayerNorm((4, 4)),
        nn.Flatten(),
        nn.Linear(64, 3),
    ).to(DT)
    x, y = torch.randn(8, 2, 4, 4, dtype=DT), torch.randint(0, 3, (8,))
    lam = 1e-2
    opt = SPNGD(model, lr=1.0, momentum=0.0, damping=lam, staleness=False)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = {p: p.grad.clone() for p in model.parameters() if p.grad is not None}
    before = {p: p.detach().clone() for p in model.parameters()}
    opt.step()
    for name in ("1", "4", "5"):
        norm = model[int(name)]
        f = opt.engine.stats[(f"{name}", Factor.F)]
        gw, gb = grads[norm.weight].reshape(-1), grads[norm.bias].reshape(-1)
        v = torch.stack([gw, gb], dim=-1)
        want = torch.linalg.solve(f + lam * torch.eye(2, dtype=DT), v)
        got_w = (before[norm.weight] - norm.weight.detach()).reshape(-1)
        got_b = (before[norm.bias] - norm.bias.detach()).reshape(-1)
        torch.testing.assert_close(got_w, want[:, 0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got_b, want[:, 1], rtol=1e-9, atol=1e-12)
