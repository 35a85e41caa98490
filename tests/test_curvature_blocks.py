"""Every block kind's statistics, as the engine records them, against per-sample oracles.

Each statistic is checked in float64 against an independent construction: per-sample
gradients come from backpropagating each per-sample loss ``L_i`` of one whole-batch forward
separately (so BatchNorm's train-mode coupling is respected), im2col patches from an
explicit loop over output positions, preconditioners from dense solves. The definitions
(see ``bigbatch.curvature.blocks.base``): for a classifier (``M = N`` loss terms) with
per-sample output gradients ``g`` (of ``L_i``),

- expand: ``A = sum_{n,p} a a^T / (N P)``, ``G = sum_{n,p} g g^T / N``;
- reduce: ``A = sum_n abar abar^T / N`` (``abar`` the mean over positions),
  ``G = sum_n gsum gsum^T / N`` (``gsum`` the sum over positions);
- unit-wise: ``F = sum_n v v^T / N`` with ``v`` the per-sample (gamma, beta) gradient.

They are also compared with ``curvlinops.KFACLinearOperator`` (a test extra), for a
classifier and for a sequence model with one loss term per position.
"""

from __future__ import annotations

from collections.abc import Callable

import curvlinops
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bigbatch.curvature import KFACEngine
from bigbatch.curvature.blocks.conv import conv2d_patches
from bigbatch.curvature.blocks.embedding import embedding_input_sum
from bigbatch.curvature.blocks.kronecker import grad_sum, input_sum
from bigbatch.curvature.blocks.norm import unitwise_precondition, unitwise_sum
from bigbatch.curvature.keys import Factor
from bigbatch.curvature.staleness import StalenessConfig

DT = torch.float64
N_CLASSES = 3


# ------------------------------------------------------------------------------ oracles


class _Capture:
    """Forward hook keeping a layer's input and output."""

    def __init__(self, layer: nn.Module) -> None:
        self.inp: Tensor | None = None
        self.out: Tensor | None = None
        self.handle = layer.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        self.inp = args[0]
        self.out = out


def _forward(
    model: nn.Module, layer: nn.Module, x: Tensor, y: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One whole-batch forward: (per-sample losses, layer input, layer output)."""
    cap = _Capture(layer)
    try:
        losses = F.cross_entropy(model(x), y, reduction="none")
    finally:
        cap.handle.remove()
    assert cap.inp is not None
    assert cap.out is not None
    return losses, cap.inp, cap.out


def _per_sample_grads(losses: Tensor, wrt: list[Tensor]) -> list[list[Tensor]]:
    return [
        list(torch.autograd.grad(losses[i], wrt, retain_graph=True)) for i in range(losses.shape[0])
    ]


def _per_sample_output_grads(losses: Tensor, out: Tensor, sample_dim: int = 0) -> Tensor:
    """``g_i = dL_i / d out[i]`` stacked along dim 0; asserts other samples get none."""
    rows = []
    for i, (g,) in enumerate(_per_sample_grads(losses, [out])):
        g = g.movedim(sample_dim, 0)
        others = torch.cat([g[:i], g[i + 1 :]])
        assert torch.count_nonzero(others) == 0, "per-sample losses are coupled"
        rows.append(g[i])
    return torch.stack(rows)


def _with_ones(a: Tensor) -> Tensor:
    return torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], dim=-1)


def _kronecker_oracle(a: Tensor, g: Tensor, approx: str) -> tuple[Tensor, Tensor]:
    """``(A, G)`` from inputs ``a`` (N, P, i) and per-sample output grads ``g`` (N, P, o)."""
    n, p = a.shape[:2]
    if approx == "expand":
        return (
            torch.einsum("npi,npj->ij", a, a) / (n * p),
            torch.einsum("npi,npj->ij", g, g) / n,
        )
    abar, gsum = a.mean(dim=1), g.sum(dim=1)
    return abar.T @ abar / n, gsum.T @ gsum / n


def _engine_stats(
    model: nn.Module, x: Tensor, y: Tensor, approx: str = "expand"
) -> dict[tuple[str, Factor], Tensor]:
    """One forward/backward of the mean loss through the engine's hooks; its statistics."""
    engine = KFACEngine(model, staleness=StalenessConfig(enabled=False), kfac_approx=approx)  # type: ignore[arg-type]
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    engine.refresh(lambda block: 1e-3)
    engine.capture.remove()
    return engine.stats


# ------------------------------------------------------------------------------- Linear


class _Net(nn.Module):
    """A Linear applied at every position of a sequence (or to plain rows), then pooled.
    ``batch_first=False`` declares sequence-first inputs (the sample dim is then dim 1)."""

    def __init__(self, d_in: int, hidden: int, bias: bool, seq: bool, batch_first: bool) -> None:
        super().__init__()
        self.first = nn.Linear(d_in, hidden, bias=bias)
        self.second = nn.Linear(hidden, N_CLASSES)
        self.seq = seq
        self.batch_first = batch_first

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.first(x))
        if self.seq:
            h = h.mean(dim=1 if self.batch_first else 0)
        out: Tensor = self.second(h)
        return out


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["2d", "3d", "3d-seq-first"])
def test_linear_factors_match_per_sample_oracle(approx: str, bias: bool, layout: str) -> None:
    torch.manual_seed(0)
    n, t, d_in, d_out = 6, 4, 5, 7
    seq, first = layout != "2d", layout != "3d-seq-first"
    model = _Net(d_in, d_out, bias, seq, first).to(DT)
    shape = (n, d_in) if not seq else ((n, t, d_in) if first else (t, n, d_in))
    x = torch.randn(shape, dtype=DT)
    y = torch.randint(0, N_CLASSES, (n,))
    losses, inp, out = _forward(model, model.first, x, y)
    sample_dim = 0 if first else 1
    a = inp.detach().movedim(sample_dim, 0).reshape(n, -1, d_in)
    a = _with_ones(a) if bias else a
    g = _per_sample_output_grads(losses, out, sample_dim).reshape(n, -1, d_out)
    a_oracle, g_oracle = _kronecker_oracle(a, g, approx)
    stats = _engine_stats(model, x, y, approx)
    torch.testing.assert_close(stats[("first", Factor.A)], a_oracle)
    torch.testing.assert_close(stats[("first", Factor.G)], g_oracle)
    assert stats[("first", Factor.A)].dtype == DT


