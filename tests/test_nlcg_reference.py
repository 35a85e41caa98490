"""The reference algorithm's arithmetic (docs/nlcg.md), checked by hand and by a plain
numpy transcription of the reference steps on a small stochastic problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bigbatch import NLCG, DiagonalBFGS, SecantPair
from bigbatch.optim.step_control import StepControl, shrink_band

EPS = 1e-8


def test_bfgs_diagonal_update_by_hand() -> None:
    pre = DiagonalBFGS(eps=0.0)
    h = torch.ones(2, dtype=torch.float64)
    s = torch.tensor([1.0, 2.0], dtype=torch.float64)
    y = torch.tensor([2.0, 1.0], dtype=torch.float64)
    # y.s = 4, s.(h s) = 5: h = |1 - s^2/5 + y^2/4| = [1 - 1/5 + 1, 1 - 4/5 + 1/4]
    pre.update(
        {"h": h},
        y,
        SecantPair(direction=s, scale=1.0, y=y),
        step=1,
        scratch=torch.empty(2, dtype=torch.float64),
    )
    torch.testing.assert_close(h, torch.tensor([1.8, 0.45], dtype=torch.float64))
    r = torch.tensor([1.8, 0.9], dtype=torch.float64)
    out = torch.empty(2, dtype=torch.float64)
    torch.testing.assert_close(pre.apply({"h": h}, r, out), torch.tensor([1.0, 2.0]).double())


def test_bfgs_update_takes_absolute_value() -> None:
    pre = DiagonalBFGS(eps=0.0)
    h = torch.tensor([1.0, 1.0], dtype=torch.float64)
    s = torch.tensor([1.0, 0.1], dtype=torch.float64)
    y = torch.tensor([0.01, 10.0], dtype=torch.float64)
    # ys = 1.01, sHs = 1.01: h0 = 1 - 1/1.01 + 1e-4/1.01 > 0; h1 = 1 - 0.01/1.01 + 100/1.01
    pre.update(
        {"h": h},
        y,
        SecantPair(direction=s, scale=1.0, y=y),
        step=1,
        scratch=torch.empty(2, dtype=torch.float64),
    )
    expected = np.abs(np.array([1 - 1 / 1.01 + 1e-4 / 1.01, 1 - 0.01 / 1.01 + 100 / 1.01]))
    np.testing.assert_allclose(h.numpy(), expected, rtol=1e-12)
    h2 = torch.ones(1, dtype=torch.float64)
    s2, y2 = torch.tensor([1.0]).double(), torch.tensor([0.5]).double()
    # ys = 0.5, sHs = 1: 1 - 1 + 0.25/0.5 = 0.5; with h = 3: 3 - 9/3 + 0.5 = 0.5
    pre.update(
        {"h": h2},
        y2,
        SecantPair(direction=s2, scale=1.0, y=y2),
        step=1,
        scratch=torch.empty(1, dtype=torch.float64),
    )
    assert float(h2) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("s", "y"),
    [([1.0, 1.0], [-1.0, 0.5]), ([0.0, 0.0], [1.0, 1.0]), ([1e-5, 0.0], [1e-5, 0.0])],
    ids=["negative-curvature", "zero-step", "tiny-ys"],
)
def test_bfgs_guard_keeps_h(s: list[float], y: list[float]) -> None:
    pre = DiagonalBFGS(eps=EPS)
    h = torch.tensor([2.0, 3.0], dtype=torch.float64)
    pre.update(
        {"h": h},
        torch.zeros(2),
        SecantPair(torch.tensor(s).double(), 1.0, torch.tensor(y).double()),
        step=3,
        scratch=torch.empty(2, dtype=torch.float64),
    )
    assert pre.last_update_skipped
    assert h.tolist() == [2.0, 3.0]


@pytest.mark.parametrize(
    ("ratio", "expected"),
    [
        (1.2, (0.5, 0.9)),
        (1.14, (0.7, 0.7)),
        (1.11, (0.8, 0.5)),
        (1.08, (0.9, 0.3)),
        (1.06, (0.95, 0.2)),
        (1.03, (0.975, 0.1)),
        (1.015, (1.0, 0.1)),
        (1.005, (1.0, 0.0)),
    ],
)
def test_step_control_bands(ratio: float, expected: tuple[float, float]) -> None:
    assert shrink_band(ratio) == expected


def test_step_control_step_mode_compares_every_period() -> None:
    ctl = StepControl(mode="step", period=5)
    # step 0 sets both EMAs to the loss; steps 1-4 only move the EMA
    assert ctl.decide(1.0, 0).base_lr == 1.0
    for k in range(1, 5):
        assert ctl.decide(2.0, k).undo == 0.0
    ema = 1.0
    for _ in range(5):
        ema = 0.7 * ema + 0.3 * 2.0
    decision = ctl.decide(2.0, 5)  # ratio = ema / 1.0 = 1.83 > 1.15: gamma 0.5, undo 0.9
    assert ctl.loss_ema == pytest.approx(ema)
    assert (decision.base_lr, decision.undo) == (0.5, 0.9)
    assert ctl.loss_ema_old == pytest.approx(ema)
    # falling loss: recover by x1.05 at the next comparison, capped at 1
    for k in range(6, 11):
        decision = ctl.decide(0.1, k)
    assert decision.base_lr == pytest.approx(0.525)
    ctl.base_lr = 0.99
    ctl.loss_ema_old = 10.0
    for k in range(11, 16):
        decision = ctl.decide(0.1, k)
    assert decision.base_lr == 1.0


def test_step_control_online_mode_and_floor() -> None:
    ctl = StepControl(mode="online")
    ctl.decide(1.0, 0)
    decision = ctl.decide(100.0, 1)  # ema = 30.7, ratio = 100/30.7 > 1.15
    assert (decision.base_lr, decision.undo) == (0.5, 0.9)
    ctl.base_lr = 1.5e-4
    assert ctl.decide(1e6, 2).base_lr == 1e-4  # floor
    ctl.base_lr = 0.5
    decision = ctl.decide(1e-3, 3)  # loss far below the EMA: recover x1.02
    assert decision.base_lr == pytest.approx(0.51)


# --------------------------------------------------------------------------- reference


def reference_nlcg(w0, lr, grad_and_loss, steps, rule, precond, control):
    """Plain transcription of docs/nlcg.md, steps 1-4, in numpy float64."""
    w = w0.copy()
    h = np.ones_like(w)
    g_old = np.zeros_like(w)
    z_old = np.zeros_like(w)
    d = np.zeros_like(w)
    rho_old, base_lr, ema, ema_old = 0.0, 1.0, 0.0, 0.0
    history = []
    for k in range(steps):
        g, loss = grad_and_loss(w, k)
        if precond == "bfgs" and k > 0:
            y = g - g_old
            s = lr * base_lr * d
            ys, shs = y @ s, s @ (h * s)
            if not (ys < EPS or shs < EPS):
                h = np.abs(h - (h * h * s * s + EPS) / (shs + EPS) + (y * y + EPS) / (ys + EPS))
            p = 1.0 / (h + EPS)
        else:
            h, p = (np.ones_like(w), 1.0) if precond == "bfgs" else (h, 1.0)
        g_old = g
        r = -g
        z = p * r
        rho = r @ z
        if k == 0:
            d_new = z
        else:
            num = rho if rule == "fr" else rho - r @ z_old
            beta = min(max(num / (rho_old + EPS), 0.0), 1.0)
            d_new = z + beta * d
        rho_old, z_old = rho, z
        base_new, undo = base_lr, 0.0
        if control == "step":
            ema = loss if k == 0 else 0.7 * ema + 0.3 * loss
            if k == 0:
                ema_old = ema
            elif k % 5 == 0:
                ratio = ema / ema_old
                if ratio < 1.01:
                    base_new = min(1.0, 1.05 * base_lr)
                else:
                    gamma, undo = shrink_band(ratio)
                    base_new = max(gamma * base_lr, 1e-4)
                ema_old = ema
        step = (1 - undo) * lr * base_new * d_new - undo * lr * base_lr * d
        base_lr, d = base_new, d_new
        w = w + step
        history.append((w.copy(), base_lr, undo))
    return history


def make_problem(n: int, seed: int):
    rng = np.random.default_rng(seed)
    diag = np.geomspace(0.1, 10.0, n)
    centers = rng.standard_normal((60, n)) * 2.0

    def grad_and_loss(w: np.ndarray, k: int):
        c = centers[k]
        return diag * (w - c), 0.5 * float((diag * (w - c) ** 2).sum()) + 1.0

    return rng.standard_normal(n), grad_and_loss


@pytest.mark.parametrize("rule", ["fr", "pr"])
@pytest.mark.parametrize("precond", ["bfgs", "none"])
def test_matches_numpy_transcription_of_reference(rule: str, precond: str) -> None:
    n, lr, steps = 12, 0.15, 60
    w0, grad_and_loss = make_problem(n, seed=3)
    ref = reference_nlcg(w0, lr, grad_and_loss, steps, rule, precond, "step")
    # the run exercised the step control's shrink and undo branches, and recovery
    assert any(undo > 0 for _, _, undo in ref)
    assert min(b for _, b, _ in ref) < 1.0

    w = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = NLCG([w], lr=lr, beta_rule=rule, preconditioner=precond, restart_on_ascent=False)
    diag = torch.from_numpy(np.geomspace(0.1, 10.0, n))
    centers = torch.from_numpy(np.random.default_rng(3).standard_normal((60, n)) * 2.0)
    for k in range(steps):
        opt.zero_grad()
        loss = 0.5 * (diag * (w - centers[k]) ** 2).sum() + 1.0
        loss.backward()
        opt.step(loss=loss)
        w_ref, base_ref, _ = ref[k]
        np.testing.assert_allclose(
            w.detach().numpy(), w_ref, rtol=1e-9, atol=1e-11, err_msg=f"step {k}"
        )
        assert opt.control.base_lr == pytest.approx(base_ref, rel=1e-12)


def test_beta_is_clipped_to_unit_interval() -> None:
    # A gradient whose preconditioned norm grows (FR beta > 1) and one that reverses
    # (PR beta < 0): the reference clips both into [0, 1].
    w = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    grads = [torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0]), torch.tensor([1.0, 0.0])]
    for rule, expected in (("fr", [1.0, 1.0 / 9.0]), ("pr", [1.0, 0.0])):
        opt = NLCG(
            [w],
            lr=0.1,
            beta_rule=rule,
            preconditioner="none",
            step_control="off",
            restart_on_ascent=False,
            eps=0.0,
        )
        betas = []
        for g in grads:
            w.grad = g.double()
            opt.step()
            betas.append(opt.state[w]["nlcg_global"]["beta"])
        assert betas[1:] == pytest.approx(expected)
        unclipped = NLCG(
            [w],
            lr=0.1,
            beta_rule=rule,
            preconditioner="none",
            step_control="off",
            restart_on_ascent=False,
            eps=0.0,
            beta_clip=None,
        )
        raw = []
        for g in grads:
            w.grad = g.double()
            unclipped.step()
            raw.append(unclipped.state[w]["nlcg_global"]["beta"])
        # FR: 9/1, then 1/9; PR: (9 - 3)/1 = 6, then (1 - 3)/9
        assert raw[1:] == pytest.approx([9.0, 1.0 / 9.0] if rule == "fr" else [6.0, -2.0 / 9.0])
