"""Typed names of the curvature engine: block kinds, statistic factors and their keys.

A statistic is keyed by ``(block name, Factor)``; checkpoints store these keys as nested
plain dicts ``{block: {factor value: tensor}}`` (:func:`nest` / :func:`unnest`), so that
``torch.load(weights_only=True)`` reads them. Nothing here computes anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any, Literal, TypeVar

__all__ = [
    "KFAC_APPROX",
    "BlockKind",
    "Factor",
    "KFACApprox",
    "StatKey",
    "nest",
    "unnest",
]


class BlockKind(str, Enum):
    """What kind of Fisher block a block is (one class, one file under ``blocks/``)."""

    LINEAR = "linear"
    CONV2D = "conv2d"
    NORM = "norm"
    EMBEDDING = "embedding"
    ATTENTION = "attention"


class Factor(str, Enum):
    """One statistic of a block.

    ``A``/``G``: the input-side and output-gradient-side Kronecker factors; ``F``: the
    unit-wise 2x2 Fisher of a normalisation layer; ``HEAD_A``/``HEAD_G``: the factors of an
    embedding weight's second use as a linear layer (a tied language-model head).
    """

    A = "A"
    G = "G"
    F = "F"
    HEAD_A = "head_A"
    HEAD_G = "head_G"


StatKey = tuple[str, Factor]

KFACApprox = Literal["expand", "reduce"]
#: which Fisher the statistics estimate: the empirical one, or Monte Carlo labels
FisherType = Literal["empirical", "mc"]
KFAC_APPROX: tuple[KFACApprox, ...] = ("expand", "reduce")

V = TypeVar("V")


def nest(flat: Mapping[tuple[str, Any], V]) -> dict[str, dict[str, V]]:
    """``{(block, factor): v}`` -> ``{block: {factor value: v}}`` (plain, loadable types)."""
    out: dict[str, dict[str, V]] = {}
    for (block, factor), value in flat.items():
        key = factor.value if isinstance(factor, Enum) else str(factor)
        out.setdefault(block, {})[key] = value
    return out


def unnest(nested: Mapping[str, Mapping[str, V]], what: str) -> dict[StatKey, V]:
    """Inverse of :func:`nest` for statistic keys; a ``ValueError`` names a bad entry."""
    if not isinstance(nested, Mapping):
        raise ValueError(f"curvature state {what!r} must be a mapping, got {type(nested).__name__}")
    out: dict[StatKey, V] = {}
    for block, factors in nested.items():
        if not isinstance(block, str) or not isinstance(factors, Mapping):
            raise ValueError(
                f"curvature state {what!r}: entry {block!r} is not a block name with its "
                "factors (a checkpoint from bigbatch < 0.2 has another layout; start the "
                "optimizer afresh)"
            )
        for factor, value in factors.items():
            try:
                out[(block, Factor(factor))] = value
            except ValueError:
                raise ValueError(
                    f"curvature state {what!r}: unknown factor {factor!r} of block {block!r}"
                ) from None
    return out