def test_statistics_of_low_precision_inputs_are_float32() -> None:
    torch.manual_seed(1)
    x = torch.randn(8, 3, 5, dtype=torch.bfloat16)
    s, rows = input_sum(x, True, "expand")
    assert (s.dtype, rows) == (torch.float32, 24)
    a = _with_ones(x.to(torch.float64).reshape(-1, 5))
    torch.testing.assert_close(s.double(), a.T @ a, rtol=1e-5, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s_autocast, _ = input_sum(x, True, "expand")
    assert s_autocast.dtype == torch.float32
    torch.testing.assert_close(s_autocast, s)
    assert grad_sum(x.to(torch.float16), "reduce")[0].dtype == torch.float32


# ------------------------------------------------------------------------------- Conv2d


def _oracle_patches(
    x: Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    pads: tuple[int, int, int, int],
) -> Tensor:
    """im2col by an explicit loop over output positions; pads = (top, bottom, left, right)."""
    top, bottom, left, right = pads
    n, c, h, w = x.shape
    xp = torch.zeros(n, c, h + top + bottom, w + left + right, dtype=x.dtype)
    xp[:, :, top : top + h, left : left + w] = x
    span_h = dilation[0] * (kernel[0] - 1) + 1
    span_w = dilation[1] * (kernel[1] - 1) + 1
    h_out = (xp.shape[2] - span_h) // stride[0] + 1
    w_out = (xp.shape[3] - span_w) // stride[1] + 1
    cols = []
    for oh in range(h_out):
        for ow in range(w_out):
            r0, c0 = oh * stride[0], ow * stride[1]
            window = xp[:, :, r0 : r0 + span_h : dilation[0], c0 : c0 + span_w : dilation[1]]
            cols.append(window.reshape(n, -1))
    return torch.stack(cols, dim=1)


# (kernel, stride, padding given to the module, dilation, bias, explicit pads t/b/l/r)
CONV_CASES = [
    ((3, 3), (1, 1), 1, (1, 1), True, (1, 1, 1, 1)),
    ((2, 3), (2, 1), (1, 0), (1, 1), False, (1, 1, 0, 0)),
    ((3, 2), (1, 1), "same", (2, 1), True, (2, 2, 0, 1)),
    ((2, 4), (1, 1), "same", (1, 1), False, (0, 1, 1, 2)),
    ((3, 3), (2, 2), "valid", (2, 2), True, (0, 0, 0, 0)),
    ((3, 1), (1, 2), (2, 1), (1, 2), False, (2, 2, 1, 1)),
]


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "bias", "pads"), CONV_CASES)
def test_conv2d_factors_match_per_sample_oracle(
    approx: str,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: int | tuple[int, int] | str,
    dilation: tuple[int, int],
    bias: bool,
    pads: tuple[int, int, int, int],
) -> None:
    torch.manual_seed(3)
    n, c_in, c_out, h, w = 4, 2, 3, 9, 8
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, dilation, bias=bias).to(DT)
    x = torch.randn(n, c_in, h, w, dtype=DT)
    with torch.no_grad():
        n_feat = conv(x)[0].numel()
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(n_feat, N_CLASSES)).to(DT)
    y = torch.randint(0, N_CLASSES, (n,))
    losses, _, out = _forward(model, conv, x, y)

    patches = _oracle_patches(x, kernel, stride, dilation, pads)
    p = patches.shape[1]
    # the independent patches reproduce the module's own forward
    y_lin = torch.einsum("oi,npi->nop", conv.weight.detach().reshape(c_out, -1), patches)
    if conv.bias is not None:
        y_lin = y_lin + conv.bias.detach()[None, :, None]
    torch.testing.assert_close(y_lin, out.detach().reshape(n, c_out, -1))
    torch.testing.assert_close(conv2d_patches(x, conv), patches)
    a = _with_ones(patches) if bias else patches
    g = _per_sample_output_grads(losses, out).reshape(n, c_out, p).transpose(1, 2)
    a_oracle, g_oracle = _kronecker_oracle(a, g, approx)
    stats = _engine_stats(model, x, y, approx)
    torch.testing.assert_close(stats[("0", Factor.A)], a_oracle)
    torch.testing.assert_close(stats[("0", Factor.G)], g_oracle)


