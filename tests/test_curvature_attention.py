"""``nn.MultiheadAttention``'s projection blocks against a hand-written float64 attention.

The reference (``_reference``) recomputes attention from the module's weights with plain
matmuls, so its query/key/value projections and the output projection's input are tensors
whose per-sample gradients come from backpropagating each sample's loss; it is checked to
reproduce the module's output first. Every MHA layout is covered: packed self-attention,
encoder-decoder (packed key/value), separate ``q/k/v_proj_weight`` with other
``kdim``/``vdim``, with and without bias, ``batch_first`` either way, causal and key padding
masks, both attention paths (``need_weights`` true or false).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bigbatch import SPNGD
from bigbatch.curvature import KFACEngine
from bigbatch.curvature.keys import Factor
from bigbatch.curvature.linalg import kron_damping
from bigbatch.curvature.staleness import StalenessConfig

DT = torch.float64
C = 3  # classes of the read-out
E, HEADS, LQ, LK = 8, 2, 5, 4


def _reference(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
    """Attention by hand on batch-first inputs: ``(out, {role: (input, projection)})``."""
    n, lq, e = query.shape
    lk = key.shape[1]
    hd = e // mha.num_heads
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.detach().chunk(3)
    else:
        wq, wk, wv = (w.detach() for w in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight))
    biases = [None] * 3 if mha.in_proj_bias is None else list(mha.in_proj_bias.detach().chunk(3))
    proj = {}
    for role, x, w, b in zip("qkv", (query, key, value), (wq, wk, wv), biases, strict=True):
        t = (x @ w.T + (0.0 if b is None else b)).detach().requires_grad_()
        proj[role] = (x, t)  # a leaf: its per-sample gradients are what G is built from
    heads = [
        proj[r][1].reshape(n, length, mha.num_heads, hd).transpose(1, 2)
        for r, length in (("q", lq), ("k", lk), ("v", lk))
    ]
    scores = heads[0] @ heads[1].transpose(-1, -2) / math.sqrt(hd)
    if attn_mask is not None:
        scores = scores.masked_fill(attn_mask, float("-inf"))
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    o = (torch.softmax(scores, dim=-1) @ heads[2]).transpose(1, 2).reshape(n, lq, e)
    wo, bo = mha.out_proj.weight.detach(), mha.out_proj.bias
    out = o @ wo.T + (0.0 if bo is None else bo.detach())
    proj["out"] = (o, out)
    return out, proj


class _Model(nn.Module):
    """MHA on batch-first data (transposed for ``batch_first=False``) and a read-out."""

    def __init__(self, case: dict[str, Any]) -> None:
        super().__init__()
        kdim = case.get("kdim")
        vdim = case.get("vdim")
        self.attn = nn.MultiheadAttention(
            E, HEADS, bias=case["bias"], batch_first=case["batch_first"], kdim=kdim, vdim=vdim
        )
        self.readout = nn.Linear(E, C)
        self.case = case
        gen = torch.Generator().manual_seed(5)
        self.key = torch.randn(6, LK, kdim or E, generator=gen, dtype=DT)
        self.value = torch.randn(6, LK, vdim or E, generator=gen, dtype=DT)
        causal = torch.ones(LQ, LQ, dtype=torch.bool).triu(1)
        self.attn_mask = causal if case.get("causal") else None
        pad = torch.zeros(6, LQ if case["kind"] == "self" else LK, dtype=torch.bool)
        pad[1, -1] = pad[3, -2:] = True  # trailing keys of some samples
        self.key_padding_mask = pad if case.get("padding") else None

    def memories(self, x: Tensor) -> tuple[Tensor, Tensor]:
        kind = self.case["kind"]
        if kind == "self":
            return x, x
        if kind == "cross":
            return self.key, self.key
        return self.key, self.value

    def attend(self, x: Tensor) -> Tensor:
        first = self.case["batch_first"]
        q = x if first else x.transpose(0, 1)
        if self.case["kind"] == "self":
            k = v = q
        elif self.case["kind"] == "cross":
            k = v = self.key if first else self.key.transpose(0, 1)
        else:
            k = self.key if first else self.key.transpose(0, 1)
            v = self.value if first else self.value.transpose(0, 1)
        out, _ = self.attn(
            q,
            k,
            v,
            attn_mask=self.attn_mask,
            key_padding_mask=self.key_padding_mask,
            need_weights=self.case.get("need_weights", False),
        )
        return out if first else out.transpose(0, 1)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.readout(torch.tanh(self.attend(x)).mean(dim=1))
        return out


CASES = {
    "self-batch-first-causal": {"kind": "self", "bias": True, "batch_first": True, "causal": True},
    "self-seq-first-padding-no-bias": {
        "kind": "self",
        "bias": False,
        "batch_first": False,
        "padding": True,
    },
    "self-need-weights-both-masks": {
        "kind": "self",
        "bias": True,
        "batch_first": True,
        "causal": True,
        "padding": True,
        "need_weights": True,
    },
    "cross-packed-kv-padding": {
        "kind": "cross",
        "bias": True,
        "batch_first": True,
        "padding": True,
    },
    "separate-kdim-vdim-seq-first": {
        "kind": "separate",
        "bias": True,
        "batch_first": False,
        "kdim": 3,
        "vdim": 5,
    },
}


def _with_ones(a: Tensor) -> Tensor:
    return torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], dim=-1)


def _setup(case: dict[str, Any]) -> tuple[_Model, Tensor, Tensor]:
    torch.manual_seed(0)
    model = _Model(case).to(DT)
    x = torch.randn(6, LQ, E, dtype=DT)
    y = torch.randint(0, C, (6,))
    return model, x, y


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("name", list(CASES))
def test_projection_factors_match_per_sample_oracle(name: str, approx: str) -> None:
    case = CASES[name]
    model, x, y = _setup(case)
    key, value = model.memories(x)
    out, proj = _reference(model.attn, x, key, value, model.attn_mask, model.key_padding_mask)
    with torch.no_grad():
        torch.testing.assert_close(out, model.attend(x))  # the reference is MHA
    proj_in = {role: t for role, (_, t) in proj.items()}
    losses = F.cross_entropy(model.readout(torch.tanh(out).mean(dim=1)), y, reduction="none")
    n = x.shape[0]
    per_sample: dict[str, list[Tensor]] = {r: [] for r in proj_in}
    for i in range(n):
        grads = torch.autograd.grad(losses[i], list(proj_in.values()), retain_graph=True)
        for role, g in zip(proj_in, grads, strict=True):
            assert torch.count_nonzero(torch.cat([g[:i], g[i + 1 :]])) == 0
            per_sample[role].append(g[i])

    engine = KFACEngine(model, staleness=StalenessConfig(enabled=False), kfac_approx=approx)  # type: ignore[arg-type]
    assert sorted(engine.blocks) == ["attn.k", "attn.out", "attn.q", "attn.v", "readout"]
    F.cross_entropy(model(x), y).backward()
    engine.refresh(lambda block: 1e-3)
    for role, (inp, _) in proj.items():
        a = inp.detach()
        if case["bias"]:
            a = _with_ones(a)
        g = torch.stack(per_sample[role])
        if approx == "expand":
            a_want = torch.einsum("npi,npj->ij", a, a) / (a.shape[0] * a.shape[1])
            g_want = torch.einsum("npi,npj->ij", g, g) / n
        else:
            abar, gsum = a.mean(dim=1), g.sum(dim=1)
            a_want, g_want = abar.T @ abar / n, gsum.T @ gsum / n
        torch.testing.assert_close(engine.stats[(f"attn.{role}", Factor.A)], a_want)
        torch.testing.assert_close(engine.stats[(f"attn.{role}", Factor.G)], g_want)


def _dense_direction(a: Tensor, g: Tensor, mat: Tensor, lam: float) -> Tensor:
    """``((A + da I) (x) (G + dg I))^-1 vec(mat)`` by a dense float64 solve (row-major vec
    of the ``(out, in)`` matrix: ``kron(G, A)``)."""
    da, dg = kron_damping(a, g, lam)
    a_d = a.numpy() + da * np.eye(a.shape[0])
    g_d = g.numpy() + dg * np.eye(g.shape[0])
    sol = np.linalg.solve(np.kron(g_d, a_d), mat.numpy().reshape(-1))
    return torch.from_numpy(sol.reshape(mat.shape))


@pytest.mark.parametrize("name", ["self-batch-first-causal", "separate-kdim-vdim-seq-first"])
def test_preconditioned_direction_equals_dense_solve(name: str) -> None:
    model, x, y = _setup(CASES[name])
    lam = 1e-2
    opt = SPNGD(model, lr=0.0, momentum=0.0, damping=lam, staleness=False)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    grads = {p: torch.randn_like(p) for p in model.parameters()}
    got = opt.engine.precondition(grads)
    attn = model.attn
    weights = (
        [(attn.in_proj_weight, k * E) for k in range(3)]
        if attn._qkv_same_embed_dim
        else [(attn.q_proj_weight, 0), (attn.k_proj_weight, 0), (attn.v_proj_weight, 0)]
    )
    for k, (role, (w, start)) in enumerate(zip("qkv", weights, strict=True)):
        rows = slice(start, start + E)
        mat = torch.cat([grads[w][rows], grads[attn.in_proj_bias][k * E : (k + 1) * E, None]], 1)
        stats = opt.engine.stats
        want = _dense_direction(
            stats[(f"attn.{role}", Factor.A)], stats[(f"attn.{role}", Factor.G)], mat, lam
        )
        torch.testing.assert_close(got[w][rows], want[:, :-1], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(
            got[attn.in_proj_bias][k * E : (k + 1) * E], want[:, -1], rtol=1e-9, atol=1e-12
        )
    out = attn.out_proj
    mat = torch.cat([grads[out.weight], grads[out.bias][:, None]], 1)
    stats = opt.engine.stats
    want = _dense_direction(stats[("attn.out", Factor.A)], stats[("attn.out", Factor.G)], mat, lam)
    torch.testing.assert_close(got[out.weight], want[:, :-1], rtol=1e-9, atol=1e-12)


class _HandWritten(nn.Module):
    """Causal self-attention from three ``nn.Linear`` projections and SDPA."""

    def __init__(self, mha: nn.MultiheadAttention, readout: nn.Linear) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(E, E) for _ in range(3))
        self.o = nn.Linear(E, E)
        with torch.no_grad():
            for lin, w, b in zip(
                (self.q, self.k, self.v),
                mha.in_proj_weight.chunk(3),
                mha.in_proj_bias.chunk(3),
                strict=True,
            ):
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            self.o.weight.copy_(mha.out_proj.weight)
            self.o.bias.copy_(mha.out_proj.bias)
        self.readout = nn.Linear(E, C)
        self.readout.load_state_dict(readout.state_dict())

    def forward(self, x: Tensor) -> Tensor:
        n, t, _ = x.shape
        q, k, v = (
            lin(x).reshape(n, t, HEADS, -1).transpose(1, 2) for lin in (self.q, self.k, self.v)
        )
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out: Tensor = self.readout(torch.tanh(self.o(o.transpose(1, 2).reshape(n, t, E))).mean(1))
        return out


def test_multihead_attention_equals_hand_written_attention_with_linear_layers() -> None:
    """The same weights as MultiheadAttention or as four nn.Linear with SDPA: the same
    statistics and the same update (hand-written attention keeps working)."""
    model, x, y = _setup(CASES["self-batch-first-causal"])
    hand = _HandWritten(model.attn, model.readout).to(DT)
    opts = [SPNGD(m, lr=0.1, damping=1e-2, staleness=False) for m in (model, hand)]
    for _ in range(3):
        for m, opt in zip((model, hand), opts, strict=True):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
    names = {"q": "q", "k": "k", "v": "v", "out": "o"}
    for role, hand_name in names.items():
        for factor in (Factor.A, Factor.G):
            torch.testing.assert_close(
                opts[0].engine.stats[(f"attn.{role}", factor)],
                opts[1].engine.stats[(hand_name, factor)],
            )
    w = torch.cat([hand.q.weight, hand.k.weight, hand.v.weight])
    torch.testing.assert_close(model.attn.in_proj_weight, w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.attn.out_proj.weight, hand.o.weight, rtol=1e-10, atol=1e-12)


def test_transformer_encoder_has_no_fallback_parameters() -> None:
    layer = nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True)
    model = nn.Sequential(
        nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(E, C)
    )
    opt = SPNGD(model, lr=0.1)
    assert opt.fallback_parameters == []
    kinds = sorted({type(b).__name__ for b in opt.engine.blocks.values()})
    assert kinds == ["AttentionProjectionBlock", "LinearBlock", "UnitwiseNormBlock"]
    x = torch.randn(4, 6, E)
    mask = nn.Transformer.generate_square_subsequent_mask(6)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(
            model[1](model[0](x, mask=mask, is_causal=True)).mean(1),
            torch.zeros(4, dtype=torch.long),
        ).backward()
        opt.step()
    assert opt.last_report.missing == []
    assert len(opt.engine.inverses) == len(opt.engine.blocks)


def test_bias_kv_falls_back_by_name() -> None:
    model = nn.MultiheadAttention(E, HEADS, add_bias_kv=True)
    engine = KFACEngine(model)
    reasons = dict(engine.capture.unsupported)
    assert "add_bias_kv" in reasons["MultiheadAttention.bias_k"]
    assert "MultiheadAttention.bias_v" in reasons
    assert sorted(engine.blocks) == [f"MultiheadAttention.{r}" for r in ("k", "out", "q", "v")]
