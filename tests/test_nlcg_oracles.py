"""NLCG against independent oracles: scipy's linear CG and scipy's nonlinear CG."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
import scipy.optimize
import scipy.sparse.linalg
import torch
from sklearn.datasets import load_digits
from torch import Tensor

from bigbatch import NLCG, LineSearchResult, Preconditioner
from bigbatch.optim.line_search import Phi

N = 40
ITERS = 12


def random_spd(n: int, seed: int, cond: float = 50.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = np.geomspace(1.0, cond, n)
    a = (q * eig) @ q.T
    # a non-constant diagonal so that Jacobi preconditioning changes the iterates
    scale = np.diag(rng.uniform(0.5, 3.0, n))
    return scale @ a @ scale


class ExactQuadraticSearch:
    """The exact minimiser along d of 0.5 x'Ax - b'x: t = -g.d / d'Ad (test oracle)."""

    def __init__(self, a: Tensor) -> None:
        self.a = a

    def __call__(
        self, phi: Phi, loss: float, grad: Tensor, direction: Tensor, gtd: float, t0: float
    ) -> LineSearchResult:
        t = -gtd / float(direction @ self.a @ direction)
        f, g = phi(t)
        return LineSearchResult(t, f, g, 1)


class FixedDiagonal(Preconditioner):
    """A user-defined preconditioner through the public interface: P = diag(p)."""

    name = "fixed"

    def __init__(self, p: Tensor) -> None:
        self.p = p

    def apply(self, bufs: Mapping[str, Tensor], r: Tensor, out: Tensor) -> Tensor:
        return torch.mul(r, self.p, out=out)


def scipy_cg_iterates(
    a: np.ndarray, b: np.ndarray, x0: np.ndarray, m: np.ndarray | None
) -> list[np.ndarray]:
    iterates: list[np.ndarray] = []
    scipy.sparse.linalg.cg(
        a,
        b,
        x0=x0,
        rtol=1e-30,
        atol=0.0,
        maxiter=ITERS,
        M=m,
        callback=lambda xk: iterates.append(xk.copy()),
    )
    assert len(iterates) == ITERS
    return iterates


def nlcg_iterates(
    a: np.ndarray, b: np.ndarray, x0: np.ndarray, **kwargs: object
) -> list[np.ndarray]:
    at, bt = torch.from_numpy(a), torch.from_numpy(b)
    x = torch.nn.Parameter(torch.from_numpy(x0.copy()))
    kwargs.setdefault("line_search", ExactQuadraticSearch(at))
    opt = NLCG([x], lr=1.0, beta_clip=None, eps=0.0, restart_on_ascent=False, **kwargs)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = 0.5 * x @ at @ x - bt @ x
        loss.backward()
        return loss

    out = []
    for _ in range(ITERS):
        opt.step(closure)
        out.append(x.detach().numpy().copy())
    return out


@pytest.mark.parametrize("rule", ["fr", "pr", "hs", "dy", "pr+", "hs-dy"])
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_line_search_reproduces_linear_cg(rule: str, seed: int) -> None:
    a = random_spd(N, seed)
    rng = np.random.default_rng(100 + seed)
    b, x0 = rng.standard_normal(N), rng.standard_normal(N)
    ref = scipy_cg_iterates(a, b, x0, None)
    got = nlcg_iterates(a, b, x0, beta_rule=rule, preconditioner="none")
    scale = np.linalg.norm(np.linalg.solve(a, b))
    for k, (x_ref, x_got) in enumerate(zip(ref, got, strict=True)):
        err = np.linalg.norm(x_ref - x_got) / scale
        assert err < 1e-10, f"iterate {k}: relative error {err:.2e}"
    # the iterates moved a long way: the comparison is not trivially small
    assert np.linalg.norm(ref[-1] - x0) > 0.1 * scale