def test_unsupported_convolutions_fall_back_with_their_reason() -> None:
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 3, padding=1, padding_mode="reflect")
    )
    engine = KFACEngine(model)
    assert engine.blocks == {}
    reasons = dict(engine.capture.unsupported)
    assert "groups=2" in reasons["0.weight"]
    assert "padding_mode='reflect'" in reasons["1.bias"]


def test_conv2d_unbatched_input() -> None:
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 3, 3, padding=1).to(DT)
    x = torch.randn(2, 5, 5, dtype=DT)
    torch.testing.assert_close(conv2d_patches(x, conv), conv2d_patches(x[None], conv))


# ---------------------------------------------------------------------------- Unit-wise


def _randomize_affine(norm: nn.Module) -> None:
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn_like(p))


def _check_unitwise(model: nn.Module, norm: nn.Module, name: str, x: Tensor) -> None:
    """F from the hooks equals the per-sample (gamma[, beta]) Fisher, sum_n v v^T / N."""
    n = x.shape[0]
    y = torch.randint(0, N_CLASSES, (n,))
    losses = F.cross_entropy(model(x), y, reduction="none")
    params = [p for p in (norm.weight, getattr(norm, "bias", None)) if p is not None]
    per_sample = _per_sample_grads(losses, params)
    v = torch.stack([torch.stack([q.reshape(-1) for q in gs], -1) for gs in per_sample])
    f_oracle = torch.einsum("nci,ncj->cij", v, v) / n
    stats = _engine_stats(model, x, y)
    assert stats[(name, Factor.F)].shape == (params[0].numel(), len(params), len(params))
    torch.testing.assert_close(stats[(name, Factor.F)], f_oracle)


BN_CASES = [("bn1d-NC", (6, 4)), ("bn1d-NCL", (6, 4, 5)), ("bn2d", (6, 3, 4, 5))]


@pytest.mark.parametrize(("case", "shape"), BN_CASES, ids=[c[0] for c in BN_CASES])
@pytest.mark.parametrize("mode", ["train", "eval", "eval-no-running-stats"])
def test_batchnorm_unitwise_matches_per_sample_oracle(
    case: str, shape: tuple[int, ...], mode: str
) -> None:
    torch.manual_seed(7)
    c = shape[1]
    bn_cls = nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d
    bn = bn_cls(c, track_running_stats=mode != "eval-no-running-stats").to(DT)
    _randomize_affine(bn)
    if mode == "eval":
        assert bn.running_mean is not None
        assert bn.running_var is not None
        bn.running_mean.copy_(torch.randn(c, dtype=DT))
        bn.running_var.copy_(torch.rand(c, dtype=DT) + 0.5)
    n_feat = int(np.prod(shape[1:]))
    model = nn.Sequential(bn, nn.Tanh(), nn.Flatten(), nn.Linear(n_feat, N_CLASSES)).to(DT)
    model.train(mode == "train")
    _check_unitwise(model, bn, "0", 2.0 * torch.randn(shape, dtype=DT) + 0.5)


