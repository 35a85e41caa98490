"""Tests for :mod:`bigbatch.curvature.layers` against per-sample autograd oracles.

Every statistic is checked in float64 against an independent construction: per-sample
gradients come from backpropagating each per-sample loss ``L_i`` of a whole-batch forward
pass separately (so BatchNorm's train-mode coupling is respected), im2col patches from an
explicit loop over output positions with slicing, and the preconditioners from dense
solves with Kronecker products. The K-FAC factors of Linear and Conv2d layers are also
compared with ``curvlinops.KFACLinearOperator`` (a test extra).
"""

from __future__ import annotations

from collections.abc import Callable

import curvlinops
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bigbatch.curvature.layers import (
    UnsupportedLayerError,
    batchnorm_normalized_input,
    batchnorm_unitwise_sum,
    conv2d_input_sum,
    conv2d_patches,
    embedding_input_sum,
    embedding_precondition,
    finalize_kronecker,
    finalize_unitwise,
    kronecker_precondition,
    layernorm_normalized_input,
    layernorm_unitwise_sum,
    linear_input_sum,
    output_grad_sum,
    split_grad_matrix,
    unitwise_precondition,
    unitwise_sum,
    weight_grad_matrix,
)

DT = torch.float64
N_CLASSES = 3


# ------------------------------------------------------------------------------ oracles


class _Capture:
    """Forward hook keeping a layer's input and (grad-retaining) output."""

    def __init__(self, layer: nn.Module) -> None:
        self.inp: Tensor | None = None
        self.out: Tensor | None = None
        self.handle = layer.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        self.inp = args[0]
        self.out = out


