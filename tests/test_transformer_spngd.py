"""SP-NGD on language models: a head tied to the embedding (as a module, through
``F.linear`` and through ``h @ W.T``), and a causal transformer under stale statistics,
micro-batch accumulation and checkpoint resume."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bigbatch import NLCG, SPNGD, KFACPreconditioner, StalenessConfig
from bigbatch.curvature.keys import Factor

DT = torch.float64
V, D = 9, 6


class _TiedLM(nn.Module):
    """Embedding -> Linear -> tanh -> logits with the embedding's weight."""

    def __init__(self, how: str, head_bias: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.how = how
        if how == "module":
            self.head = nn.Linear(D, V, bias=head_bias)
            self.head.weight = self.emb.weight
        self.taps: dict[str, Tensor] = {}

    def forward(self, idx: Tensor) -> Tensor:
        e = self.emb(idx)
        h = torch.tanh(self.mix(e))
        if self.how == "module":
            out: Tensor = self.head(h)
        elif self.how == "linear":
            out = F.linear(h, self.emb.weight)
        else:
            out = h @ self.emb.weight.T
        self.taps = {"e": e, "h": h, "out": out}
        return out


def _lm_batch(seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (8, 5), generator=gen)
    return idx, torch.randint(0, V, (8, 5), generator=gen)


def _loss(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out.reshape(-1, V), y.reshape(-1))


@pytest.mark.parametrize("how", ["module", "linear", "matmul"])
def test_tied_head_is_one_block_with_both_uses(how: str) -> None:
    torch.manual_seed(0)
    model = _TiedLM(how).to(DT)
    lam = 1e-2
    opt = SPNGD(model, lr=0.0, momentum=0.0, damping=lam, staleness=False)
    assert sorted(opt.engine.blocks) == ["emb", "mix"]
    assert opt.fallback_parameters == []
    idx, y = _lm_batch()
    for _ in range(2):  # a functional use is seen at step 0; its statistics come from step 1
        opt.zero_grad()
        _loss(model(idx), y).backward()
        opt.step()
    assert opt.engine.blocks["emb"].tied  # type: ignore[attr-defined]

    # the definitions, from this batch's tensors (M = N T loss terms)
    loss = _loss(model(idx), y)
    taps = model.taps
    gy_e, gy_out = torch.autograd.grad(loss, [taps["e"], taps["out"]])
    m = idx.numel()
    want = {
        Factor.A: F.one_hot(idx, V).to(DT).reshape(-1, V).mean(0),
        Factor.G: m * gy_e.reshape(-1, D).T @ gy_e.reshape(-1, D),
        Factor.HEAD_A: taps["h"].detach().reshape(-1, D).T @ taps["h"].detach().reshape(-1, D) / m,
        Factor.HEAD_G: m * gy_out.reshape(-1, V).T @ gy_out.reshape(-1, V),
    }
    for factor, value in want.items():
        torch.testing.assert_close(opt.engine.stats[("emb", factor)], value)

    # the direction: the exact inverse of the two-term curvature, by a dense solve
    a, g = want[Factor.A], want[Factor.G]
    pi = float(torch.sqrt(a.mean() / torch.diagonal(g).mean()))
    da, dg = pi * lam**0.5, lam**0.5 / pi
    dense = np.kron(want[Factor.HEAD_G].numpy(), want[Factor.HEAD_A].numpy()) + np.kron(
        np.diag(a.numpy() + da), g.numpy() + dg * np.eye(D)
    )
    grad = torch.randn(V, D, dtype=DT)
    got = opt.engine.precondition({model.emb.weight: grad})[model.emb.weight]
    sol = np.linalg.solve(dense, grad.numpy().reshape(-1)).reshape(V, D)
    np.testing.assert_allclose(got.numpy(), sol, rtol=1e-8, atol=1e-10)


def test_tied_module_head_bias_falls_back_by_name() -> None:
    model = _TiedLM("module", head_bias=True)
    with pytest.warns(UserWarning, match="head.bias"):
        opt = SPNGD(model, lr=0.1)
    assert opt.fallback_parameters == ["head.bias"]
    assert dict(opt.engine.capture.unsupported)["head.bias"].startswith("bias of a Linear head")


class _GPT(nn.Module):
    """A pre-norm causal transformer LM from nn.TransformerEncoderLayer, tied head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 8)
        self.pos = nn.Parameter(0.1 * torch.randn(5, 8))
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(8)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, dtype=self.pos.dtype)
        h = self.body(self.emb(idx) + self.pos[:t], mask=mask, is_causal=True)
        return F.linear(self.norm(h), self.emb.weight)


def _gpt_and_optimizer(kfac_approx: str = "expand") -> tuple[_GPT, SPNGD]:
    torch.manual_seed(1)
    model = _GPT().to(DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the position embedding falls back (no block)
        opt = SPNGD(
            model,
            lr=0.05,
            damping=1e-2,
            staleness=StalenessConfig(threshold=0.3, max_interval=4),
            kfac_approx=kfac_approx,  # type: ignore[arg-type]
        )
    return model, opt


def _train(model: _GPT, opt: SPNGD, steps: range, micro: int = 1) -> list[float]:
    losses = []
    for step in steps:
        idx, y = _lm_batch(step)
        opt.zero_grad()
        total = 0.0
        for xm, ym in zip(idx.chunk(micro), y.chunk(micro), strict=True):
            loss = _loss(model(xm), ym) / micro
            loss.backward()
            total += float(loss.detach())
        opt.step()
        losses.append(total)
    return losses


def test_transformer_has_only_the_position_table_as_fallback() -> None:
    _, opt = _gpt_and_optimizer()
    assert opt.fallback_parameters == ["pos"]


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
def test_transformer_micro_batches_equal_the_full_batch(kfac_approx: str) -> None:
    model_a, full = _gpt_and_optimizer(kfac_approx)
    model_b, micro = _gpt_and_optimizer(kfac_approx)
    _train(model_a, full, range(5))
    _train(model_b, micro, range(5), micro=2)
    assert full.engine.stats.keys() == micro.engine.stats.keys()
    for key, value in full.engine.stats.items():
        torch.testing.assert_close(micro.engine.stats[key], value, rtol=1e-9, atol=1e-12)
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_transformer_resume_equals_uninterrupted_with_stale_statistics() -> None:
    model_a, opt_a = _gpt_and_optimizer()
    losses = _train(model_a, opt_a, range(8))
    assert losses[-1] < losses[0]
    assert opt_a.refresh_fraction < 1.0  # some statistics were stale
    assert opt_a.skipped_steps == 0

    model_b, opt_b = _gpt_and_optimizer()
    _train(model_b, opt_b, range(4))
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model_c, opt_c = _gpt_and_optimizer()
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    _train(model_c, opt_c, range(4, 8))
    for p, q in zip(model_a.parameters(), model_c.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt_a.engine.schedule.state_dict() == opt_c.engine.schedule.state_dict()


def test_nlcg_with_kfac_trains_the_transformer() -> None:
    torch.manual_seed(1)
    model = _GPT().to(DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        nlcg = NLCG(model.parameters(), lr=0.05, preconditioner=KFACPreconditioner(model, 1e-2))
    idx, y = _lm_batch(0)
    losses = []
    for _ in range(6):
        nlcg.zero_grad()
        loss = _loss(model(idx), y)
        loss.backward()
        nlcg.step(loss=loss)
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
