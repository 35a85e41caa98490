"""Tests of :mod:`bigbatch.train.targets`: hand-checked values and torch's cross-entropy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bigbatch.train.targets import Mixup, one_hot_smooth, soft_cross_entropy


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_one_hot_smooth_hand_values() -> None:
    t = one_hot_smooth(torch.tensor([2, 0]), 4, 0.2)
    expected = torch.tensor([[0.05, 0.05, 0.85, 0.05], [0.85, 0.05, 0.05, 0.05]])
    torch.testing.assert_close(t, expected)
    torch.testing.assert_close(t.sum(1), torch.ones(2))


def test_one_hot_smooth_zero_is_one_hot() -> None:
    y = torch.tensor([1, 3, 0, 3])
    assert torch.equal(one_hot_smooth(y, 5), F.one_hot(y, 5).float())


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((torch.tensor([0, 5]), 5, 0.0), "class indices"),
        ((torch.tensor([-1]), 5, 0.0), "class indices"),
        ((torch.tensor([0.0]), 5, 0.0), "integer"),
        ((torch.tensor([[0]]), 5, 0.0), "1-D"),
        ((torch.tensor([0]), 5, 1.5), "smoothing"),
        ((torch.tensor([0]), 0, 0.0), "num_classes"),
    ],
)
def test_one_hot_smooth_rejects(args: tuple[torch.Tensor, int, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        one_hot_smooth(*args)


def test_soft_cross_entropy_matches_torch() -> None:
    g = gen(0)
    logits = torch.randn(16, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (16,), generator=g)
    one_hot = one_hot_smooth(y, 7).double()
    torch.testing.assert_close(soft_cross_entropy(logits, one_hot), F.cross_entropy(logits, y))
    smooth = one_hot_smooth(y, 7, 0.1).double()
    torch.testing.assert_close(
        soft_cross_entropy(logits, smooth), F.cross_entropy(logits, y, label_smoothing=0.1)
    )
    # Arbitrary probability targets: torch's cross_entropy accepts them as well.
    probs = torch.softmax(torch.randn(16, 7, generator=g, dtype=torch.float64), 1)
    torch.testing.assert_close(soft_cross_entropy(logits, probs), F.cross_entropy(logits, probs))


def test_soft_cross_entropy_hand_value() -> None:
    # logits (0, log 3): softmax (1/4, 3/4); target (1/2, 1/2): -(ln 1/4 + ln 3/4) / 2.
    logits = torch.tensor([[0.0, float(np.log(3.0))]], dtype=torch.float64)
    target = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    expected = -(np.log(0.25) + np.log(0.75)) / 2
    assert soft_cross_entropy(logits, target).item() == pytest.approx(expected)


def test_soft_cross_entropy_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="N x classes"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 4))


def identity_batch(n: int, offset: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample i is the basis vector e_(offset + i) both as input and as target."""
    x = torch.zeros(n, dim, dtype=torch.float64)
    x[torch.arange(n), offset + torch.arange(n)] = 1.0
    return x, x.clone()


def test_plain_mixup_is_convex_combination_with_partner() -> None:
    n = 12
    x, y = identity_batch(n, 0, n)
    mix = Mixup(0.4)
    xm, ym = mix(x, y, gen(3))
    assert torch.equal(xm, ym)  # inputs and targets mixed identically
    lam = mix.last_lambda
    assert lam is not None
    assert lam.shape == (1,)
    lam_v = float(lam)
    assert 0.0 <= lam_v <= 1.0
    torch.testing.assert_close(xm.sum(1), torch.ones(n, dtype=torch.float64))
    partners = []
    for i in range(n):
        row = xm[i].clone()
        row[i] -= lam_v
        # what remains is (1 - lam) on exactly one partner (possibly i itself)
        j = int(torch.argmax(row))
        assert row[j].item() == pytest.approx(1.0 - lam_v)
        row[j] = 0.0
        assert torch.allclose(row, torch.zeros(n, dtype=torch.float64))
        partners.append(j)
    assert sorted(partners) == list(range(n))  # a permutation
    # The documented draws: the lambda seed, then the permutation.
    g = gen(3)
    seed = int(torch.randint(0, 2**62, (1,), generator=g))
    assert lam_v == np.random.default_rng(seed).beta(0.4, 0.4)
    assert partners == torch.randperm(n, generator=g).tolist()


