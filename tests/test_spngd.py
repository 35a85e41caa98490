"""SPNGD: natural-gradient directions against dense float64 solves, accumulation, resume,
robustness of the hooks, the Monte Carlo Fisher, bad input."""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bigbatch import NLCG, SPNGD, KFACPreconditioner, StalenessConfig
from bigbatch.curvature.keys import BlockKind, Factor
from bigbatch.curvature.linalg import InversionConfig, kron_damping

torch.set_default_dtype(torch.float32)


def mlp(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def data(n: int = 16, seed: int = 1, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen, dtype=dtype), torch.randint(0, 3, (n,), generator=gen)


def per_sample_factors(model: nn.Sequential, x: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
    """(A, G) of each Linear from per-sample autograd: A = mean a a^T, G = mean g g^T."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    a_list: list[list[Tensor]] = [[] for _ in linears]
    g_list: list[list[Tensor]] = [[] for _ in linears]
    for i in range(len(x)):
        outs: list[Tensor] = []
        h = x[i : i + 1]
        for m in model:
            if isinstance(m, nn.Linear):
                a_list[linears.index(m)].append(
                    torch.cat([h[0].detach(), torch.ones(1, dtype=h.dtype)])
                )
                h = m(h)
                h.retain_grad()
                outs.append(h)
            else:
                h = m(h)
        F.cross_entropy(h, y[i : i + 1]).backward()
        for j, out in enumerate(outs):
            assert out.grad is not None
            g_list[j].append(out.grad[0].detach().clone())
    model.zero_grad()
    return [
        (torch.stack(a).T @ torch.stack(a) / len(x), torch.stack(g).T @ torch.stack(g) / len(x))
        for a, g in zip(a_list, g_list, strict=True)
    ]


def one_step_directions(
    opt: Any, model: nn.Module, x: Tensor, y: Tensor, **step: Any
) -> list[Tensor]:
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step(**step)
    return [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]


@pytest.mark.parametrize("lam", [1e-3, 0.1])
def test_direction_equals_dense_damped_kronecker_solve(lam: float) -> None:
    model = mlp()
    x, y = data()
    factors = per_sample_factors(model, x, y)
    F.cross_entropy(model(x), y).backward()
    grads = [
        (m.weight.grad.clone(), m.bias.grad.clone()) for m in model if isinstance(m, nn.Linear)
    ]
    model.zero_grad()
    opt = SPNGD(model, lr=1.0, momentum=0.0, damping=lam, staleness=False)
    got = one_step_directions(opt, model, x, y)
    for j, ((a, g), (gw, gb)) in enumerate(zip(factors, grads, strict=True)):
        da, dg = kron_damping(a, g, lam)
        mat = torch.cat([gw, gb[:, None]], dim=1).numpy()
        dense = np.kron(
            (a + da * torch.eye(len(a), dtype=a.dtype)).numpy(),
            (g + dg * torch.eye(len(g), dtype=g.dtype)).numpy(),
        )
        vec = np.linalg.solve(dense, mat.reshape(-1, order="F"))
        expected = vec.reshape(mat.shape, order="F")
        np.testing.assert_allclose(got[2 * j].numpy(), expected[:, :-1], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(got[2 * j + 1].numpy(), expected[:, -1], rtol=1e-9, atol=1e-12)
        # the preconditioning did something: the direction is not the raw gradient
        assert not np.allclose(expected[:, :-1], gw.numpy(), rtol=0.1)


def test_nlcg_kfac_first_direction_equals_natural_gradient() -> None:
    x, y = data()
    model_a, model_b = mlp(), mlp()
    spngd = SPNGD(model_a, lr=1.0, momentum=0.0, damping=0.01, staleness=False)
    nlcg = NLCG(
        model_b.parameters(),
        lr=1.0,
        step_control="off",
        preconditioner=KFACPreconditioner(model_b, damping=0.01, staleness=False),
    )
    want = one_step_directions(spngd, model_a, x, y)
    got = one_step_directions(nlcg, model_b, x, y)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_micro_batch_accumulation_equals_full_batch() -> None:
    torch.manual_seed(3)
    x = torch.randn(32, 2, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (32,))

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 64, 4)
        ).double()

    full, micro = net(), net()
    opt_full = SPNGD(full, lr=0.3, damping=1e-2)
    opt_micro = SPNGD(micro, lr=0.3, damping=1e-2)
    for _ in range(4):
        opt_full.zero_grad()
        F.cross_entropy(full(x), y).backward()
        opt_full.step()
        opt_micro.zero_grad()
        for part in range(4):
            sl = slice(8 * part, 8 * part + 8)
            (F.cross_entropy(micro(x[sl]), y[sl]) / 4).backward()
        opt_micro.step()
    for p, q in zip(full.parameters(), micro.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)
    for k, v in opt_full.engine.stats.items():
        torch.testing.assert_close(opt_micro.engine.stats[k], v, rtol=1e-10, atol=1e-12)


def cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(4 * 36, 10),
        nn.LayerNorm(10),
    )


def images(n: int = 24, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def train(model: nn.Module, opt: SPNGD, batches: list[tuple[Tensor, Tensor]]) -> None:
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_resume_equals_uninterrupted(method: str) -> None:
    batches = [images(seed=s) for s in range(12)]

    def fresh() -> tuple[nn.Module, SPNGD]:
        model = cnn()
        stale = StalenessConfig(threshold=1.0)  # random batches: let intervals grow anyway
        return model, SPNGD(
            model,
            lr=0.05,
            damping=1e-2,
            weight_decay=1e-4,
            kl_clip=1e-2,
            staleness=stale,
            inversion=InversionConfig(method=method),
        )

    model_a, opt_a = fresh()
    train(model_a, opt_a, batches)
    model_b, opt_b = fresh()
    train(model_b, opt_b, batches[:5])
    buf = io.BytesIO()
    torch.save({"m": model_b.state_dict(), "o": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_c, opt_c = fresh()
    model_c.load_state_dict(ckpt["m"])
    opt_c.load_state_dict(ckpt["o"])
    train(model_c, opt_c, batches[5:])
    for p, q in zip(model_a.parameters(), model_c.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt_a.engine.schedule.state_dict() == opt_c.engine.schedule.state_dict()
    assert opt_a.refresh_fraction < 1.0  # stale statistics were in play


def test_all_supported_layers_are_blocks_and_unsupported_are_listed_once() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(16, 4), nn.PReLU(), nn.Linear(4, 2)
    )
    with pytest.warns(UserWarning, match=r"3 parameter\(s\) have no Fisher block") as record:
        opt = SPNGD(model, lr=0.1)
    assert len(record) == 1
    assert opt.fallback_parameters == ["0.weight", "0.bias", "3.weight"]
    assert set(opt.engine.blocks) == {"2", "4"}
    x = torch.randn(8, 1, 10)
    before = model[3].weight.detach().clone()
    opt.zero_grad()
    F.cross_entropy(model(x), torch.randint(0, 2, (8,))).backward()
    opt.step()
    assert not torch.equal(before, model[3].weight)  # the fallback parameter trained


def test_inplace_activation_weight_sharing_and_autocast_are_captured() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = shared
            self.head = nn.Linear(6, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.relu_(self.shared(x))  # in-place right after the layer
            h = torch.relu_(self.shared(h))  # the same module twice
            return self.head(h)

    model = Net()
    opt = SPNGD(model, lr=0.1, damping=1e-2, staleness=False)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(2):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        opt.step()
    assert set(opt.last_report.refreshed) == {
        ("shared", Factor.A),
        ("shared", Factor.G),
        ("head", Factor.A),
        ("head", Factor.G),
    }
    a = opt.engine.stats[("shared", Factor.A)]
    assert a.dtype == torch.float32
    # two calls per sample (K-FAC-expand): A is the mean of a a^T over both calls' 32 rows,
    # so its bias corner is 1 (it was 2 with the old per-sample normalisation)
    assert float(a[-1, -1]) == pytest.approx(1.0)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_hooks_that_never_fire_are_reported_by_name() -> None:
    torch.manual_seed(0)
    layer, head = nn.Linear(4, 4), nn.Linear(4, 2)
    model = nn.ModuleDict({"layer": layer, "head": head})
    opt = SPNGD(model, lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    opt.zero_grad()
    out = head(F.linear(x, layer.weight, layer.bias))  # `layer` used functionally
    F.cross_entropy(out, y).backward()
    with pytest.warns(UserWarning, match="'layer'.*hooks did not fire"):
        opt.step()
    assert ("layer", Factor.A) in opt.last_report.missing
    assert ("head", Factor.A) in opt.last_report.refreshed


def test_rank_deficient_factors_and_tiny_batches_stay_finite() -> None:
    model = cnn()
    opt = SPNGD(model, lr=0.5, damping=1e-6, staleness=False)
    x, y = images(n=2)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_nonfinite_gradient_changes_nothing(policy: str) -> None:
    model = cnn()
    opt = SPNGD(model, lr=0.1, nonfinite=policy)
    train(model, opt, [images()])
    before = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(images()[0]), images()[1]).backward()
    model[0].weight.grad[0, 0, 0, 0] = float("nan")
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="non-finite gradient"):
            opt.step()
    else:
        with pytest.warns(UserWarning, match="non-finite gradient"):
            opt.step()
        assert opt.skipped_steps == 1
    for b, p in zip(before, model.parameters(), strict=True):
        assert torch.equal(b, p)
    for m, p in zip(momentum, model.parameters(), strict=True):
        assert torch.equal(m, opt.state[p]["momentum_buffer"])


def test_monte_carlo_fisher_matches_exact_fisher_in_expectation() -> None:
    # Softmax regression: the exact (type-2) Fisher's G of the layer is
    # mean_i (diag(p_i) - p_i p_i^T); the MC estimate must average to it.
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    x = torch.randn(64, 3, dtype=torch.float64)
    opt = SPNGD(model, lr=0.0, momentum=0.0, fisher="mc", staleness=False)
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
        exact = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    estimates = []
    for _ in range(300):
        opt.zero_grad()
        out = model(x)
        opt.mc_backward(out)
        F.cross_entropy(out, torch.zeros(64, dtype=torch.long)).backward()
        opt.step()
        estimates.append(opt.engine.stats[("Linear", Factor.G)])
    mean = torch.stack(estimates).mean(0)
    rel = float(torch.linalg.norm(mean - exact) / torch.linalg.norm(exact))
    assert rel < 0.05, rel
    # a single sample is noisy: the average is what converges
    single = float(torch.linalg.norm(estimates[0] - exact) / torch.linalg.norm(exact))
    assert single > rel


def test_mc_fisher_without_mc_backward_is_reported() -> None:
    model = mlp()
    opt = SPNGD(model, lr=0.1, fisher="mc")
    x, y = data()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(UserWarning, match="mc_backward"):
        opt.step()
    with pytest.raises(ValueError, match="fisher='mc'"):
        SPNGD(mlp(), lr=0.1).mc_backward(model(x))


def test_damping_change_triggers_reinversion_and_weight_rescale_caps_norm() -> None:
    model = mlp(dtype=torch.float32)
    opt = SPNGD(model, lr=0.1, damping=1e-2, weight_rescale=True)
    x, y = data(dtype=torch.float32)
    train_mlp = [(x, y)] * 3
    for xb, yb in train_mlp:
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    for group in opt.param_groups:
        group["damping"] = 0.5
    with torch.no_grad():
        model[0].weight.mul_(100.0)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert set(opt.last_report.inverted) == {"0", "2"}
    assert float(model[0].weight.detach().norm()) <= (2 * 4) ** 0.5 + 1e-5


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": -1.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"damping": 0.0}, "damping"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"kl_clip": 0.0}, "kl_clip"),
        ({"fisher": "exact"}, "fisher"),
        ({"staleness": "yes"}, "staleness"),
        ({"nonfinite": "ignore"}, "nonfinite"),
        ({"weight_rescale": 1}, "weight_rescale"),
    ],
)
def test_invalid_hyperparameters_are_named(kwargs: dict[str, Any], name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=name):
            SPNGD(mlp(), **kwargs)


def test_model_must_be_a_module() -> None:
    with pytest.raises(ValueError, match=r"nn\.Module"):
        SPNGD(list(mlp().parameters()))  # type: ignore[arg-type]


def _conv_net() -> tuple[nn.Sequential, Tensor, Tensor]:
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 4)
    ).double()
    x = torch.randn(12, 2, 8, 8, dtype=torch.float64)
    return model, x, torch.randint(0, 4, (12,))


def _curvlinops_factors(
    model: nn.Module, x: Tensor, y: Tensor, fisher_type: str
) -> dict[str, tuple[Tensor, Tensor]]:
    import curvlinops

    kfac = curvlinops.KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(),
        list(model.parameters()),
        [(x, y)],
        fisher_type=fisher_type,
        kfac_approx="expand",
        separate_weight_and_bias=False,
        num_data=len(x),
        check_deterministic=False,
    )
    kfac.compute_kronecker_factors()
    state = kfac.state_dict()
    return {
        k: (state["input_covariances"][k], state["gradient_covariances"][k]) for k in ("0", "3")
    }


def test_hooked_factors_match_curvlinops_for_empirical_and_mc_fisher() -> None:
    """The whole capture pipeline against curvlinops: with the mean loss both store the same
    A (mean over the N P patches) and G (M sum gy gy^T, M = N loss terms) for the conv
    (P = 16) and the Linear; curvlinops' type-2 (exact) Fisher is the expectation the MC
    estimate must match."""
    positions = {"0": 1, "3": 1}
    model, x, y = _conv_net()
    opt = SPNGD(model, lr=0.0, momentum=0.0, staleness=False)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for name, (a_cl, g_cl) in _curvlinops_factors(model, x, y, "empirical").items():
        p = positions[name]
        torch.testing.assert_close(opt.engine.stats[(f"{name}", Factor.A)], a_cl * p)
        torch.testing.assert_close(opt.engine.stats[(f"{name}", Factor.G)], g_cl / p)

    mc = SPNGD(model, lr=0.0, momentum=0.0, fisher="mc", staleness=False)
    sums: dict[str, Tensor] = {}
    rounds = 400
    for _ in range(rounds):
        mc.zero_grad()
        out = model(x)
        mc.mc_backward(out)
        F.cross_entropy(out, y).backward()
        mc.step()
        for name in positions:
            g = mc.engine.stats[(f"{name}", Factor.G)]
            sums[name] = sums.get(name, 0 * g) + g / rounds
    for name, (a_cl, g_cl) in _curvlinops_factors(model, x, y, "type-2").items():
        p = positions[name]
        torch.testing.assert_close(mc.engine.stats[(f"{name}", Factor.A)], a_cl * p)
        exact = g_cl / p
        rel = float(torch.linalg.norm(sums[name] - exact) / torch.linalg.norm(exact))
        assert rel < 0.06, (name, rel)


def test_same_shaped_blocks_are_preconditioned_together_and_correctly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 6),
        nn.Tanh(),
        nn.Linear(6, 6),
        nn.Tanh(),
        nn.Linear(6, 6),
        nn.Tanh(),
        nn.Linear(6, 2),
    ).double()
    opt = SPNGD(model, lr=0.1, staleness=False)
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 2, (20,))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    grads = {p: torch.randn_like(p) for p in model.parameters()}
    got = opt.engine.precondition(grads)
    for name in ("0", "2", "4", "6"):
        layer = model[int(name)]
        mat = torch.cat([grads[layer.weight], grads[layer.bias][:, None]], dim=1)
        inv = opt.engine.inverses[name]
        want = inv["G"] @ mat @ inv["A"]
        torch.testing.assert_close(got[layer.weight], want[:, :-1])
        torch.testing.assert_close(got[layer.bias], want[:, -1])
    batches = sorted(names for names, _ in opt.engine._stack_cache.values())
    assert batches == [("0", "2", "4"), ("6",)]  # the three 6x6 layers share one batch


def test_stacked_inverses_follow_partial_reinversion() -> None:
    """Only some blocks of a same-shape batch are re-inverted (a damping change in their
    param group); the cached stacks must serve their new inverses and keep the others."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Linear(6, 2)
    ).double()
    groups = [
        {"params": list(model[0].parameters()) + list(model[5].parameters())},
        {"params": list(model[2].parameters()) + list(model[4].parameters())},
    ]
    stale = StalenessConfig(threshold=10.0, initial_interval=8, max_interval=8)
    opt = SPNGD(model, lr=0.01, damping=1e-2, staleness=stale, params=groups)
    x, y = torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 2, (20,))
    for step in range(4):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.param_groups[0]["damping"] = 1e-2 * (step + 1)
        opt.step()
        if step:
            assert sorted(opt.last_report.inverted) == ["0", "5"]
        grads = {p: torch.randn_like(p) for p in model.parameters()}
        got = opt.engine.precondition(grads)
        for name in ("0", "2", "4", "5"):
            layer = model[int(name)]
            mat = torch.cat([grads[layer.weight], grads[layer.bias][:, None]], dim=1)
            inv = opt.engine.inverses[name]
            want = inv["G"] @ mat @ inv["A"]
            torch.testing.assert_close(got[layer.weight], want[:, :-1], rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(got[layer.bias], want[:, -1], rtol=1e-12, atol=1e-14)


def test_embedding_and_layernorm_blocks_train_a_sequence_model() -> None:
    torch.manual_seed(0)

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(12, 6, padding_idx=0)
            self.norm = nn.LayerNorm(6)
            self.out = nn.Linear(6, 3)

        def forward(self, idx: Tensor) -> Tensor:
            return self.out(self.norm(self.emb(idx)))

    model = Tagger().double()
    opt = SPNGD(model, lr=0.2, damping=1e-2)
    assert {b.kind for b in opt.engine.blocks.values()} == {
        BlockKind.EMBEDDING,
        BlockKind.NORM,
        BlockKind.LINEAR,
    }
    idx = torch.randint(0, 12, (32, 5))
    tags = (idx % 3).reshape(-1)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.cross_entropy(model(idx).reshape(-1, 3), tags)
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
    assert losses[-1] < 0.5 * losses[0]
    # the embedding block: diag(A + da)^-1 grad (G + dg)^-1 with A the index frequencies
    a, g = opt.engine.stats[("emb", Factor.A)], opt.engine.stats[("emb", Factor.G)]
    counts = torch.bincount(idx.reshape(-1), minlength=12).double() / idx.numel()
    counts[0] = 0.0  # padding_idx gets no count (A: index frequencies over all positions)
    torch.testing.assert_close(a, counts)
    lam = 1e-2
    pi = float(torch.sqrt(a.mean() / torch.diagonal(g).mean()))
    da, dg = pi * lam**0.5, lam**0.5 / pi
    grad = torch.randn(12, 6, dtype=torch.float64)
    got = opt.engine.precondition({model.emb.weight: grad})[model.emb.weight]
    want = torch.linalg.solve(g + dg * torch.eye(6, dtype=torch.float64), grad.T).T
    want = want / (a + da)[:, None]
    torch.testing.assert_close(got, want)


def test_foreign_or_damaged_curvature_state_is_refused_and_nothing_changes() -> None:
    """A state from a model with other layer sizes, or with a NaN statistic, is refused
    with a message naming the statistic; the optimizer's own state is untouched and it
    keeps training."""
    torch.manual_seed(0)

    def make(hidden: int) -> tuple[nn.Module, SPNGD]:
        model = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3))
        return model, SPNGD(model, lr=0.1, staleness=False)

    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    def train(model: nn.Module, opt: SPNGD) -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    other, other_opt = make(6)
    train(other, other_opt)
    model, opt = make(5)
    train(model, opt)
    before = {k: v.clone() for k, v in opt.engine.stats.items()}
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    with pytest.raises(
        ValueError, match=r"'G' of '0' has shape \(6, 6\), this model's is \(5, 5\)"
    ):
        opt.load_state_dict(other_opt.state_dict())
    damaged = opt.state_dict()
    damaged["curvature"]["stats"]["0"]["G"] = torch.full((5, 5), float("nan"))
    with pytest.raises(ValueError, match="statistic 'G' of '0' is not finite"):
        opt.load_state_dict(damaged)
    for k, v in before.items():
        assert torch.equal(opt.engine.stats[k], v)
    for p, m in zip(model.parameters(), momentum, strict=True):
        assert torch.equal(opt.state[p]["momentum_buffer"], m)
    train(model, opt)  # still usable
    assert opt.engine.step == 2


