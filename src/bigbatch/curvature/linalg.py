"""Damped inversion of Fisher blocks: the numerics behind SP-NGD's natural gradient.

SP-NGD (K-FAC natural gradient, Osawa et al.) approximates a layer's Fisher block as
``A (x) G`` and preconditions with ``(A + d_a I)^-1 (x) (G + d_g I)^-1``, where the
pi-correction splits the damping ``lambda`` between the factors:
``pi = sqrt((tr A / dim A) / (tr G / dim G))``, ``d_a = pi sqrt(lambda)``,
``d_g = sqrt(lambda) / pi`` (see :func:`pi_correction`, :func:`kron_damping`). Unit-wise
BatchNorm blocks are batches of small ``(k, k)`` matrices ``F_c`` damped as ``F_c + lambda I``.

This module provides:

* :func:`damped_inverse_batch` -- one batched ``eigh`` or Cholesky inversion of
  ``M + d I`` for a stack of symmetric PSD matrices, with a per-matrix success mask instead
  of exceptions;
* :class:`DampedInverter` -- per-block state for many named blocks: blocks of equal matrix
  shape, dtype and device are inverted in one batched call, failures are retried in
  float64, then fall back to the block's last good inverse, and :class:`InversionError` is
  raised when a block has no usable inverse or has failed ``max_failures`` times in a row.

It is not for computing the factors (the block kinds in ``blocks/`` do that), deciding when to
refresh them (staleness) or applying the inverses to gradients (blocks); it only turns
factor matrices into damped inverses.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "MIN_DAMPING",
    "DampedInverter",
    "InversionConfig",
    "InversionError",
    "InversionReport",
    "damped_inverse_batch",
    "kron_damping",
    "pi_correction",
]

InversionMethod = Literal["eigh", "cholesky"]
METHODS: tuple[InversionMethod, ...] = ("eigh", "cholesky")
#: the smallest Tikhonov damping the optimizers accept: below it no float arithmetic keeps a
#: rank-deficient factor (fewer samples than dimensions) invertible
MIN_DAMPING = 1e-10
_DTYPES = (torch.float32, torch.float64)


def _check_square(t: Tensor, what: str) -> None:
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(f"{what} must be a square 2-D matrix, got shape {tuple(t.shape)}")


def pi_correction(a: Tensor, g: Tensor) -> float:
    """``pi = sqrt((tr A / dim A) / (tr G / dim G))`` for one pair of Kronecker factors.

    Falls back to ``1.0`` (an even split of the damping) when either trace is zero,
    negative or non-finite, or the ratio is not a finite positive number.
    """
    _check_square(a, "a")
    _check_square(g, "g")
    mean_a = float(torch.diagonal(a).to(torch.float64).sum()) / a.shape[0]
    mean_g = float(torch.diagonal(g).to(torch.float64).sum()) / g.shape[0]
    if not (math.isfinite(mean_a) and math.isfinite(mean_g)) or mean_a <= 0.0 or mean_g <= 0.0:
        return 1.0
    pi = math.sqrt(mean_a / mean_g)
    return pi if math.isfinite(pi) and pi > 0.0 else 1.0


def _check_damping_value(damping: float, what: str = "damping") -> float:
    value = float(damping)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"{what} must be a finite number >= 0, got {damping!r}")
    return value


def kron_damping(a: Tensor, g: Tensor, damping: float) -> tuple[float, float]:
    """Split ``damping`` (lambda) between the factors: ``(pi sqrt(lambda), sqrt(lambda) / pi)``.

    The product of the two is ``lambda``, so the damped Kronecker product contains
    ``lambda I`` exactly, plus the cross terms ``d_a I (x) G + A (x) d_g I``.
    """
    root = math.sqrt(_check_damping_value(damping))
    pi = pi_correction(a, g)
    return pi * root, root / pi


@dataclass(frozen=True)
class InversionConfig:
    """How :class:`DampedInverter` inverts and how long it tolerates failures.

    ``method``: ``"cholesky"`` (default, as the reference: ``cholesky_ex`` of the damped
    factor and ``cholesky_inverse``; several times cheaper than an eigendecomposition and
    robust to a busy machine) or ``"eigh"`` (eigenvalues clamped at 0 before damping; the
    decomposition of each block is cached, so re-damping a block whose matrix did not change,
    e.g. after its partner factor moved the pi-correction, costs one matrix product).
    ``max_failures``: consecutive failures of a block (with its last good inverse reused)
    after which :class:`InversionError` is raised.
    ``float64_retry``: retry blocks that failed in float32 once in float64.
    """

    method: InversionMethod = "cholesky"
    max_failures: int = 3
    float64_retry: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if (
            isinstance(self.max_failures, bool)
            or not isinstance(self.max_failures, int)
            or not 1 <= self.max_failures <= 10**6
        ):
            raise ValueError(
                f"max_failures must be an int in [1, 10**6], got {self.max_failures!r}"
            )
        if not isinstance(self.float64_retry, bool):
            raise ValueError(f"float64_retry must be a bool, got {self.float64_retry!r}")


class InversionError(RuntimeError):
    """A block could not be inverted and no usable previous inverse may stand in for it.

    ``names`` lists the offending blocks, ``reasons`` maps each to a short explanation.
    """

    def __init__(self, reasons: Mapping[Hashable, str]) -> None:
        self.reasons = dict(reasons)
        self.names = tuple(self.reasons)
        detail = "; ".join(f"{name!r}: {why}" for name, why in self.reasons.items())
        super().__init__(f"damped inversion failed for block(s) {list(self.names)}: {detail}")


@dataclass(frozen=True)
class InversionReport:
    """What the last :meth:`DampedInverter.invert` call did, block names per outcome.

    ``inverted``: succeeded at the first attempt. ``retried``: failed, retried in float64;
    ``recovered``: those of them that then succeeded. ``nonfinite``: the input held NaN/Inf
    (never decomposed, never retried). ``kept``: the previous inverse was returned instead.
    ``raised``: named in the :class:`InversionError`. ``batched_calls``: number of calls to
    :func:`damped_inverse_batch` (one per group, plus one per group that needed a retry).
    """

    inverted: tuple[Hashable, ...] = ()
    retried: tuple[Hashable, ...] = ()
    recovered: tuple[Hashable, ...] = ()
    nonfinite: tuple[Hashable, ...] = ()
    kept: tuple[Hashable, ...] = ()
    raised: tuple[Hashable, ...] = ()
    batched_calls: int = 0


def _as_batch(mats: Tensor) -> None:
    if mats.ndim != 3 or mats.shape[1] != mats.shape[2]:
        raise ValueError(f"mats must have shape (B, d, d), got {tuple(mats.shape)}")
    if mats.dtype not in _DTYPES:
        raise TypeError(f"mats must be float32 or float64, got {mats.dtype}")


def _damping_vector(damping: Tensor | float, mats: Tensor) -> Tensor:
    n = mats.shape[0]
    if not isinstance(damping, Tensor):
        value = _check_damping_value(damping)
        return torch.full((n,), value, dtype=mats.dtype, device=mats.device)
    if damping.ndim == 0 or damping.shape == (1,):
        return damping.reshape(1).to(dtype=mats.dtype, device=mats.device).expand(n)
    if damping.shape != (n,):
        raise ValueError(f"damping must be a scalar or of shape ({n},), got {tuple(damping.shape)}")
    return damping.to(dtype=mats.dtype, device=mats.device)


def _eigh(sym: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Batched eigh; if the solver raises, bisect so that only the culprit(s) are marked bad."""
    try:
        evals, evecs = torch.linalg.eigh(sym)
        return evals, evecs, torch.ones(sym.shape[0], dtype=torch.bool, device=sym.device)
    except RuntimeError:
        n = sym.shape[0]
        if n == 1:
            eye = torch.eye(sym.shape[-1], dtype=sym.dtype, device=sym.device)
            return (
                torch.ones_like(sym[:, 0]),
                eye.expand_as(sym).clone(),
                torch.zeros(1, dtype=torch.bool, device=sym.device),
            )
        lo, hi = _eigh(sym[: n // 2]), _eigh(sym[n // 2 :])
        return (
            torch.cat([lo[0], hi[0]]),
            torch.cat([lo[1], hi[1]]),
            torch.cat([lo[2], hi[2]]),
        )


def _symmetrized(mats: Tensor) -> tuple[Tensor, Tensor]:
    """``(0.5 (M + M^T), finite mask)``; non-finite inputs are swapped for ``I`` so that they
    cannot upset the solver for the others."""
    finite_in = torch.isfinite(mats).flatten(1).all(dim=1)
    eye = torch.eye(mats.shape[-1], dtype=mats.dtype, device=mats.device)
    return torch.where(finite_in[:, None, None], 0.5 * (mats + mats.mT), eye), finite_in


def _from_eigh(evals: Tensor, evecs: Tensor, damp: Tensor) -> Tensor:
    """``V diag(1 / (max(e, 0) + d)) V^T``: the damped inverse from an eigendecomposition."""
    inv_evals = 1.0 / (evals.clamp_min(0.0) + damp[:, None])
    return (evecs * inv_evals[:, None, :]) @ evecs.mT


def _finish(inv: Tensor, ok: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetrize, and zero (and mark failed) every non-finite or already failed inverse."""
    inv = 0.5 * (inv + inv.mT)
    ok = ok & torch.isfinite(inv).flatten(1).all(dim=1)
    inv = torch.where(ok[:, None, None], inv, torch.zeros((), dtype=inv.dtype, device=inv.device))
    return inv, ok


def _invert(mats: Tensor, damping: Tensor, method: str) -> tuple[Tensor, Tensor, Tensor]:
    """Core of :func:`damped_inverse_batch`; also returns the per-matrix input-finite mask."""
    sym, finite_in = _symmetrized(mats)
    ok = finite_in & torch.isfinite(damping) & (damping >= 0)
    damp = torch.where(ok, damping, torch.ones_like(damping))
    if method == "eigh":
        evals, evecs, solved = _eigh(sym)
        ok = ok & solved
        inv = _from_eigh(evals, evecs, damp)
    elif method == "cholesky":
        eye = torch.eye(mats.shape[-1], dtype=mats.dtype, device=mats.device)
        factor, info = torch.linalg.cholesky_ex(sym + damp[:, None, None] * eye)
        ok = ok & (info == 0)
        factor = torch.where(ok[:, None, None], factor, eye)
        inv = torch.cholesky_inverse(factor)
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    inv, ok = _finish(inv, ok)
    return inv, ok, finite_in


@dataclass
class _Eig:
    """A block's cached eigendecomposition and the tensor (and version) it was taken of."""

    source: Tensor
    version: int
    evals: Tensor  # (n, k) in the compute dtype
    evecs: Tensor  # (n, k, k)

    def matches(self, source: Tensor, dtype: torch.dtype) -> bool:
        return (
            self.source is source
            and self.source._version == self.version
            and self.evals.dtype == dtype
        )


def _invert_eigh_cached(
    blocks: Sequence[_Block],
    counts: list[int],
    mats: Tensor,
    damping: Tensor,
    cache: dict[Hashable, _Eig],
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_invert` with ``"eigh"``, decomposing only blocks whose matrices changed since
    their cached decomposition (a damping change alone costs one matrix product).

    Whether a block's decomposition came from the cache or not, the inverses of the group
    are composed in the same batched product, so the result does not depend on the cache.
    """
    dtype = mats.dtype
    starts = [sum(counts[:i]) for i in range(len(counts))]
    fresh = [
        i
        for i, b in enumerate(blocks)
        if (entry := cache.get(b.name)) is None or not entry.matches(b.source, dtype)
    ]
    evals = mats.new_empty(mats.shape[:2])
    evecs = torch.empty_like(mats)
    finite_in = torch.ones(mats.shape[0], dtype=torch.bool, device=mats.device)
    solved = torch.ones_like(finite_in)
    if fresh:
        index = torch.cat(
            [torch.arange(starts[i], starts[i] + counts[i], device=mats.device) for i in fresh]
        )
        sym, fin = _symmetrized(mats[index])
        e, v, ok_eig = _eigh(sym)
        evals[index], evecs[index], finite_in[index], solved[index] = e, v, fin, ok_eig
        good = (fin & ok_eig).tolist()
        offset = 0
        for i in fresh:
            block, n = blocks[i], counts[i]
            if all(good[offset : offset + n]):
                cache[block.name] = _Eig(
                    block.source,
                    block.source._version,
                    e[offset : offset + n],
                    v[offset : offset + n],
                )
            else:
                cache.pop(block.name, None)
            offset += n
    for i, block in enumerate(blocks):
        if i not in fresh:
            entry = cache[block.name]
            evals[starts[i] : starts[i] + counts[i]] = entry.evals
            evecs[starts[i] : starts[i] + counts[i]] = entry.evecs
    ok = finite_in & solved & torch.isfinite(damping) & (damping >= 0)
    damp = torch.where(ok, damping, torch.ones_like(damping))
    inv, ok = _finish(_from_eigh(evals, evecs, damp), ok)
    return inv, ok, finite_in


def damped_inverse_batch(
    mats: Tensor, damping: Tensor | float, method: str
) -> tuple[Tensor, Tensor]:
    """Invert ``M_b + damping_b I`` for a stack ``mats`` of shape ``(B, d, d)`` at once.

    ``mats`` should be symmetric PSD (float32 or float64); it is symmetrized first.
    ``damping`` is a number (>= 0) or a tensor of shape ``()`` or ``(B,)``. ``method`` is
    ``"eigh"`` (eigenvalues clamped at 0 before adding the damping, i.e. the inverse of the
    damped PSD part) or ``"cholesky"`` (``cholesky_ex``, no exception on failure).

    Returns ``(inverses, ok)``: ``inverses`` of shape ``(B, d, d)`` and a bool mask ``ok``
    of shape ``(B,)``. Entry ``b`` fails (``ok[b]`` false, ``inverses[b]`` all zeros) when
    ``M_b`` or ``damping_b`` is non-finite, ``damping_b < 0``, the decomposition fails, or
    the inverse has a non-finite entry.
    """
    _as_batch(mats)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    inv, ok, _ = _invert(mats, _damping_vector(damping, mats), method)
    return inv, ok


@dataclass
class _Block:
    name: Hashable
    mats: Tensor  # (n, k, k) view of the input
    shape: torch.Size  # the input's shape, (k, k) or (C, k, k)
    damping: Tensor | float  # scalar, or (n,) tensor
    source: Tensor  # the input itself


@dataclass
class _Outcome:
    inverse: Tensor
    ok: bool
    finite_in: bool


def _prepare(name: Hashable, tensor: Tensor, damping: float | Tensor) -> _Block:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"block {name!r}: expected a Tensor, got {type(tensor).__name__}")
    if tensor.ndim not in (2, 3) or tensor.shape[-1] != tensor.shape[-2]:
        raise ValueError(
            f"block {name!r}: expected shape (k, k) or (C, k, k), got {tuple(tensor.shape)}"
        )
    if tensor.dtype not in _DTYPES:
        raise TypeError(f"block {name!r}: expected float32 or float64, got {tensor.dtype}")
    if tensor.numel() == 0:
        raise ValueError(f"block {name!r}: empty tensor of shape {tuple(tensor.shape)}")
    mats = tensor.reshape(-1, tensor.shape[-1], tensor.shape[-1])
    n = mats.shape[0]
    if isinstance(damping, Tensor):
        if damping.numel() == 1:
            damp: Tensor | float = damping.reshape(1).expand(n)
        elif damping.shape == (n,):
            damp = damping
        else:
            raise ValueError(
                f"block {name!r}: damping must be a scalar or of shape ({n},), "
                f"got {tuple(damping.shape)}"
            )
    else:
        damp = _check_damping_value(damping, f"damping[{name!r}]")
    return _Block(name, mats, tensor.shape, damp, tensor)


def _run(
    blocks: Sequence[_Block],
    method: str,
    compute_dtype: torch.dtype,
    cache: dict[Hashable, _Eig] | None = None,
) -> list[_Outcome]:
    """Invert all matrices of ``blocks`` (same k, dtype, device) in one batched call.

    With ``cache`` (``"eigh"`` only) eigendecompositions are reused and recorded there."""
    first = blocks[0].mats
    dtype, device = first.dtype, first.device
    counts = [b.mats.shape[0] for b in blocks]
    mats = torch.cat([b.mats for b in blocks]).to(compute_dtype)
    if all(not isinstance(b.damping, Tensor) for b in blocks):
        values = [float(b.damping) for b, n in zip(blocks, counts, strict=True) for _ in range(n)]
        damping = torch.tensor(values, dtype=compute_dtype, device=device)
    else:
        damping = torch.cat(
            [
                b.damping.to(dtype=compute_dtype, device=device)
                if isinstance(b.damping, Tensor)
                else torch.full((n,), b.damping, dtype=compute_dtype, device=device)
                for b, n in zip(blocks, counts, strict=True)
            ]
        )
    if method == "eigh" and cache is not None:
        inv, ok, finite_in = _invert_eigh_cached(blocks, counts, mats, damping, cache)
    else:
        inv, ok, finite_in = _invert(mats, damping, method)
    if compute_dtype != dtype:
        inv = inv.to(dtype)
        ok = ok & torch.isfinite(inv).flatten(1).all(dim=1)
    ok_list, finite_list = torch.stack([ok, finite_in]).tolist()
    outcomes: list[_Outcome] = []
    start = 0
    for block, piece, n in zip(blocks, torch.split(inv, counts), counts, strict=True):
        stop = start + n
        outcomes.append(
            _Outcome(
                piece.reshape(block.shape), all(ok_list[start:stop]), all(finite_list[start:stop])
            )
        )
        start = stop
    return outcomes


@dataclass
class _Tally:
    inverted: list[Hashable] = field(default_factory=list)
    retried: list[Hashable] = field(default_factory=list)
    recovered: list[Hashable] = field(default_factory=list)
    nonfinite: list[Hashable] = field(default_factory=list)
    kept: list[Hashable] = field(default_factory=list)
    calls: int = 0


class DampedInverter:
    """Damped inverses of many named blocks, with per-block fallback state.

    Blocks are named by any hashable key (the engine uses ``(block, slot)``). Each name
    holds its last good inverse and a consecutive-failure counter. A 2-D tensor
    ``(k, k)`` is one matrix; a 3-D tensor ``(C, k, k)`` (a unit-wise BatchNorm layer) is
    ``C`` matrices that succeed or fail together and are stored as one tensor. Returned
    tensors are the stored state: do not modify them in place.
    """

    def __init__(self, config: InversionConfig | None = None) -> None:
        self.config = config if config is not None else InversionConfig()
        self._inverses: dict[Hashable, Tensor] = {}
        self._failures: dict[Hashable, int] = {}
        self._eig: dict[Hashable, _Eig] = {}  # "eigh": decompositions for re-damping
        self.last_report = InversionReport()

    @property
    def failures(self) -> Mapping[Hashable, int]:
        """Consecutive-failure counter per block name (read-only view)."""
        return MappingProxyType(self._failures)

    @property
    def inverses(self) -> Mapping[Hashable, Tensor]:
        """Last good inverse per block name (read-only view)."""
        return MappingProxyType(self._inverses)

    @torch.no_grad()
    def invert(
        self, named: Mapping[Hashable, Tensor], damping: Mapping[Hashable, float | Tensor]
    ) -> dict[Hashable, Tensor]:
        """Invert ``named[n] + damping[n] I`` for every block ``n``; see the class docstring.

        On success a block's counter is reset to 0. A block that fails (non-finite input,
        failed decomposition, non-finite inverse, also after the float64 retry) gets its
        previous inverse back and its counter incremented. :class:`InversionError` is
        raised, after all other blocks' state has been updated, for failing blocks with no
        previous inverse of the same shape, or whose counter reached ``max_failures``.
        Runs without autograd: the stored inverses never hold a graph.
        """
        missing = [name for name in named if name not in damping]
        if missing:
            raise ValueError(f"no damping given for block(s) {missing}")
        blocks = [_prepare(name, t, damping[name]) for name, t in named.items()]
        groups: dict[tuple[int, torch.dtype, torch.device], list[_Block]] = {}
        for block in blocks:
            m = block.mats
            groups.setdefault((m.shape[-1], m.dtype, m.device), []).append(block)

        method = self.config.method
        tally = _Tally()
        results: dict[Hashable, Tensor] = {}
        failed: list[_Block] = []
        for (_, dtype, _), members in groups.items():
            outcomes = _run(members, method, dtype, self._eig)
            tally.calls += 1
            retry: list[_Block] = []
            for block, out in zip(members, outcomes, strict=True):
                if out.ok:
                    results[block.name] = out.inverse
                    tally.inverted.append(block.name)
                elif not out.finite_in:
                    tally.nonfinite.append(block.name)
                    failed.append(block)
                elif self.config.float64_retry and dtype != torch.float64:
                    retry.append(block)
                else:
                    failed.append(block)
            if retry:
                tally.retried.extend(b.name for b in retry)
                tally.calls += 1
                for block, out in zip(
                    retry, _run(retry, method, torch.float64, self._eig), strict=True
                ):
                    if out.ok:
                        results[block.name] = out.inverse
                        tally.recovered.append(block.name)
                    else:
                        failed.append(block)

        for name, inverse in results.items():
            self._inverses[name] = inverse
            self._failures[name] = 0
        reasons: dict[Hashable, str] = {}
        for block in failed:
            name = block.name
            why = "non-finite input" if name in tally.nonfinite else "inversion failed"
            previous = self._inverses.get(name)
            if previous is None or previous.shape != block.shape:
                reasons[name] = f"{why} and no previous inverse of shape {tuple(block.shape)}"
                continue
            count = self._failures.get(name, 0) + 1
            self._failures[name] = count
            if count >= self.config.max_failures:
                reasons[name] = (
                    f"{why}, {count} consecutive failures (max {self.config.max_failures})"
                )
                continue
            m = block.mats
            if previous.dtype != m.dtype or previous.device != m.device:
                previous = previous.to(dtype=m.dtype, device=m.device)
                self._inverses[name] = previous
            results[name] = previous
            tally.kept.append(name)

        self.last_report = InversionReport(
            inverted=tuple(tally.inverted),
            retried=tuple(tally.retried),
            recovered=tuple(tally.recovered),
            nonfinite=tuple(tally.nonfinite),
            kept=tuple(tally.kept),
            raised=tuple(reasons),
            batched_calls=tally.calls,
        )
        if reasons:
            raise InversionError(reasons)
        return {name: results[name] for name in named}

    def state_dict(self) -> dict[str, Any]:
        """``{"inverses": {name: Tensor}, "failures": {name: int}}`` (tensors not copied)."""
        return {"inverses": dict(self._inverses), "failures": dict(self._failures)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`; validated before anything is replaced."""
        if not isinstance(state, Mapping) or set(state) != {"inverses", "failures"}:
            raise ValueError("state must be a mapping with exactly 'inverses' and 'failures'")
        inverses, failures = state["inverses"], state["failures"]
        if not isinstance(inverses, Mapping) or not isinstance(failures, Mapping):
            raise ValueError("'inverses' and 'failures' must be mappings")
        if set(inverses) != set(failures):
            raise ValueError("'inverses' and 'failures' must name the same blocks")
        for name, inv in inverses.items():
            if not isinstance(name, str | tuple) or not isinstance(inv, Tensor):
                raise ValueError(f"inverse for {name!r} must be a Tensor keyed by a name")
            if inv.ndim not in (2, 3) or inv.shape[-1] != inv.shape[-2]:
                raise ValueError(f"inverse for {name!r} has bad shape {tuple(inv.shape)}")
        for name, count in failures.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"failure count for {name!r} must be an int >= 0, got {count!r}")
        self._inverses = {name: inv.detach().clone() for name, inv in inverses.items()}
        self._failures = {name: int(count) for name, count in failures.items()}
        self._eig.clear()