def _per_sample_losses(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _forward(
    model: nn.Module, layer: nn.Module, x: Tensor, y: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One whole-batch forward: (per-sample losses, layer input, layer output)."""
    cap = _Capture(layer)
    try:
        losses = _per_sample_losses(model(x), y)
    finally:
        cap.handle.remove()
    assert cap.inp is not None
    assert cap.out is not None
    return losses, cap.inp, cap.out


def _per_sample_grads(losses: Tensor, wrt: list[Tensor]) -> list[list[Tensor]]:
    """``[[dL_i/dw for w in wrt] for i]`` by backpropagating each ``L_i`` separately."""
    return [
        list(torch.autograd.grad(losses[i], wrt, retain_graph=True)) for i in range(losses.shape[0])
    ]


def _per_sample_output_grads(losses: Tensor, out: Tensor) -> Tensor:
    """``g_i = dL_i / d out[i]`` stacked; asserts the other rows get no gradient."""
    rows = []
    for i, (g,) in enumerate(_per_sample_grads(losses, [out])):
        others = torch.cat([g[:i], g[i + 1 :]])
        assert torch.count_nonzero(others) == 0, "per-sample losses are coupled"
        rows.append(g[i])
    return torch.stack(rows)


def _mean_loss_output_grad(losses: Tensor, out: Tensor) -> Tensor:
    """``gy``: gradient of the batch-MEAN loss w.r.t. the layer output."""
    (gy,) = torch.autograd.grad(losses.mean(), out, retain_graph=True)
    return gy


def _mean_outer(v: Tensor) -> Tensor:
    """Mean over dim 0 of ``v_i v_i^T`` for rows ``v_i``."""
    return torch.einsum("ni,nj->ij", v, v) / v.shape[0]


def _with_ones(a: Tensor) -> Tensor:
    return torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], dim=-1)


# ------------------------------------------------------------------------------- Linear


def _mlp(in_dim: int, hidden: int, bias: bool, seq: bool) -> tuple[nn.Module, nn.Linear]:
    first = nn.Linear(in_dim, hidden, bias=bias)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = first
            self.second = nn.Linear(hidden, N_CLASSES)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.tanh(self.first(x))
            if seq:
                h = h.mean(dim=1)
            out: Tensor = self.second(h)
            return out

    return Net().to(DT), first


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("seq", [False, True], ids=["2d", "3d"])
def test_linear_factors_match_per_sample_oracle(bias: bool, seq: bool) -> None:
    torch.manual_seed(0)
    n, t, d_in, d_out = 6, 4, 5, 7
    model, layer = _mlp(d_in, d_out, bias, seq)
    x = torch.randn((n, t, d_in) if seq else (n, d_in), dtype=DT)
    y = torch.randint(0, N_CLASSES, (n,))
    losses, inp, out = _forward(model, layer, x, y)
    p = t if seq else 1

    # Oracle A: mean over samples of sum over positions of a a^T.
    a = inp.detach().reshape(n, p, d_in)
    if bias:
        a = _with_ones(a)
    a_oracle = torch.einsum("npi,npj->ij", a, a) / n
    # Oracle G: per-sample output grads, mean over samples and positions.
    g = _per_sample_output_grads(losses, out).reshape(n, p, d_out)
    g_oracle = torch.einsum("npi,npj->ij", g, g) / (n * p)

    gy = _mean_loss_output_grad(losses, out)
    a_sum = linear_input_sum(inp, has_bias=bias)
    g_sum = output_grad_sum(gy)
    assert a_sum.dtype == DT
    assert g_sum.dtype == DT
    big_a, big_g = finalize_kronecker(a_sum, g_sum, n_samples=n, positions=p, grad_scale=n)
    torch.testing.assert_close(big_a, a_oracle)
    torch.testing.assert_close(big_g, g_oracle)
    # Default grad_scale is the batch-mean convention.
    torch.testing.assert_close(finalize_kronecker(a_sum, g_sum, n, p)[1], g_oracle)

    # Sum-loss backward (Monte-Carlo-Fisher style): grad_scale = 1 / N.
    (gy_sum,) = torch.autograd.grad(losses.sum(), out, retain_graph=True)
    _, g_from_sum = finalize_kronecker(a_sum, output_grad_sum(gy_sum), n, p, grad_scale=1 / n)
    torch.testing.assert_close(g_from_sum, g_oracle)

    # Gradient matrix: sum of per-sample grads, and equal to sum_p gy a^T in our layout.
    params = [layer.weight] + ([layer.bias] if bias else [])
    per_sample = _per_sample_grads(losses, params)
    model.zero_grad()
    losses.sum().backward()
    mat = weight_grad_matrix(layer)
    expected = torch.stack([torch.cat([q.reshape(d_out, -1) for q in gs], 1) for gs in per_sample])
    torch.testing.assert_close(mat, expected.sum(0).reshape(d_out, -1))
    gsum = gy_sum.reshape(n, p, d_out)
    torch.testing.assert_close(mat, torch.einsum("npo,npi->oi", gsum, a))
    w, b = split_grad_matrix(layer, mat)
    assert layer.weight.grad is not None
    torch.testing.assert_close(w, layer.weight.grad)
    if bias:
        assert b is not None
        assert layer.bias.grad is not None
        torch.testing.assert_close(b, layer.bias.grad)
    else:
        assert b is None


def test_linear_input_sum_low_precision_is_float32() -> None:
    torch.manual_seed(1)
    x = torch.randn(8, 3, 5, dtype=torch.bfloat16)
    s = linear_input_sum(x, has_bias=True)
    assert s.dtype == torch.float32
    a = _with_ones(x.to(torch.float64).reshape(-1, 5))
    torch.testing.assert_close(s.double(), a.T @ a, rtol=1e-5, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s_autocast = linear_input_sum(x, has_bias=True)
    assert s_autocast.dtype == torch.float32
    torch.testing.assert_close(s_autocast, s)
    assert output_grad_sum(x.to(torch.float16), channel_dim=1).dtype == torch.float32


def test_micro_batches_accumulate_exactly() -> None:
    """Sums over two micro-batches (loss_k = sum_k / N) reproduce the full-batch factors."""
    torch.manual_seed(2)
    n, d_in, d_out = 8, 4, 5
    model, layer = _mlp(d_in, d_out, True, False)
    x = torch.randn(n, d_in, dtype=DT)
    y = torch.randint(0, N_CLASSES, (n,))
    losses, inp, out = _forward(model, layer, x, y)
    full = finalize_kronecker(
        linear_input_sum(inp, True), output_grad_sum(_mean_loss_output_grad(losses, out)), n
    )
    a_sum = torch.zeros(d_in + 1, d_in + 1, dtype=DT)
    g_sum = torch.zeros(d_out, d_out, dtype=DT)
    for xs, ys in zip(x.split(n // 2), y.split(n // 2), strict=True):
        losses_k, inp_k, out_k = _forward(model, layer, xs, ys)
        # Gradient accumulation with a global-mean loss: per-sample grad = N * gy.
        (gy_k,) = torch.autograd.grad(losses_k.sum() / n, out_k)
        a_sum += linear_input_sum(inp_k, True)
        g_sum += output_grad_sum(gy_k)
    acc = finalize_kronecker(a_sum, g_sum, n)
    torch.testing.assert_close(acc[0], full[0])
    torch.testing.assert_close(acc[1], full[1])


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


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "bias", "pads"), CONV_CASES)
def test_conv2d_factors_match_per_sample_oracle(
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
    losses, inp, out = _forward(model, conv, x, y)

    # Independent patches; validated against the module's own forward.
    patches = _oracle_patches(x, kernel, stride, dilation, pads)
    p = patches.shape[1]
    assert p == out.shape[2] * out.shape[3]
    w_mat = conv.weight.detach().reshape(c_out, -1)
    y_lin = torch.einsum("oi,npi->nop", w_mat, patches)
    if conv.bias is not None:
        y_lin = y_lin + conv.bias.detach()[None, :, None]
    torch.testing.assert_close(y_lin, out.detach().reshape(n, c_out, -1))
    torch.testing.assert_close(conv2d_patches(x, conv), patches)

    a = _with_ones(patches) if bias else patches
    a_oracle = torch.einsum("npi,npj->ij", a, a) / n
    g = _per_sample_output_grads(losses, out).reshape(n, c_out, p).transpose(1, 2)
    g_oracle = torch.einsum("npi,npj->ij", g, g) / (n * p)

    a_sum, positions = conv2d_input_sum(inp, conv)
    assert positions == p
    gy = _mean_loss_output_grad(losses, out)
    big_a, big_g = finalize_kronecker(a_sum, output_grad_sum(gy, channel_dim=1), n, positions, n)
    torch.testing.assert_close(big_a, a_oracle)
    torch.testing.assert_close(big_g, g_oracle)

    # Gradient matrix: sum of per-sample grads, and sum_{n,p} g a^T in the patch layout.
    params = [conv.weight] + ([conv.bias] if conv.bias is not None else [])
    per_sample = _per_sample_grads(losses, params)
    model.zero_grad()
    losses.sum().backward()
    mat = weight_grad_matrix(conv)
    expected = sum(torch.cat([q.reshape(c_out, -1) for q in gs], 1) for gs in per_sample)
    assert isinstance(expected, Tensor)
    torch.testing.assert_close(mat, expected)
    torch.testing.assert_close(mat, torch.einsum("npo,npi->oi", g, a))
    w_back, b_back = split_grad_matrix(conv, mat)
    assert conv.weight.grad is not None
    torch.testing.assert_close(w_back, conv.weight.grad)
    assert (b_back is None) == (not bias)


def test_conv2d_input_sum_bias_override() -> None:
    """``has_bias=False`` drops the bias row/column even when the module has a bias."""
    torch.manual_seed(13)
    conv = nn.Conv2d(2, 3, 3, padding=1).to(DT)
    x = torch.randn(3, 2, 5, 4, dtype=DT)
    with_bias, p = conv2d_input_sum(x, conv)
    without, p2 = conv2d_input_sum(x, conv, has_bias=False)
    assert p == p2 == 20
    assert with_bias.shape == (19, 19)
    torch.testing.assert_close(without, with_bias[:18, :18])
    assert with_bias[18, 18].item() == 3 * 20


def test_conv2d_unbatched_input() -> None:
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 3, 3, padding=1).to(DT)
    x = torch.randn(2, 5, 5, dtype=DT)
    torch.testing.assert_close(conv2d_patches(x, conv), conv2d_patches(x[None], conv))


def test_conv2d_unsupported_layers_raise() -> None:
    x = torch.randn(2, 4, 6, 6, dtype=DT)
    grouped = nn.Conv2d(4, 4, 3, groups=2).to(DT)
    with pytest.raises(UnsupportedLayerError, match=r"groups=2.*falls back"):
        conv2d_patches(x, grouped)
    with pytest.raises(UnsupportedLayerError, match="groups"):
        conv2d_input_sum(x, grouped)
    reflect = nn.Conv2d(4, 2, 3, padding=1, padding_mode="reflect").to(DT)
    with pytest.raises(UnsupportedLayerError, match=r"padding_mode='reflect'"):
        conv2d_input_sum(x, reflect)
    assert issubclass(UnsupportedLayerError, ValueError)
    with pytest.raises(UnsupportedLayerError, match="Linear and Conv2d"):
        weight_grad_matrix(nn.Embedding(3, 2))


# ------------------------------------------------------------------------ Preconditioning


def test_kronecker_precondition_matches_dense_solve_two_layers() -> None:
    """Block-diagonal K-FAC over a 2-layer MLP equals the dense Kronecker solve."""
    torch.manual_seed(5)
    n, d_in, hidden = 10, 4, 3
    model, first = _mlp(d_in, hidden, True, False)
    second = model.second
    assert isinstance(second, nn.Linear)
    x = torch.randn(n, d_in, dtype=DT)
    y = torch.randint(0, N_CLASSES, (n,))
    caps = [_Capture(first), _Capture(second)]
    losses = _per_sample_losses(model(x), y)
    for cap in caps:
        cap.handle.remove()
    outs = [cap.out for cap in caps]
    assert all(o is not None for o in outs)
    gys = torch.autograd.grad(losses.mean(), [o for o in outs if o is not None], retain_graph=True)
    model.zero_grad()
    losses.mean().backward()
    damping = 0.1
    blocks, vecs, ours = [], [], []
    for cap, gy, layer in zip(caps, gys, (first, second), strict=True):
        assert cap.inp is not None
        big_a, big_g = finalize_kronecker(linear_input_sum(cap.inp, True), output_grad_sum(gy), n)
        a_d = big_a + damping * torch.eye(big_a.shape[0], dtype=DT)
        g_d = big_g + damping * torch.eye(big_g.shape[0], dtype=DT)
        mat = weight_grad_matrix(layer)
        ours.append(kronecker_precondition(mat, torch.linalg.inv(a_d), torch.linalg.inv(g_d)))
        blocks.append(np.kron(a_d.numpy(), g_d.numpy()))
        vecs.append(mat.numpy().reshape(-1, order="F"))
    dense = np.linalg.solve(scipy.linalg.block_diag(*blocks), np.concatenate(vecs))
    ours_vec = np.concatenate([m.numpy().reshape(-1, order="F") for m in ours])
    np.testing.assert_allclose(ours_vec, dense, rtol=1e-10, atol=1e-12)


def test_kronecker_precondition_dtype_and_shape_checks() -> None:
    grad = torch.randn(3, 4, dtype=torch.float32)
    out = kronecker_precondition(grad, torch.eye(4, dtype=DT), 2 * torch.eye(3, dtype=DT))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, 2 * grad)
    with pytest.raises(ValueError, match="shapes do not match"):
        kronecker_precondition(grad, torch.eye(3), torch.eye(3))


def test_unitwise_precondition_matches_per_channel_solve() -> None:
    torch.manual_seed(6)
    c = 5
    m = torch.randn(c, 2, 2, dtype=DT)
    f = m @ m.transpose(1, 2) + 0.5 * torch.eye(2, dtype=DT)
    gamma, beta = torch.randn(c, dtype=DT), torch.randn(c, dtype=DT)
    pg, pb = unitwise_precondition(gamma, beta, torch.linalg.inv(f))
    for k in range(c):
        sol = np.linalg.solve(f[k].numpy(), np.array([gamma[k].item(), beta[k].item()]))
        np.testing.assert_allclose([pg[k].item(), pb[k].item()], sol, rtol=1e-10)
    # Multi-dimensional (LayerNorm) parameter shapes are kept.
    pg2, pb2 = unitwise_precondition(gamma.reshape(1, c), beta.reshape(1, c), torch.linalg.inv(f))
    assert pg2.shape == (1, c)
    torch.testing.assert_close(pg2.reshape(-1), pg)
    torch.testing.assert_close(pb2.reshape(-1), pb)


def test_preconditioners_apply_the_matrices_on_the_documented_sides() -> None:
    """Non-symmetric inverses pin down left/right and transposition conventions."""
    torch.manual_seed(11)
    grad = torch.randn(3, 4, dtype=DT)
    a_inv, g_inv = torch.randn(4, 4, dtype=DT), torch.randn(3, 3, dtype=DT)
    torch.testing.assert_close(kronecker_precondition(grad, a_inv, g_inv), g_inv @ grad @ a_inv)
    a_diag, g_inv_d = torch.rand(3, dtype=DT), torch.randn(4, 4, dtype=DT)
    torch.testing.assert_close(
        embedding_precondition(grad, a_diag, g_inv_d), torch.diag(a_diag) @ grad @ g_inv_d
    )
    f_inv = torch.randn(4, 2, 2, dtype=DT)
    gamma, beta = torch.randn(4, dtype=DT), torch.randn(4, dtype=DT)
    pg, pb = unitwise_precondition(gamma, beta, f_inv)
    for k in range(4):
        expected = f_inv[k] @ torch.stack([gamma[k], beta[k]])
        torch.testing.assert_close(torch.stack([pg[k], pb[k]]), expected)


# ---------------------------------------------------------------------------- Unit-wise


def _check_unitwise(
    model: nn.Module,
    norm: nn.Module,
    x: Tensor,
    normalize: Callable[[Tensor], Tensor],
    unitwise: Callable[[Tensor, Tensor], Tensor],
) -> None:
    """x_hat reproduces the module; F from gy equals the per-sample (gamma, beta) Fisher."""
    n = x.shape[0]
    y = torch.randint(0, N_CLASSES, (n,))
    losses, inp, out = _forward(model, norm, x, y)
    gamma, beta = norm.weight, norm.bias
    assert isinstance(gamma, Tensor)
    assert isinstance(beta, Tensor)
    x_hat = normalize(inp)
    assert x_hat.dtype == DT
    # x_hat is what the module normalised: gamma * x_hat + beta reproduces its output.
    shape = [1] * x.dim()
    if isinstance(norm, nn.LayerNorm):
        affine = x_hat * gamma + beta
    else:
        shape[1] = -1
        affine = x_hat * gamma.reshape(shape) + beta.reshape(shape)
    torch.testing.assert_close(affine, out.detach())

    per_sample = _per_sample_grads(losses, [gamma, beta])
    v = torch.stack([torch.stack([dg.reshape(-1), db.reshape(-1)], -1) for dg, db in per_sample])
    f_oracle = torch.einsum("nci,ncj->cij", v, v) / n

    gy = _mean_loss_output_grad(losses, out)
    f_sum = unitwise(x_hat, gy)
    assert f_sum.shape == (gamma.numel(), 2, 2)
    torch.testing.assert_close(finalize_unitwise(f_sum, n, grad_scale=n), f_oracle)
    torch.testing.assert_close(finalize_unitwise(f_sum, n), f_oracle)
    (gy_sum,) = torch.autograd.grad(losses.sum(), out, retain_graph=True)
    torch.testing.assert_close(finalize_unitwise(unitwise(x_hat, gy_sum), n, 1 / n), f_oracle)


@pytest.mark.parametrize(
    ("sample_dim", "channel_dims"), [(0, (1,)), (1, (0,)), (2, (0, 3)), (2, (3, 0)), (-1, (1, 2))]
)
def test_unitwise_sum_any_layout_matches_explicit_loops(
    sample_dim: int, channel_dims: tuple[int, ...]
) -> None:
    """The generic ``unitwise_sum`` on arbitrary layouts equals an explicit loop."""
    torch.manual_seed(12)
    shape = (3, 4, 2, 5)
    x_hat, gy = torch.randn(shape, dtype=DT), torch.randn(shape, dtype=DT)
    s = sample_dim % 4
    pos = [d for d in range(4) if d != s and d not in channel_dims]
    # Canonical layout (sample, *channels in ascending dim order, *positions).
    order = [s, *sorted(channel_dims), *pos]
    xc, gc = x_hat.permute(order), gy.permute(order)
    n = xc.shape[0]
    n_chan = int(np.prod([shape[d] for d in channel_dims]))
    xc = xc.reshape(n, n_chan, -1)
    gc = gc.reshape(n, n_chan, -1)
    expected = torch.zeros(n_chan, 2, 2, dtype=DT)
    for i in range(n):
        for c in range(n_chan):
            v = torch.stack([(gc[i, c] * xc[i, c]).sum(), gc[i, c].sum()])
            expected[c] += torch.outer(v, v)
    torch.testing.assert_close(unitwise_sum(x_hat, gy, channel_dims, sample_dim), expected)


def _randomize_affine(norm: nn.Module) -> None:
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn_like(p))


BN_CASES = [
    ("bn1d-NC", (6, 4)),
    ("bn1d-NCL", (6, 4, 5)),
    ("bn2d", (6, 3, 4, 5)),
]


@pytest.mark.parametrize(("name", "shape"), BN_CASES, ids=[c[0] for c in BN_CASES])
@pytest.mark.parametrize("mode", ["train", "eval", "eval-no-running-stats"])
def test_batchnorm_unitwise_matches_per_sample_oracle(
    name: str, shape: tuple[int, ...], mode: str
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
    x = 2.0 * torch.randn(shape, dtype=DT) + 0.5
    _check_unitwise(
        model,
        bn,
        x,
        lambda inp: batchnorm_normalized_input(bn, inp),
        batchnorm_unitwise_sum,
    )


LN_CASES = [
    ("2d", (6, 5), (5,)),
    ("3d-last", (6, 3, 5), (5,)),
    ("3d-last-two", (6, 3, 5), (3, 5)),
    ("4d-last", (5, 2, 3, 4), (4,)),
]


@pytest.mark.parametrize(("name", "shape", "normalized"), LN_CASES, ids=[c[0] for c in LN_CASES])
def test_layernorm_unitwise_matches_per_sample_oracle(
    name: str, shape: tuple[int, ...], normalized: tuple[int, ...]
) -> None:
    torch.manual_seed(8)
    ln = nn.LayerNorm(normalized).to(DT)
    _randomize_affine(ln)
    n_feat = int(np.prod(shape[1:]))
    model = nn.Sequential(ln, nn.Tanh(), nn.Flatten(), nn.Linear(n_feat, N_CLASSES)).to(DT)
    x = 2.0 * torch.randn(shape, dtype=DT) - 0.3
    _check_unitwise(
        model,
        ln,
        x,
        lambda inp: layernorm_normalized_input(ln, inp),
        lambda xh, gy: layernorm_unitwise_sum(xh, gy, len(normalized)),
    )


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
    idx[0, 0] = 2  # make sure the padding index occurs
    y = torch.randint(0, N_CLASSES, (n,))
    losses, inp, out = _forward(model, emb, idx, y)

    counts = F.one_hot(idx, vocab).to(DT).sum(dim=1)  # (n, vocab): sum over positions
    a_oracle = counts.mean(dim=0)
    if padding_idx is not None:
        a_oracle[padding_idx] = 0.0
    g = _per_sample_output_grads(losses, out)  # (n, t, dim)
    g_oracle = torch.einsum("npi,npj->ij", g, g) / (n * t)

    a_sum = embedding_input_sum(inp, vocab, padding_idx=padding_idx)
    assert a_sum.dtype == torch.float32
    assert a_sum.shape == (vocab,)
    gy = _mean_loss_output_grad(losses, out)
    big_a, big_g = finalize_kronecker(a_sum.to(DT), output_grad_sum(gy), n, positions=t)
    torch.testing.assert_close(big_a, a_oracle)
    torch.testing.assert_close(big_g, g_oracle)

    # Preconditioning: diag(A)^-1 grad G^-1 equals the dense solve with (G kron diag(A)),
    # column-major vec of the (V, D) gradient.
    model.zero_grad()
    losses.mean().backward()
    assert emb.weight.grad is not None
    grad_w = emb.weight.grad
    damping = 0.05
    a_d = big_a + damping
    g_d = big_g + damping * torch.eye(dim, dtype=DT)
    ours = embedding_precondition(grad_w, 1.0 / a_d, torch.linalg.inv(g_d))
    dense = np.linalg.solve(
        np.kron(g_d.numpy(), np.diag(a_d.numpy())), grad_w.numpy().reshape(-1, order="F")
    )
    np.testing.assert_allclose(ours.numpy().reshape(-1, order="F"), dense, rtol=1e-10)


# ------------------------------------------------------------------------------ curvlinops


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_factors_match_curvlinops_kfac(reduction: str) -> None:
    """Compare A and G of a Conv2d and a Linear with ``curvlinops.KFACLinearOperator``.

    curvlinops (empirical Fisher, ``kfac_approx="expand"``, one batch of N samples,
    ``separate_weight_and_bias=False``) stores, for a layer with ``P`` positions::

        A_cl = sum_{n,p} a a^T / (N P)          = A / P
        G_cl = corr * sum_{n,p} gy gy^T          with corr = N for reduction="mean"
                                                 (gy from the mean loss) and corr = 1
                                                 for "sum" (gy from the sum loss)

    Ours: ``G = (c**2 / (N P)) sum gy gy^T`` with ``c = N`` ("mean") or ``c = 1`` ("sum").
    Hence, exactly:

    * reduction="mean": ``A_cl = A / P`` and ``G_cl = P * G``, so ``A_cl kron G_cl =
      A kron G`` (the same Fisher block; the factors only trade the ``P``);
    * reduction="sum": ``A_cl = A / P`` and ``G_cl = N P * G``, so ``A_cl kron G_cl =
      N * (A kron G)`` (curvlinops approximates the Fisher of the SUM loss, N times the
      per-sample-mean Fisher that SP-NGD uses).

    For the Linear layer ``P = 1``.
    """
    torch.manual_seed(10)
    n = 5
    conv = nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding=1, dilation=(2, 1)).to(DT)
    x = torch.randn(n, 2, 8, 7, dtype=DT)
    with torch.no_grad():
        n_feat = conv(x)[0].numel()
    linear = nn.Linear(n_feat, N_CLASSES).to(DT)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), linear).to(DT)
    y = torch.randint(0, N_CLASSES, (n,))

    caps = {"0": _Capture(conv), "3": _Capture(linear)}
    loss = F.cross_entropy(model(x), y, reduction=reduction)
    for cap in caps.values():
        cap.handle.remove()
    outs = [caps[k].out for k in ("0", "3")]
    gys = dict(
        zip(("0", "3"), torch.autograd.grad(loss, [o for o in outs if o is not None]), strict=True)
    )
    grad_scale = n if reduction == "mean" else 1 / n
    cap0, cap3 = caps["0"], caps["3"]
    assert cap0.inp is not None
    assert cap3.inp is not None
    conv_a, p = conv2d_input_sum(cap0.inp, conv)
    ours = {
        "0": (
            *finalize_kronecker(conv_a, output_grad_sum(gys["0"], 1), n, p, grad_scale),
            p,
        ),
        "3": (
            *finalize_kronecker(
                linear_input_sum(cap3.inp, True), output_grad_sum(gys["3"]), n, 1, grad_scale
            ),
            1,
        ),
    }

    kfac = curvlinops.KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(reduction=reduction),
        [q for q in model.parameters()],
        [(x, y)],
        fisher_type="empirical",
        kfac_approx="expand",
        separate_weight_and_bias=False,
        num_data=n,
        num_per_example_loss_terms=1,
        check_deterministic=False,
    )
    kfac.compute_kronecker_factors()
    state = kfac.state_dict()
    for name, (big_a, big_g, positions) in ours.items():
        a_cl = state["input_covariances"][name]
        g_cl = state["gradient_covariances"][name]
        g_const = positions if reduction == "mean" else n * positions
        torch.testing.assert_close(a_cl, big_a / positions)
        torch.testing.assert_close(g_cl, g_const * big_g)
    assert p > 1  # the conv case really exercises the P factor