@pytest.mark.parametrize("rule", ["fr", "pr", "hs"])
def test_jacobi_preconditioned_nlcg_reproduces_pcg(rule: str) -> None:
    a = random_spd(N, 3)
    rng = np.random.default_rng(7)
    b, x0 = rng.standard_normal(N), rng.standard_normal(N)
    inv_diag = 1.0 / np.diag(a)
    ref = scipy_cg_iterates(a, b, x0, np.diag(inv_diag))
    plain = scipy_cg_iterates(a, b, x0, None)
    got = nlcg_iterates(
        a, b, x0, beta_rule=rule, preconditioner=FixedDiagonal(torch.from_numpy(inv_diag))
    )
    scale = np.linalg.norm(np.linalg.solve(a, b))
    for k, (x_ref, x_got) in enumerate(zip(ref, got, strict=True)):
        err = np.linalg.norm(x_ref - x_got) / scale
        assert err < 1e-10, f"iterate {k}: relative error {err:.2e}"
    # preconditioning changed the path (the test distinguishes P from the identity)
    assert np.linalg.norm(plain[3] - ref[3]) / scale > 1e-3


def test_strong_wolfe_with_tight_curvature_condition_tracks_linear_cg() -> None:
    from bigbatch import StrongWolfe

    a = random_spd(N, 5, cond=20.0)
    rng = np.random.default_rng(5)
    b, x0 = rng.standard_normal(N), rng.standard_normal(N)
    ref = scipy_cg_iterates(a, b, x0, None)
    got = nlcg_iterates(
        a,
        b,
        x0,
        beta_rule="pr",
        preconditioner="none",
        line_search=StrongWolfe(c1=1e-12, c2=1e-9, max_evals=50),
    )
    scale = np.linalg.norm(np.linalg.solve(a, b))
    for k in range(6):
        assert np.linalg.norm(ref[k] - got[k]) / scale < 1e-6, f"iterate {k}"


# --------------------------------------------------------------------------- softmax


def _digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return data.data / 16.0, data.target


def _numpy_objective(theta: np.ndarray, x: np.ndarray, y: np.ndarray, lam: float):
    d, k = x.shape[1], 10
    w, bias = theta[: d * k].reshape(d, k), theta[d * k :]
    logits = x @ w + bias
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    n = x.shape[0]
    f = -logp[np.arange(n), y].mean() + 0.5 * lam * (theta**2).sum()
    p = np.exp(logp)
    p[np.arange(n), y] -= 1.0
    gw = x.T @ p / n + lam * w
    gb = p.mean(axis=0) + lam * bias
    return f, np.concatenate([gw.ravel(), gb])


@pytest.mark.parametrize(("rule", "preconditioner"), [("pr", "none"), ("fr", "bfgs")])
def test_line_search_mode_reaches_scipy_cg_optimum_on_softmax_regression(
    rule: str, preconditioner: str
) -> None:
    x, y = _digits()
    lam = 1e-2
    d = x.shape[1]
    theta0 = np.zeros(d * 10 + 10)
    ref = scipy.optimize.minimize(
        _numpy_objective,
        theta0,
        args=(x, y, lam),
        jac=True,
        method="CG",
        options={"gtol": 1e-8, "maxiter": 5000},
    )
    assert np.abs(ref.jac).max() < 1e-6, ref.message  # scipy converged

    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    w = torch.nn.Parameter(torch.zeros(d, 10, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.zeros(10, dtype=torch.float64))
    opt = NLCG(
        [{"params": [w]}, {"params": [bias], "weight_decay": lam}],
        weight_decay=lam,
        lr=1.0,
        beta_rule=rule,
        preconditioner=preconditioner,
        line_search="strong_wolfe",
        max_iter=50,
        tolerance_grad=1e-9,
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + bias, yt)
        loss.backward()
        return loss

    for _ in range(40):
        opt.step(closure)
    theta = np.concatenate([w.detach().numpy().ravel(), bias.detach().numpy()])
    f, grad = _numpy_objective(theta, x, y, lam)
    assert f == pytest.approx(ref.fun, rel=1e-9)
    assert np.abs(grad).max() < 1e-6
    np.testing.assert_allclose(theta, ref.x, atol=1e-4)
