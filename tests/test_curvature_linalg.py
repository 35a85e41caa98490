"""Damped inversion of K-FAC / unit-wise factors against float64 numpy/scipy oracles."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import Tensor

from bigbatch.curvature import linalg
from bigbatch.curvature.linalg import (
    DampedInverter,
    InversionConfig,
    InversionError,
    damped_inverse_batch,
    kron_damping,
    pi_correction,
)

METHODS = ["eigh", "cholesky"]


def random_spd(n: int, rng: np.random.Generator, cond: float = 100.0) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eig = np.geomspace(1.0 / cond, 1.0, n) * rng.uniform(0.5, 2.0)
    out: np.ndarray = (q * eig) @ q.T
    return out


def spd_batch(b: int, n: int, seed: int, cond: float = 100.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([random_spd(n, rng, cond) for _ in range(b)])


def oracle_inv(m: np.ndarray, lam: float | np.ndarray) -> np.ndarray:
    lam_arr = np.broadcast_to(np.asarray(lam, dtype=np.float64), (m.shape[0],))
    eye = np.eye(m.shape[-1])
    return np.stack([np.linalg.inv(mi + li * eye) for mi, li in zip(m, lam_arr, strict=True)])


def rel_err(x: Tensor | np.ndarray, ref: np.ndarray) -> float:
    xa = x.detach().double().numpy() if isinstance(x, Tensor) else x
    return float(np.linalg.norm(xa - ref) / np.linalg.norm(ref))


# --------------------------------------------------------------------------------------
# damped_inverse_batch


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("b", "n"), [(1, 1), (3, 2), (5, 7), (4, 16), (2, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_matches_numpy_inverse(method: str, b: int, n: int, dtype: torch.dtype) -> None:
    m = spd_batch(b, n, seed=10 * b + n)
    lam = 1e-2
    inv, ok = damped_inverse_batch(torch.from_numpy(m).to(dtype), lam, method)
    assert inv.shape == (b, n, n)
    assert inv.dtype == dtype
    assert ok.dtype == torch.bool
    assert ok.all()
    ref = oracle_inv(m, lam)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert rel_err(inv, ref) < tol
    # scipy solve on a random right-hand side, per matrix
    rng = np.random.default_rng(1)
    rhs = rng.standard_normal((n, 3))
    for i in range(b):
        x = scipy.linalg.solve(m[i] + lam * np.eye(n), rhs, assume_a="pos")
        assert rel_err(inv[i].double() @ torch.from_numpy(rhs), x) < tol


@pytest.mark.parametrize("method", METHODS)
def test_batch_per_matrix_damping_and_symmetrization(method: str) -> None:
    m = spd_batch(4, 5, seed=3)
    lam = np.array([1e-3, 1e-2, 0.5, 2.0])
    # an antisymmetric perturbation must be ignored: the input is symmetrized first
    skew = np.random.default_rng(4).standard_normal((4, 5, 5))
    skew = skew - skew.transpose(0, 2, 1)
    inv, ok = damped_inverse_batch(torch.from_numpy(m + 1e-3 * skew), torch.from_numpy(lam), method)
    assert ok.all()
    assert rel_err(inv, oracle_inv(m, lam)) < 1e-10
    assert torch.equal(inv, inv.mT)
    # a 0-d tensor damping acts like a number
    inv0, _ = damped_inverse_batch(
        torch.from_numpy(m), torch.tensor(0.1, dtype=torch.float64), method
    )
    assert rel_err(inv0, oracle_inv(m, 0.1)) < 1e-10


@pytest.mark.parametrize("method", METHODS)
def test_batch_failures_are_masked_not_raised(method: str) -> None:
    m = spd_batch(4, 3, seed=5)
    m[1, 0, 0] = np.nan
    m[2] = 0.0  # singular: with zero damping neither path can invert it
    damping = torch.tensor([0.0, 0.1, 0.0, 0.0], dtype=torch.float64)
    inv, ok = damped_inverse_batch(torch.from_numpy(m), damping, method)
    assert ok.tolist() == [True, False, False, True]
    assert torch.equal(inv[1], torch.zeros(3, 3, dtype=torch.float64))
    assert torch.equal(inv[2], torch.zeros(3, 3, dtype=torch.float64))
    good = [0, 3]
    assert rel_err(inv[good], oracle_inv(m[good], 0.0)) < 1e-10
    # negative or non-finite damping entries fail only their own matrix
    bad_damp = torch.tensor([-1.0, 0.1, math.inf, 0.1], dtype=torch.float64)
    _, ok2 = damped_inverse_batch(torch.from_numpy(spd_batch(4, 3, seed=5)), bad_damp, method)
    assert ok2.tolist() == [False, True, False, True]


def test_cholesky_fails_on_indefinite_eigh_clamps() -> None:
    m = torch.tensor([[[1.0, 0.0], [0.0, -0.5]]], dtype=torch.float64)
    _, ok = damped_inverse_batch(m, 0.1, "cholesky")
    assert not ok.item()
    # eigh clamps the negative eigenvalue (round-off in a PSD factor) to 0: diag(1/1.1, 1/0.1)
    inv, ok = damped_inverse_batch(m, 0.1, "eigh")
    assert ok.item()
    np.testing.assert_allclose(inv[0].numpy(), np.diag([1 / 1.1, 10.0]), rtol=1e-12, atol=1e-14)


def test_batch_rejects_bad_arguments() -> None:
    good = torch.eye(3).expand(2, 3, 3)
    with pytest.raises(ValueError, match="method"):
        damped_inverse_batch(good, 0.1, "svd")
    with pytest.raises(ValueError, match="shape"):
        damped_inverse_batch(torch.eye(3), 0.1, "eigh")
    with pytest.raises(TypeError, match="float32 or float64"):
        damped_inverse_batch(good.half(), 0.1, "eigh")
    with pytest.raises(ValueError, match="damping"):
        damped_inverse_batch(good, -1.0, "eigh")
    with pytest.raises(ValueError, match="damping"):
        damped_inverse_batch(good, torch.ones(3), "eigh")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient_factor(method: str, dtype: torch.dtype) -> None:
    x = np.random.default_rng(6).standard_normal(8)
    lam = 1e-2
    # Sherman-Morrison: (lam I + x x^T)^-1 = (I - x x^T / (lam + x^T x)) / lam
    ref = (np.eye(8) - np.outer(x, x) / (lam + x @ x)) / lam
    inv, ok = damped_inverse_batch(torch.from_numpy(np.outer(x, x)[None]).to(dtype), lam, method)
    assert ok.item()
    assert torch.isfinite(inv).all()
    assert rel_err(inv[0], ref) < (1e-10 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_ill_conditioned_float32(method: str) -> None:
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    m64 = (q * np.geomspace(1e-12, 1.0, 12)) @ q.T  # cond 1e12
    m32 = torch.from_numpy(m64).float()[None]
    # moderate damping: close to the float64 answer (float32 rounding of M is ~1e-7 * cond 1e3)
    inv, ok = damped_inverse_batch(m32, 1e-3, method)
    assert ok.item()
    assert rel_err(inv[0], oracle_inv(m64[None], 1e-3)[0]) < 1e-3
    # tiny damping: the answer is dominated by round-off, but it is finite (or masked)
    inv, ok = damped_inverse_batch(m32, 1e-9, method)
    assert torch.isfinite(inv).all()
    if method == "eigh":
        assert ok.item()


def test_eigh_exception_only_fails_the_culprit(monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.linalg.eigh

    def flaky(a: Tensor) -> Any:
        if bool((a[:, 0, 0] == 7.0).any()):
            raise RuntimeError("did not converge")  # what LinAlgError subclasses
        return real(a)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    m = spd_batch(5, 3, seed=8)
    m[3] = np.diag([7.0, 1.0, 1.0])
    inv, ok = damped_inverse_batch(torch.from_numpy(m), 0.1, "eigh")
    assert ok.tolist() == [True, True, True, False, True]
    good = [0, 1, 2, 4]
    assert rel_err(inv[good], oracle_inv(m[good], 0.1)) < 1e-10


# --------------------------------------------------------------------------------------
# pi correction and Kronecker damping


def test_pi_correction_by_hand() -> None:
    a = torch.diag(torch.tensor([2.0, 4.0, 6.0]))  # tr/dim = 4
    g = torch.tensor([[1.0, 0.5], [0.5, 0.0]])  # tr/dim = 0.5
    assert pi_correction(a, g) == pytest.approx(math.sqrt(8.0), rel=1e-12)
    assert pi_correction(g, a) == pytest.approx(1 / math.sqrt(8.0), rel=1e-12)
    da, dg = kron_damping(a, g, 0.09)
    assert da == pytest.approx(math.sqrt(8.0) * 0.3, rel=1e-12)
    assert dg == pytest.approx(0.3 / math.sqrt(8.0), rel=1e-12)
    assert da * dg == pytest.approx(0.09, rel=1e-12)


@pytest.mark.parametrize(
    ("a", "g"),
    [
        (torch.zeros(3, 3), torch.eye(2)),
        (torch.eye(3), torch.zeros(2, 2)),
        (torch.full((3, 3), math.nan), torch.eye(2)),
        (torch.eye(3), torch.diag(torch.tensor([math.inf, 1.0]))),
        (-torch.eye(3), torch.eye(2)),
    ],
)
def test_pi_correction_fallback(a: Tensor, g: Tensor) -> None:
    assert pi_correction(a, g) == 1.0
    assert kron_damping(a, g, 0.04) == pytest.approx((0.2, 0.2))


def test_pi_correction_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="square"):
        pi_correction(torch.ones(2, 3), torch.eye(2))
    with pytest.raises(ValueError, match="damping"):
        kron_damping(torch.eye(2), torch.eye(2), -1.0)


@pytest.mark.parametrize("method", METHODS)
def test_kron_preconditioning_matches_dense_solve(method: str) -> None:
    rng = np.random.default_rng(9)
    d_in, d_out = 5, 3
    xa = rng.standard_normal((d_in, 40))
    xg = rng.standard_normal((d_out, 40)) * 0.1
    a, g = xa @ xa.T / 40, xg @ xg.T / 40
    w = rng.standard_normal((d_out, d_in))  # gradient of W (out, in)
    lam = 1e-2
    da, dg = kron_damping(torch.from_numpy(a), torch.from_numpy(g), lam)
    expected_pi = math.sqrt((np.trace(a) / d_in) / (np.trace(g) / d_out))
    assert da == pytest.approx(expected_pi * math.sqrt(lam), rel=1e-12)
    inv_a, ok_a = damped_inverse_batch(torch.from_numpy(a)[None], da, method)
    inv_g, ok_g = damped_inverse_batch(torch.from_numpy(g)[None], dg, method)
    assert ok_a.item()
    assert ok_g.item()
    # (A (x) G) vec(W) = vec(G W A) with column-major vec, so the inverse gives G^-1 W A^-1
    precond = (inv_g[0] @ torch.from_numpy(w) @ inv_a[0]).numpy()
    dense = np.kron(a + da * np.eye(d_in), g + dg * np.eye(d_out))
    vec = np.linalg.solve(dense, w.reshape(-1, order="F"))
    np.testing.assert_allclose(precond, vec.reshape((d_out, d_in), order="F"), rtol=1e-9)


# --------------------------------------------------------------------------------------
# DampedInverter


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="method"):
        InversionConfig(method="svd")
    with pytest.raises(ValueError, match="max_failures"):
        InversionConfig(max_failures=0)
    with pytest.raises(ValueError, match="max_failures"):
        InversionConfig(max_failures=True)
    with pytest.raises(ValueError, match="float64_retry"):
        InversionConfig(float64_retry=1)  # type: ignore[arg-type]


class CallCounter:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.batch_sizes: list[int] = []

    def __call__(self, a: Tensor, *args: Any, **kwargs: Any) -> Any:
        self.batch_sizes.append(a.shape[0])
        return self.fn(a, *args, **kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_blocks_are_batched_by_shape(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    target = "eigh" if method == "eigh" else "cholesky_ex"
    counter = CallCounter(getattr(torch.linalg, target))
    monkeypatch.setattr(torch.linalg, target, counter)
    named: dict[str, Tensor] = {}
    for i, m in enumerate(spd_batch(10, 4, seed=11)):
        named[f"fc{i}.A"] = torch.from_numpy(m)
    for i, m in enumerate(spd_batch(5, 3, seed=12)):
        named[f"fc{i}.G"] = torch.from_numpy(m)
    named["bn1"] = torch.from_numpy(spd_batch(6, 2, seed=13))  # unit-wise (C, 2, 2)
    named["bn2"] = torch.from_numpy(spd_batch(9, 2, seed=14))
    named["fc0.A32"] = torch.from_numpy(spd_batch(1, 4, seed=15)[0]).float()
    damping = {name: 0.01 * (1 + i) for i, name in enumerate(named)}
    inverter = DampedInverter(InversionConfig(method=method))
    out = inverter.invert(named, damping)
    # groups: (4, f64) x10, (3, f64) x5, (2, f64) 6 + 9 matrices, (4, f32) x1
    assert sorted(counter.batch_sizes) == [1, 5, 10, 15]
    assert inverter.last_report.batched_calls == 4
    assert list(out) == list(named)
    for name, t in named.items():
        assert out[name].shape == t.shape
        assert out[name].dtype == t.dtype
        mats = t.double().reshape(-1, t.shape[-1], t.shape[-1]).numpy()
        ref = oracle_inv(mats, damping[name]).reshape(t.shape)
        assert rel_err(out[name], ref) < (1e-10 if t.dtype == torch.float64 else 1e-5)
        # equal to inverting the block on its own
        single, _ = damped_inverse_batch(t.reshape(-1, *t.shape[-2:]), damping[name], method)
        torch.testing.assert_close(out[name], single.reshape(t.shape), rtol=1e-12, atol=1e-12)
    assert dict(inverter.failures) == dict.fromkeys(named, 0)


def test_unitwise_damping_per_channel() -> None:
    f = spd_batch(4, 2, seed=16)
    lam = torch.tensor([1e-3, 1e-2, 1e-1, 1.0], dtype=torch.float64)
    out = DampedInverter().invert({"bn": torch.from_numpy(f)}, {"bn": lam})
    assert rel_err(out["bn"], oracle_inv(f, lam.numpy())) < 1e-10


def test_nonfinite_input_keeps_previous_and_counts() -> None:
    inverter = DampedInverter(InversionConfig(max_failures=3))
    good = torch.from_numpy(spd_batch(1, 3, seed=17)[0])
    other = torch.from_numpy(spd_batch(1, 3, seed=18)[0])
    first = inverter.invert({"w": good, "v": other}, {"w": 0.1, "v": 0.1})["w"]
    assert inverter.failures["w"] == 0

    bad = good.clone()
    bad[0, 1] = math.nan
    out = inverter.invert({"w": bad, "v": other}, {"w": 0.1, "v": 0.1})
    assert torch.equal(out["w"], first)
    assert inverter.failures == {"w": 1, "v": 0}
    report = inverter.last_report
    assert report.kept == ("w",)
    assert report.nonfinite == ("w",)
    assert report.retried == ()  # a non-finite input is never decomposed or retried
    assert report.inverted == ("v",)

    bad[0, 1] = math.inf
    inverter.invert({"w": bad}, {"w": 0.1})
    assert inverter.failures["w"] == 2

    # a success resets the counter and replaces the stored inverse
    out = inverter.invert({"w": 2 * good}, {"w": 0.1})
    assert inverter.failures["w"] == 0
    assert rel_err(out["w"], oracle_inv(2 * good.numpy()[None], 0.1)[0]) < 1e-10
    second = out["w"]

    for expected in (1, 2):
        out = inverter.invert({"w": bad}, {"w": 0.1})
        assert torch.equal(out["w"], second)
        assert inverter.failures["w"] == expected
    with pytest.raises(InversionError, match="'w'") as info:
        inverter.invert({"w": bad, "v": 3 * other}, {"w": 0.1, "v": 0.1})
    assert info.value.names == ("w",)
    assert "3 consecutive failures" in str(info.value)
    assert inverter.failures["w"] == 3
    assert inverter.last_report.raised == ("w",)
    # the other block's state was still updated
    assert rel_err(inverter.inverses["v"], oracle_inv(3 * other.numpy()[None], 0.1)[0]) < 1e-10


def test_failure_without_previous_names_the_block() -> None:
    bad = torch.full((3, 3), math.nan)
    with pytest.raises(InversionError, match=r"layer2\.A") as info:
        DampedInverter().invert(
            {"layer1.A": torch.eye(3), "layer2.A": bad}, {"layer1.A": 0.1, "layer2.A": 0.1}
        )
    assert info.value.names == ("layer2.A",)
    assert "no previous inverse" in info.value.reasons["layer2.A"]


def test_unitwise_layer_fails_as_a_whole() -> None:
    f = torch.from_numpy(spd_batch(5, 2, seed=19))
    inverter = DampedInverter()
    first = inverter.invert({"bn": f}, {"bn": 0.01})["bn"]
    bad = f.clone()
    bad[3, 1, 1] = math.inf  # one channel of five
    out = inverter.invert({"bn": bad}, {"bn": 0.01})["bn"]
    assert torch.equal(out, first)
    assert inverter.failures["bn"] == 1


def test_float32_failure_recovered_by_float64_retry() -> None:
    # [[1, 1], [1, 1]] + 1e-9 I: in float32 1 + 1e-9 == 1, so Cholesky hits a zero pivot;
    # in float64 it succeeds and the inverse (~1e9) fits in float32.
    m = torch.ones(2, 2, dtype=torch.float32)
    inverter = DampedInverter(InversionConfig(method="cholesky"))
    out = inverter.invert({"a": m, "b": torch.eye(2)}, {"a": 1e-9, "b": 1e-9})
    report = inverter.last_report
    assert report.inverted == ("b",)
    assert report.retried == ("a",)
    assert report.recovered == ("a",)
    assert report.kept == ()
    assert report.batched_calls == 2
    assert out["a"].dtype == torch.float32
    ref = np.linalg.inv(np.ones((2, 2)) + 1e-9 * np.eye(2))
    assert rel_err(out["a"], ref) < 1e-6

    # with the retry disabled the same block fails outright
    no_retry = DampedInverter(InversionConfig(method="cholesky", float64_retry=False))
    with pytest.raises(InversionError, match="'a'"):
        no_retry.invert({"a": m}, {"a": 1e-9})
    assert no_retry.last_report.retried == ()


def test_forced_failure_retry_then_keep() -> None:
    # indefinite with zero damping: Cholesky fails in float32 and in float64
    indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    spd = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    inverter = DampedInverter(InversionConfig(method="cholesky"))
    first = inverter.invert({"a": spd}, {"a": 0.0})["a"]
    out = inverter.invert({"a": indefinite}, {"a": 0.0})["a"]
    report = inverter.last_report
    assert report.retried == ("a",)
    assert report.recovered == ()
    assert report.kept == ("a",)
    assert torch.equal(out, first)
    assert inverter.failures["a"] == 1
    # float64 blocks are not retried (already float64), only kept
    inverter64 = DampedInverter(InversionConfig(method="eigh"))
    inverter64.invert({"z": torch.eye(2, dtype=torch.float64)}, {"z": 0.0})
    inverter64.invert({"z": torch.zeros(2, 2, dtype=torch.float64)}, {"z": 0.0})
    assert inverter64.last_report.retried == ()
    assert inverter64.last_report.kept == ("z",)


def test_float64_retry_result_must_fit_the_block_dtype() -> None:
    # 0 + 1e-39 I: the float32 inverse overflows; the float64 one (1e39) is finite but
    # overflows again when cast back to float32, so the block is kept, not "recovered".
    inverter = DampedInverter()
    first = inverter.invert({"t": torch.ones(1, 1)}, {"t": 0.0})["t"]
    out = inverter.invert({"t": torch.zeros(1, 1)}, {"t": 1e-39})["t"]
    assert inverter.last_report.retried == ("t",)
    assert inverter.last_report.recovered == ()
    assert inverter.last_report.kept == ("t",)
    assert torch.equal(out, first)


def test_invert_rejects_bad_arguments() -> None:
    inverter = DampedInverter()
    with pytest.raises(ValueError, match="no damping"):
        inverter.invert({"a": torch.eye(2)}, {})
    with pytest.raises(ValueError, match="'a'"):
        inverter.invert({"a": torch.ones(2, 3)}, {"a": 0.1})
    with pytest.raises(ValueError, match=r"damping\['a'\]"):
        inverter.invert({"a": torch.eye(2)}, {"a": math.nan})
    with pytest.raises(ValueError, match="'a'"):
        inverter.invert({"a": torch.eye(2).expand(3, 2, 2)}, {"a": torch.ones(2)})
    with pytest.raises(TypeError, match="'a'"):
        inverter.invert({"a": torch.eye(2, dtype=torch.float16)}, {"a": 0.1})


def test_state_dict_round_trip() -> None:
    inverter = DampedInverter(InversionConfig(max_failures=3))
    named = {
        "fc.A": torch.from_numpy(spd_batch(1, 4, seed=20)[0]),
        "fc.G": torch.from_numpy(spd_batch(1, 3, seed=21)[0]).float(),
        "bn": torch.from_numpy(spd_batch(3, 2, seed=22)),
    }
    damping = dict.fromkeys(named, 0.05)
    inverter.invert(named, damping)
    bad = dict(named, **{"fc.A": torch.full((4, 4), math.nan)})
    inverter.invert(bad, damping)
    state = inverter.state_dict()
    assert state["failures"] == {"fc.A": 1, "fc.G": 0, "bn": 0}

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer)

    restored = DampedInverter(InversionConfig(max_failures=3))
    restored.load_state_dict(loaded)
    again = restored.state_dict()
    assert again["failures"] == state["failures"]
    assert set(again["inverses"]) == set(state["inverses"])
    for name, t in state["inverses"].items():
        assert again["inverses"][name].dtype == t.dtype
        assert torch.equal(again["inverses"][name], t)
    # the restored counters carry on: two more failures reach max_failures=3
    restored.invert({"fc.A": bad["fc.A"]}, damping)
    with pytest.raises(InversionError, match=r"fc\.A"):
        restored.invert({"fc.A": bad["fc.A"]}, damping)
    # loading copies: mutating the source does not change the inverter
    loaded["inverses"]["fc.G"].zero_()
    assert not torch.equal(restored.inverses["fc.G"], loaded["inverses"]["fc.G"])


@pytest.mark.parametrize(
    "state",
    [
        {"inverses": {}},
        {"inverses": {"a": torch.eye(2)}, "failures": {}},
        {"inverses": {"a": torch.eye(2)}, "failures": {"a": -1}},
        {"inverses": {"a": torch.ones(2, 3)}, "failures": {"a": 0}},
        {"inverses": {"a": [1.0]}, "failures": {"a": 0}},
    ],
)
def test_load_state_dict_rejects_malformed(state: dict[str, Any]) -> None:
    inverter = DampedInverter()
    inverter.invert({"x": torch.eye(2)}, {"x": 0.1})
    before = inverter.state_dict()
    with pytest.raises(ValueError):  # noqa: PT011
        inverter.load_state_dict(state)
    assert inverter.state_dict()["failures"] == before["failures"]
    assert set(inverter.inverses) == {"x"}


def test_module_exports() -> None:
    assert set(linalg.__all__) >= {
        "DampedInverter",
        "InversionConfig",
        "InversionError",
        "damped_inverse_batch",
        "kron_damping",
        "pi_correction",
    }


def test_eigh_redamping_reuses_the_decomposition(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same tensor, new damping: no new eigh, and the result equals a fresh inversion; a new
    tensor or an in-place change of the old one is decomposed again."""
    counter = CallCounter(torch.linalg.eigh)
    monkeypatch.setattr(torch.linalg, "eigh", counter)
    a = torch.from_numpy(spd_batch(1, 5, seed=21)[0])
    g = torch.from_numpy(spd_batch(1, 3, seed=22)[0])
    bn = torch.from_numpy(spd_batch(4, 2, seed=23))
    inverter = DampedInverter(InversionConfig(method="eigh"))
    inverter.invert({"a": a, "g": g, "bn": bn}, {"a": 0.1, "g": 0.2, "bn": 0.3})
    assert len(counter.batch_sizes) == 3
    out = inverter.invert({"a": a, "g": g, "bn": bn}, {"a": 0.05, "g": 0.2, "bn": 0.7})
    assert len(counter.batch_sizes) == 3  # nothing decomposed again
    fresh = DampedInverter(InversionConfig(method="eigh")).invert(
        {"a": a, "g": g, "bn": bn}, {"a": 0.05, "g": 0.2, "bn": 0.7}
    )
    for name in ("a", "g", "bn"):
        assert torch.equal(out[name], fresh[name])
        mats = out[name].reshape(-1, out[name].shape[-1], out[name].shape[-1])
        src = {"a": a, "g": g, "bn": bn}[name]
        damp = {"a": 0.05, "g": 0.2, "bn": 0.7}[name]
        ref = oracle_inv(src.reshape(mats.shape).numpy(), damp)
        assert rel_err(mats, ref) < 1e-10
    a2 = a * 2.0  # a new tensor
    inverter.invert({"a": a2}, {"a": 0.05})
    assert counter.batch_sizes[-1] == 1
    calls = len(counter.batch_sizes)
    g.mul_(3.0)  # changed in place: the cache must not be used
    out_g = inverter.invert({"g": g}, {"g": 0.2})["g"]
    assert len(counter.batch_sizes) == calls + 1
    assert rel_err(out_g, oracle_inv(g.numpy()[None], 0.2)[0]) < 1e-10