def test_running_mixup_chain_by_hand() -> None:
    n = 4
    mix = Mixup(1.0, running=True)
    x1, y1 = identity_batch(n, 0, 3 * n)
    out1, t1 = mix(x1, y1, gen(0))
    assert torch.equal(out1, x1)  # first batch passes unchanged
    assert torch.equal(t1, y1)
    g = gen(1)
    x2, y2 = identity_batch(n, n, 3 * n)
    out2, t2 = mix(x2, y2, g)
    lam2 = float(mix.last_lambda)  # type: ignore[arg-type]
    assert lam2 >= 0.5
    torch.testing.assert_close(out2, lam2 * x2 + (1 - lam2) * x1)
    torch.testing.assert_close(t2, out2)
    x3, y3 = identity_batch(n, 2 * n, 3 * n)
    out3, _ = mix(x3, y3, g)
    lam3 = float(mix.last_lambda)  # type: ignore[arg-type]
    assert lam3 >= 0.5
    # Sample i of batch 3 holds lam3 of itself, (1-lam3) lam2 of batch 2, (1-lam3)(1-lam2) of 1.
    for i in range(n):
        assert out3[i, 2 * n + i].item() == pytest.approx(lam3)
        assert out3[i, n + i].item() == pytest.approx((1 - lam3) * lam2)
        assert out3[i, i].item() == pytest.approx((1 - lam3) * (1 - lam2))
    # lambda = max(l, 1 - l) of the documented Beta draw.
    g = gen(1)
    seed = int(torch.randint(0, 2**62, (1,), generator=g))
    raw = np.random.default_rng(seed).beta(1.0, 1.0)
    assert lam2 == max(raw, 1 - raw)


def test_running_mixup_lambda_at_least_half_and_beta_moments() -> None:
    mix = Mixup(0.2, running=True, per_sample=True)
    g = gen(5)
    lam = torch.cat([mix.sample_lambda(2000, g) for _ in range(5)])
    # Beta(0.2, 0.2): mean 1/2, variance 1 / (4 (2 alpha + 1)) = 1/5.6.
    assert lam.mean().item() == pytest.approx(0.5, abs=0.02)
    assert lam.var().item() == pytest.approx(1 / 5.6, rel=0.05)
    x = torch.randn(50, 3, generator=g)
    y = torch.softmax(torch.randn(50, 4, generator=g), 1)
    mix(x, y, g)
    for _ in range(3):
        _, ym = mix(x, y, g)
        assert mix.last_lambda is not None
        assert mix.last_lambda.shape == (50,)
        assert bool((mix.last_lambda >= 0.5).all())
        torch.testing.assert_close(ym.sum(1), torch.ones(50))


def test_running_mixup_partial_batches() -> None:
    mix = Mixup(1.0, running=True)
    x1, y1 = identity_batch(4, 0, 10)
    mix(x1, y1, gen(0))
    x2, y2 = identity_batch(2, 4, 10)  # smaller: pairs with stored samples 0, 1
    g = gen(1)
    out2, _ = mix(x2, y2, g)
    lam2 = float(mix.last_lambda)  # type: ignore[arg-type]
    torch.testing.assert_close(out2, lam2 * x2 + (1 - lam2) * x1[:2])
    assert mix.prev_x is not None
    assert mix.prev_x.shape == (4, 10)  # state keeps 4: new 2, then stored 2, 3
    torch.testing.assert_close(mix.prev_x, torch.cat([out2, x1[2:]]))
    x3, y3 = identity_batch(6, 4, 10)  # larger: pairs with stored i mod 4
    out3, _ = mix(x3, y3, g)
    lam3 = float(mix.last_lambda)  # type: ignore[arg-type]
    stored = torch.cat([out2, x1[2:]])
    torch.testing.assert_close(out3, lam3 * x3 + (1 - lam3) * stored[[0, 1, 2, 3, 0, 1]])
    assert mix.prev_x.shape == (6, 10)


def test_state_round_trip_reproduces_next_batch() -> None:
    g = gen(2)
    a = Mixup(0.5, running=True)
    x = torch.randn(8, 1, 4, 4, generator=g)
    y = one_hot_smooth(torch.randint(0, 3, (8,), generator=g), 3)
    a(x, y, g)
    a(x.flip(0), y.flip(0), g)
    state = a.state_dict()
    gstate = g.get_state()
    expected = a(x, y, g)
    b = Mixup(0.5, running=True)
    b.load_state_dict(state)
    g2 = torch.Generator()
    g2.set_state(gstate)
    got = b(x, y, g2)
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])
    with pytest.raises(ValueError, match="alpha"):
        Mixup(0.3, running=True).load_state_dict(state)


def test_mixup_is_reproducible_and_validates() -> None:
    x = torch.randn(10, 5, generator=gen(0))
    y = one_hot_smooth(torch.arange(10) % 3, 3)
    a = Mixup(1.0)(x, y, gen(4))
    b = Mixup(1.0)(x, y, gen(4))
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="alpha"):
        Mixup(0.0)
    with pytest.raises(ValueError, match="y_soft"):
        Mixup(1.0)(x, torch.arange(10), gen(0))
    mix = Mixup(1.0, running=True)
    mix(x, y, gen(0))
    with pytest.raises(ValueError, match="per-sample shapes"):
        mix(torch.randn(10, 6), y, gen(0))