NORMS: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("ln-2d", lambda: nn.LayerNorm(5), (6, 5)),
    ("ln-3d-last", lambda: nn.LayerNorm(5), (6, 3, 5)),
    ("ln-3d-last-two", lambda: nn.LayerNorm((3, 5)), (6, 3, 5)),
    ("ln-4d-last", lambda: nn.LayerNorm(4), (5, 2, 3, 4)),
    ("ln-no-bias", lambda: nn.LayerNorm(5, bias=False), (6, 3, 5)),
    ("rmsnorm", lambda: nn.RMSNorm(5), (6, 3, 5)),
]


@pytest.mark.parametrize(("case", "make", "shape"), NORMS, ids=[c[0] for c in NORMS])
def test_layer_and_rms_norm_unitwise_matches_per_sample_oracle(
    case: str, make: Callable[[], nn.Module], shape: tuple[int, ...]
) -> None:
    torch.manual_seed(8)
    norm = make().to(DT)
    _randomize_affine(norm)
    n_feat = int(np.prod(shape[1:]))
    model = nn.Sequential(norm, nn.Tanh(), nn.Flatten(), nn.Linear(n_feat, N_CLASSES)).to(DT)
    _check_unitwise(model, norm, "0", 2.0 * torch.randn(shape, dtype=DT) - 0.3)


@pytest.mark.parametrize(
    ("sample_dim", "channel_dims"), [(0, (1,)), (1, (0,)), (2, (0, 3)), (2, (3, 0)), (-1, (1, 2))]
)
def test_unitwise_sum_any_layout_matches_explicit_loops(
    sample_dim: int, channel_dims: tuple[int, ...]
) -> None:
    torch.manual_seed(12)
    shape = (3, 4, 2, 5)
    x_hat, gy = torch.randn(shape, dtype=DT), torch.randn(shape, dtype=DT)
    s = sample_dim % 4
    pos = [d for d in range(4) if d != s and d not in channel_dims]
    order = [s, *sorted(channel_dims), *pos]
    n = shape[s]
    n_chan = int(np.prod([shape[d] for d in channel_dims]))
    xc = x_hat.permute(order).reshape(n, n_chan, -1)
    gc = gy.permute(order).reshape(n, n_chan, -1)
    expected = torch.zeros(n_chan, 2, 2, dtype=DT)
    for i in range(n):
        for c in range(n_chan):
            v = torch.stack([(gc[i, c] * xc[i, c]).sum(), gc[i, c].sum()])
            expected[c] += torch.outer(v, v)
    torch.testing.assert_close(unitwise_sum(x_hat, gy, channel_dims, sample_dim), expected)
    gamma_only = unitwise_sum(x_hat, gy, channel_dims, sample_dim, with_shift=False)
    torch.testing.assert_close(gamma_only, expected[:, :1, :1])


def test_unitwise_precondition_matches_per_channel_solve() -> None:
    torch.manual_seed(6)
    c = 5
    m = torch.randn(c, 2, 2, dtype=DT)
    f = m @ m.transpose(1, 2) + 0.5 * torch.eye(2, dtype=DT)
    gamma, beta = torch.randn(c, dtype=DT), torch.randn(c, dtype=DT)
    pg, pb = unitwise_precondition(gamma, beta, torch.linalg.inv(f))
    assert pb is not None
    for k in range(c):
        sol = np.linalg.solve(f[k].numpy(), np.array([gamma[k].item(), beta[k].item()]))
        np.testing.assert_allclose([pg[k].item(), pb[k].item()], sol, rtol=1e-10)
    f_inv = torch.randn(4, 2, 2, dtype=DT)  # non-symmetric: pins down the side
    g4, b4 = torch.randn(4, dtype=DT), torch.randn(4, dtype=DT)
    pg4, pb4 = unitwise_precondition(g4, b4, f_inv)
    assert pb4 is not None
    for k in range(4):
        torch.testing.assert_close(
            torch.stack([pg4[k], pb4[k]]), f_inv[k] @ torch.stack([g4[k], b4[k]])
        )
    only, none = unitwise_precondition(g4, None, f_inv[:, :1, :1])
    assert none is None
    torch.testing.assert_close(only, f_inv[:, 0, 0] * g4)


