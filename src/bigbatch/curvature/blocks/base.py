"""The contract every Fisher block kind fulfils, and what its hooks may ask of the capture.

A block kind is one class in one file of this package (see :mod:`.registry` for how to add
one). A block holds everything about its kind: which parameters (or row slices of them) it
preconditions, what its hooks record (:meth:`FisherBlock.install`, or functional uses
through :class:`LinearUser`), how a window's sums become statistics
(:meth:`FisherBlock.finalize`), their layout for communication (:meth:`FisherBlock.layout`),
its cost for owner assignment (:meth:`FisherBlock.cost`), how it is damped and inverted
(:meth:`FisherBlock.inversion_inputs`, :meth:`FisherBlock.finish_inverse`) and how it
preconditions (:meth:`FisherBlock.precondition_group`, batched over blocks that share a
:meth:`FisherBlock.batch_key`).

Normalisation (all kinds): a statistic built from inputs (``A``) is a MEAN over what it
counted (positions for K-FAC-expand, samples for K-FAC-reduce and embeddings' index
counts); one built from output gradients (``G``, unit-wise ``F``) is ``M * sum gy gy^T``
for the empirical Fisher, where ``gy`` is the gradient of the MEAN loss over the ``M``
loss terms of the batch (``M`` = the model output's entries per class: samples for a
classifier, tokens for a language model), and ``sum gy gy^T / M`` for the Monte Carlo
Fisher (``gy`` from the summed sampled loss). Their Kronecker product is then the
K-FAC approximation of the Fisher/GGN of the mean loss, as curvlinops defines it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from bigbatch.curvature.keys import BlockKind, Factor, KFACApprox

__all__ = [
    "Capturer",
    "Claim",
    "FactorValue",
    "FisherBlock",
    "LinearUser",
    "ParamSlice",
    "Recorder",
    "Refusal",
    "Sums",
]


@dataclass(frozen=True, eq=False)
class ParamSlice:
    """Rows ``[start, stop)`` (dim 0) of a parameter, or the whole of it (``stop=None``)."""

    param: Tensor
    start: int = 0
    stop: int | None = None

    @property
    def whole(self) -> bool:
        return self.stop is None

    @property
    def shape(self) -> torch.Size:
        if self.stop is None:
            return self.param.shape
        return torch.Size((self.stop - self.start, *self.param.shape[1:]))

    def of(self, t: Tensor) -> Tensor:
        """The part of ``t`` (shaped like the parameter) this slice covers."""
        return t if self.stop is None else t[self.start : self.stop]


@dataclass
class FactorValue:
    """A normalised statistic and the weight it is a mean over (to combine ranks exactly)."""

    value: Tensor
    weight: float


class Sums:
    """What one block recorded in the current refresh window, as SUMS with their counts, so
    micro-batches (and ranks) combine exactly as one large batch would."""

    __slots__ = ("_micro", "counts", "samples", "totals")

    def __init__(self) -> None:
        self.totals: dict[Factor, Tensor] = {}
        self.counts: dict[Factor, int] = {}
        self.samples = 0
        self._micro = -1

    def add(self, factor: Factor, value: Tensor, count: int) -> None:
        """Add ``value`` (a sum over ``count`` rows, positions or samples) to ``factor``."""
        total = self.totals.get(factor)
        self.totals[factor] = value if total is None else total.add_(value)
        self.counts[factor] = self.counts.get(factor, 0) + int(count)

    def saw_samples(self, micro: int, n: int) -> None:
        """Count ``n`` samples once per micro-batch (a layer called twice counts once)."""
        if micro != self._micro:
            self._micro = micro
            self.samples += int(n)


class Recorder(Protocol):
    """What block hooks may ask of the capture (implemented by ``CurvatureCapture``)."""

    @property
    def fisher(self) -> str: ...

    @property
    def approx(self) -> KFACApprox: ...

    @property
    def micro(self) -> int: ...

    def recording(self) -> bool:
        """Whether this forward records anything (grad enabled and some statistic armed)."""
        ...

    def wants(self, block: str, factor: Factor) -> bool: ...

    def grads_now(self) -> bool:
        """Whether a backward running now feeds gradient statistics (empirical vs MC)."""
        ...

    def sums(self, block: str) -> Sums: ...

    def enter_functional(self) -> None:
        """Start seeing functional (``F.linear``) uses of known weights (depth-counted)."""
        ...

    def exit_functional(self) -> None: ...


class LinearUser(Protocol):
    """Receives the functional uses ``F.linear(x, W[start:stop])`` of a weight it claimed."""

    def on_linear(
        self, recorder: Recorder, x: Tensor, param: Tensor, start: int, stop: int, out: Tensor
    ) -> None: ...


class Capturer(Protocol):
    """Installs the hooks that record one or more blocks' statistics."""

    def install(self, recorder: Recorder) -> list[RemovableHandle]: ...

    def functional_weights(self) -> Mapping[Tensor, LinearUser]:
        """Weights whose ``F.linear`` uses this capturer records, with who records them."""
        ...