def test_mc_fisher_for_mse_matches_the_ggn_of_mean_squared_error() -> None:
    """``mc_backward(outputs, "mse")`` estimates the GGN of ``F.mse_loss`` (the mean over all
    N D entries), which curvlinops' type-2 K-FAC computes exactly; float64 stays float64."""
    import curvlinops

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, t = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    kfac = curvlinops.KFACLinearOperator(
        model, nn.MSELoss(), list(model.parameters()), [(x, t)], fisher_type="type-2",
        separate_weight_and_bias=False, num_data=10, check_deterministic=False,
    )  # fmt: skip
    kfac.compute_kronecker_factors()
    exact = kfac.state_dict()["gradient_covariances"]["2"]
    opt = SPNGD(model, lr=0.0, momentum=0.0, fisher="mc", staleness=False)
    total = torch.zeros_like(exact)
    rounds = 400
    for _ in range(rounds):
        opt.zero_grad()
        out = model(x)
        opt.mc_backward(out, "mse")
        F.mse_loss(out, t).backward()
        opt.step()
        g = opt.engine.stats[("2", Factor.G)]
        assert g.dtype == torch.float64
        total += g / rounds
    rel = float(torch.linalg.norm(total - exact) / torch.linalg.norm(exact))
    assert rel < 0.08, rel