# ------------------------------------------------------------------------------ Embedding


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_factors_match_per_sample_oracle(padding_idx: int | None) -> None:
    torch.manual_seed(9)
    n, t, vocab, dim = 6, 5, 7, 4
    emb = nn.Embedding(vocab, dim, padding_idx=padding_idx).to(DT)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = emb
            self.head = nn.Linear(dim, N_CLASSES)

        def forward(self, idx: Tensor) -> Tensor:
            out: Tensor = self.head(torch.tanh(self.emb(idx)).mean(dim=1))
            return out

    model = Net().to(DT)
    idx = torch.randint(0, vocab, (n, t))
    idx[0, 0] = 2  # the padding index occurs
    y = torch.randint(0, N_CLASSES, (n,))
    losses, inp, out = _forward(model, emb, idx, y)
    a_oracle = F.one_hot(idx, vocab).to(DT).reshape(-1, vocab).mean(dim=0)
    if padding_idx is not None:
        a_oracle[padding_idx] = 0.0
    g = _per_sample_output_grads(losses, out)
    g_oracle = torch.einsum("npi,npj->ij", g, g) / n
    counts = embedding_input_sum(inp, vocab, padding_idx=padding_idx)
    assert (counts.dtype, counts.shape) == (torch.float32, (vocab,))
    stats = _engine_stats(model, idx, y)
    torch.testing.assert_close(stats[("emb", Factor.A)], a_oracle)
    torch.testing.assert_close(stats[("emb", Factor.G)], g_oracle)


# ------------------------------------------------------------------------------ curvlinops


def _curvlinops_factors(
    model: nn.Module, x: Tensor, y: Tensor, approx: str, terms: int
) -> dict[str, tuple[Tensor, Tensor]]:
    kfac = curvlinops.KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(),
        list(model.parameters()),
        [(x, y)],
        fisher_type="empirical",
        kfac_approx=approx,
        separate_weight_and_bias=False,
        num_data=len(x),
        num_per_example_loss_terms=terms,
        check_deterministic=False,
    )
    kfac.compute_kronecker_factors()
    state = kfac.state_dict()
    return {
        k: (state["input_covariances"][k], state["gradient_covariances"][k])
        for k in state["input_covariances"]
    }


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_classifier_factors_equal_curvlinops(approx: str) -> None:
    """A Conv2d (P = 28 positions) and a Linear of a classifier: the same A and G."""
    torch.manual_seed(10)
    n = 5
    conv = nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding=1, dilation=(2, 1)).to(DT)
    x = torch.randn(n, 2, 8, 7, dtype=DT)
    with torch.no_grad():
        n_feat = conv(x)[0].numel()
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(n_feat, N_CLASSES)).to(DT)
    y = torch.randint(0, N_CLASSES, (n,))
    stats = _engine_stats(model, x, y, approx)
    theirs = _curvlinops_factors(model, x, y, approx, 1)
    for name in ("0", "3"):
        torch.testing.assert_close(stats[(name, Factor.A)], theirs[name][0])
        torch.testing.assert_close(stats[(name, Factor.G)], theirs[name][1])


class _Tagger(nn.Module):
    """A per-position classifier: one loss term per token (M = N T)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 6)
        self.second = nn.Linear(6, N_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.second(torch.tanh(self.first(x)))
        return out


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_sequence_model_factors_equal_curvlinops(approx: str) -> None:
    """With T loss terms per sample the G factors carry M = N T (curvlinops'
    ``num_per_example_loss_terms``); the capture reads M off the (N, T, C) output."""
    torch.manual_seed(11)
    n, t = 5, 6
    model = _Tagger().to(DT)
    x = torch.randn(n, t, 4, dtype=DT)
    y = torch.randint(0, N_CLASSES, (n, t))
    engine = KFACEngine(model, staleness=StalenessConfig(enabled=False), kfac_approx=approx)  # type: ignore[arg-type]
    F.cross_entropy(model(x).reshape(-1, N_CLASSES), y.reshape(-1)).backward()
    engine.refresh(lambda block: 1e-3)

    class Flat(nn.Module):  # curvlinops wants (N T, C) outputs for CrossEntropyLoss
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Tensor) -> Tensor:
            return self.inner(x).reshape(-1, N_CLASSES)

    engine.capture.remove()
    theirs = _curvlinops_factors(Flat(model), x, y.reshape(-1), approx, t)
    for name in ("first", "second"):
        a_cl, g_cl = theirs[f"inner.{name}"]
        torch.testing.assert_close(engine.stats[(name, Factor.A)], a_cl)
        torch.testing.assert_close(engine.stats[(name, Factor.G)], g_cl)