@dataclass
class Claim:
    """What a block kind takes of one module: its blocks, who captures them, and the
    submodules whose parameters those blocks cover (never claimed again)."""

    blocks: list[FisherBlock]
    capturers: list[Capturer]
    consumed: tuple[nn.Module, ...] = ()
    unsupported: tuple[tuple[str, str], ...] = ()  # (parameter label, reason)


@dataclass(frozen=True)
class Refusal:
    """A module the kind recognises but cannot precondition (its parameters fall back)."""

    reason: str


class FisherBlock(ABC):
    """One Fisher block. Subclasses set :attr:`kind` and implement the abstract methods."""

    kind: ClassVar[BlockKind]
    #: factors built from output gradients (normalised by the loss-term count ``M``)
    grad_factors: ClassVar[frozenset[Factor]] = frozenset({Factor.G, Factor.F, Factor.HEAD_G})

    def __init__(self, name: str, slices: Sequence[ParamSlice]) -> None:
        self.name = name
        self.slices = tuple(slices)
        seen: dict[int, Tensor] = {}
        for s in self.slices:
            seen.setdefault(id(s.param), s.param)
        self.params: tuple[Tensor, ...] = tuple(seen.values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # ------------------------------------------------------------------ statistics
    @abstractmethod
    def factors(self) -> tuple[Factor, ...]:
        """The statistics of this block (in a fixed order)."""

    def finalize(self, factor: Factor, sums: Sums, terms: int, fisher: str) -> FactorValue | None:
        """Turn a window's sums into the statistic (``None`` when nothing was recorded).

        ``terms`` is the number of loss terms ``M`` of the window (0 when the capture could
        not read it from the model's output: then the block's sample count stands in).
        """
        total = sums.totals.get(factor)
        count = sums.counts.get(factor, 0)
        if total is None or count == 0:
            return None
        if factor in self.grad_factors:
            m = terms if terms > 0 else sums.samples
            if m <= 0:
                return None
            scale = float(m) if fisher == "empirical" else 1.0 / float(m)
            return FactorValue(total * scale, float(m))
        return FactorValue(total / count, float(count))

    @abstractmethod
    def layout(self, factor: Factor) -> tuple[tuple[int, ...], bool]:
        """``(shape, symmetric)`` of a statistic (symmetric ones travel as one triangle)."""

    @abstractmethod
    def cost(self) -> float:
        """Work (multiply-adds, up to constants) of one refresh and preconditioning."""

    # ------------------------------------------------------------------ inversion
    @abstractmethod
    def inversion_inputs(
        self, stats: Mapping[Factor, Tensor], damping: float
    ) -> dict[str, tuple[Tensor, float | Tensor]]:
        """Matrices to invert as ``M + d I`` in the engine's batched inverter, by slot."""

    def finish_inverse(
        self, stats: Mapping[Factor, Tensor], damping: float, inverted: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """The block's inverse slots from the inverter's results (default: those)."""
        return dict(inverted)

    # ------------------------------------------------------------------ preconditioning
    @abstractmethod
    def batch_key(self, inverses: Mapping[str, Tensor]) -> Hashable:
        """Blocks with equal keys are preconditioned together by one class."""

    @classmethod
    def stack_inverses(
        cls, blocks: Sequence[FisherBlock], inverses: Sequence[Mapping[str, Tensor]]
    ) -> dict[str, Tensor]:
        """The group's inverses as batches (cached by the engine until one changes)."""
        return {s: torch.stack([inv[s] for inv in inverses]) for s in inverses[0]}

    @classmethod
    @abstractmethod
    def precondition_group(
        cls,
        blocks: Sequence[FisherBlock],
        stacked: Mapping[str, Tensor],
        grads: Mapping[Tensor, Tensor],
    ) -> list[list[Tensor]]:
        """``F^-1 g`` of every block of a group: per block, one tensor per slice (in the
        slice's shape, computed in the inverses' dtype)."""