def test_a_frozen_bias_is_neither_preconditioned_nor_called_a_fallback() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    model[0].bias.requires_grad_(False)
    opt = SPNGD(model, lr=0.1)
    assert opt.fallback_parameters == []
    block = opt.engine.blocks["0"]
    assert block.params == (model[0].weight,)  # the K-FAC block has no bias column
    bias = model[0].bias.detach().clone()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert torch.equal(model[0].bias, bias)


def test_param_groups_hold_no_private_entries_and_an_lr_change_survives_a_resume() -> None:
    """The lr of each group's last update (momentum is rescaled when the lr changes) is
    optimizer state, not a param-group entry; a resume right before an lr change continues
    exactly like the uninterrupted run."""
    import copy

    def data(step: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(step)
        return torch.randn(16, 5, generator=gen, dtype=torch.float64), torch.randint(
            0, 3, (16,), generator=gen
        )

    def train(model: nn.Module, opt: SPNGD, steps: range) -> None:
        for step in steps:
            x, y = data(step)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    opt = SPNGD(model, lr=0.1, momentum=0.9, damping=1e-2)
    train(model, opt, range(3))
    saved = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in model.parameters()]
    assert all(not k.startswith("_") for g in saved["param_groups"] for k in g)
    for group in opt.param_groups:
        group["lr"] = 0.03
    train(model, opt, range(3, 5))

    other = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        for p, q in zip(other.parameters(), weights, strict=True):
            p.copy_(q)
    resumed = SPNGD(other, lr=0.1, momentum=0.9, damping=1e-2)
    resumed.load_state_dict(saved)
    for group in resumed.param_groups:
        group["lr"] = 0.03
    train(other, resumed, range(3, 5))
    for p, q in zip(other.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)