def test_eigh_cache_keeps_the_failure_policy() -> None:
    good = torch.from_numpy(spd_batch(1, 3, seed=31)[0]).float()
    inverter = DampedInverter(InversionConfig(method="eigh", max_failures=2))
    first = inverter.invert({"x": good}, {"x": 0.1})["x"]
    bad = good.clone()
    bad[0, 0] = float("nan")
    kept = inverter.invert({"x": bad}, {"x": 0.2})["x"]
    assert inverter.last_report.kept == ("x",)
    assert torch.equal(kept, first)
    # the cached decomposition of `good` still serves a re-damping of `good`
    again = inverter.invert({"x": good}, {"x": 0.2})["x"]
    assert inverter.failures["x"] == 0
    assert rel_err(again, oracle_inv(good.double().numpy()[None], 0.2)[0]) < 1e-5
    inverter.invert({"x": bad}, {"x": 0.2})
    with pytest.raises(InversionError, match="2 consecutive failures"):
        inverter.invert({"x": bad}, {"x": 0.2})
    # a loaded state starts without cached decompositions and still inverts correctly
    copy = DampedInverter(InversionConfig(method="eigh"))
    copy.load_state_dict(inverter.state_dict())
    out = copy.invert({"x": good}, {"x": 0.2})["x"]
    assert torch.equal(out, again)


def test_default_method_is_cholesky() -> None:
    assert InversionConfig().method == "cholesky"
