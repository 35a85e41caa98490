"""Which modules become which Fisher blocks: the registry of block kinds.

:data:`BLOCK_TYPES` lists the kinds in the order they are asked; the first whose ``claim``
returns something other than ``None`` decides a module (a :class:`~.base.Claim` of blocks,
or a :class:`~.base.Refusal`, whose parameters then fall back to the optimizer's plain
update with the reason). A claim may consume submodules (``nn.MultiheadAttention`` takes
its ``out_proj``). Parameters of modules no kind claims are listed as unsupported.

Adding a layer kind (one file, one line here):

1. Write ``blocks/<kind>.py`` with a :class:`~.base.FisherBlock` subclass (its ``kind`` a
   new :class:`~bigbatch.curvature.keys.BlockKind` member, its factors, ``layout``, ``cost``,
   inversion and ``precondition_group``; the Kronecker math is in :mod:`.kronecker`) and a
   ``claim(name, module, sample_dim)`` classmethod returning a ``Claim`` whose capturers
   install the hooks that fill the block's sums (``install``) or receive the
   ``F.linear`` uses of its weights (``functional_weights`` / ``on_linear``).
2. Add the class to :data:`BLOCK_TYPES` below (before any kind that would claim the same
   modules, e.g. before :class:`LinearBlock` for a subclass of ``nn.Linear``).

The engine, the distributed strategies and the optimizers need nothing else: statistics
travel by the block's ``layout``, owners are balanced by its ``cost``.

Weight tying: a parameter claimed by an embedding and by ``nn.Linear`` modules (a tied
language-model head) becomes one embedding block with a head term; any other parameter
claimed twice falls back, named.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Protocol, cast

from torch import nn

from bigbatch.curvature.blocks.attention import MultiheadAttentionBlocks
from bigbatch.curvature.blocks.base import Capturer, Claim, FisherBlock, ParamSlice, Refusal
from bigbatch.curvature.blocks.conv import Conv2dBlock
from bigbatch.curvature.blocks.embedding import EmbeddingBlock
from bigbatch.curvature.blocks.linear import LinearBlock
from bigbatch.curvature.blocks.norm import UnitwiseNormBlock

__all__ = ["BLOCK_TYPES", "BlockType", "Discovery", "discover"]


class BlockType(Protocol):
    """A block kind as the registry sees it."""

    @classmethod
    def claim(cls, name: str, module: nn.Module, sample_dim: int) -> Claim | Refusal | None: ...


BLOCK_TYPES: tuple[type[BlockType], ...] = (
    MultiheadAttentionBlocks,
    LinearBlock,
    Conv2dBlock,
    UnitwiseNormBlock,
    EmbeddingBlock,
)


@dataclass
class Discovery:
    """The blocks of a model, who captures them, and the parameters without a block."""

    blocks: dict[str, FisherBlock] = field(default_factory=dict)
    capturers: list[Capturer] = field(default_factory=list)
    unsupported: list[tuple[str, str]] = field(default_factory=list)  # (parameter, reason)


def _declared_batch_first(module: nn.Module) -> bool | None:
    value = getattr(module, "batch_first", None)
    if isinstance(value, bool):
        return value
    attn = getattr(module, "self_attn", None)  # nn.TransformerEncoderLayer / DecoderLayer
    if isinstance(attn, nn.MultiheadAttention):
        return bool(attn.batch_first)
    return None


def _sample_dims(model: nn.Module) -> dict[str, int]:
    """Per module name: 1 inside the nearest ancestor declaring ``batch_first=False``."""
    declared = {name: _declared_batch_first(m) for name, m in model.named_modules()}
    dims: dict[str, int] = {}
    for name in declared:
        parts = name.split(".") if name else []
        value: bool | None = None
        for k in range(len(parts), -1, -1):
            ancestor = ".".join(parts[:k])
            if declared.get(ancestor) is not None:
                value = declared[ancestor]
                break
        dims[name] = 1 if value is False else 0
    return dims


def _trainable(module: nn.Module, label: str) -> list[tuple[str, nn.Parameter]]:
    return [
        (f"{label}.{pname}", p)
        for pname, p in module.named_parameters(recurse=False)
        if p.requires_grad
    ]


def discover(model: nn.Module, types: Sequence[type[BlockType]] | None = None) -> Discovery:
    """Ask every kind (default: :data:`BLOCK_TYPES`) about every module of ``model``."""
    types = BLOCK_TYPES if types is None else types
    found = Discovery()
    sample_dims = _sample_dims(model)
    consumed: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in consumed:
            continue
        label = name or type(module).__name__
        result: Claim | Refusal | None = None
        for kind in types:
            result = kind.claim(label, module, sample_dims.get(name, 0))
            if result is not None:
                break
        if result is None:
            reason = f"{type(module).__name__} has no Fisher block"
            found.unsupported += [(p, reason) for p, _ in _trainable(module, label)]
            continue
        if isinstance(result, Refusal):
            found.unsupported += [(p, result.reason) for p, _ in _trainable(module, label)]
            continue
        for child in result.consumed:
            consumed.add(id(child))
        found.unsupported += list(result.unsupported)
        for block in result.blocks:
            found.blocks[block.name] = block
        found.capturers += result.capturers
    _resolve_shared(found)
    return found


def _resolve_shared(found: Discovery) -> None:
    """Tie embeddings to the ``nn.Linear`` heads holding their weight; refuse other sharing."""
    claims: dict[int, list[tuple[FisherBlock, ParamSlice]]] = {}
    for block in found.blocks.values():
        for piece in block.slices:
            claims.setdefault(id(piece.param), []).append((block, piece))
    dropped: set[str] = set()
    for pieces in claims.values():
        blocks = list({id(b): b for b, _ in pieces}.values())
        if len(blocks) < 2 or any(b.name in dropped for b in blocks) or _disjoint(pieces):
            continue
        embeddings = [b for b in blocks if isinstance(b, EmbeddingBlock)]
        heads = [b for b in blocks if isinstance(b, LinearBlock)]
        if len(embeddings) == 1 and len(heads) == len(blocks) - 1:
            embedding = embeddings[0]
            embedding.tie([h.module for h in heads])
            for head in heads:
                dropped.add(head.name)
                if head.bias is not None:
                    found.unsupported.append(
                        (f"{head.name}.bias", "bias of a Linear head tied to an embedding")
                    )
            continue
        for block in blocks:
            dropped.add(block.name)
            found.unsupported.append(
                (f"{block.name} parameters", "shared with another module (tied)")
            )
    for name in dropped:
        block = found.blocks.pop(name)
        found.capturers = [c for c in found.capturers if cast(object, c) is not block]


def _disjoint(pieces: list[tuple[FisherBlock, ParamSlice]]) -> bool:
    """Whether the blocks cover disjoint row ranges of the parameter (attention's q/k/v)."""
    if any(piece.whole for _, piece in pieces):
        return False
    ranges = sorted((piece.start, piece.stop or 0) for _, piece in pieces)
    return all(prev[1] <= nxt[0] for prev, nxt in pairwise(ranges))
