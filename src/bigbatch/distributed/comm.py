"""Packed collectives over ``torch.distributed`` with a byte counter per collective.

The one small communication interface the distributed curvature code uses: a sum
all-reduce of one packed buffer, a reduce-scatter of variable-size per-owner buffers and an
all-gather of variable-size per-owner results, plus the packing of symmetric matrices as one
triangle. It works with any initialised process group (gloo on CPU, NCCL on GPU).

Reduce-scatter of variable sizes (our choice): NCCL's ``reduce_scatter_tensor`` needs equal
chunks, and gloo has no reduce-scatter for arbitrary sizes. On NCCL the segments are padded
to the largest and reduce-scattered in one call; on every other backend each owner's segment
is summed onto it with one ``dist.reduce`` per non-empty segment (``world_size`` small calls,
but each rank only sends what the other owners need, unlike one all-reduce of the packed
buffer, which moves every segment to every rank at twice the bytes). Variable-size
all-gathers: on NCCL every segment is padded to the largest for one ``dist.all_gather``; on
other backends, one ``dist.broadcast`` per owner's segment, so that a rank owning one big
Fisher block does not make every rank send that block's size.

Bytes are counted as what one rank sends under the bandwidth-optimal algorithm of each call
(the model benchmarks report as "bytes sent per rank"): all-reduce of ``S`` bytes:
``2 (W-1)/W S``; per-owner reduce: the segments of the other owners, ``S - s_rank``; padded
reduce-scatter and all-gather: ``(W-1) max_k s_k``; one broadcast per segment (pipelined,
averaged over the ranks): ``(W-1)/W sum_k s_k``. ``W = 1`` sends nothing.

This module knows nothing about Fisher blocks or optimizers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "ByteCounter",
    "Communicator",
    "pack_symmetric",
    "symmetric_numel",
    "unpack_symmetric",
]

_TRIU: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = {}


def _triu(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    key = (n, device)
    if key not in _TRIU:
        rows, cols = torch.triu_indices(n, n, device=device)
        _TRIU[key] = (rows, cols)
    return _TRIU[key]


def symmetric_numel(n: int) -> int:
    """Entries of one triangle (diagonal included) of an ``n x n`` matrix."""
    return n * (n + 1) // 2


def pack_symmetric(mat: Tensor) -> Tensor:
    """The upper triangle of the last two (equal) dimensions, flattened: ``(..., n(n+1)/2)``."""
    rows, cols = _triu(mat.shape[-1], mat.device)
    return mat[..., rows, cols]


def unpack_symmetric(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_symmetric`: the full symmetric ``(..., n, n)`` matrix."""
    rows, cols = _triu(n, packed.device)
    out = packed.new_empty((*packed.shape[:-1], n, n))
    out[..., rows, cols] = packed
    out[..., cols, rows] = packed
    return out


@dataclass
class ByteCounter:
    """Calls and bytes sent by this rank, per collective tag (e.g. ``"grads+stats"``)."""

    calls: dict[str, int] = field(default_factory=dict)
    bytes_sent: dict[str, int] = field(default_factory=dict)

    def add(self, tag: str, nbytes: int) -> None:
        self.calls[tag] = self.calls.get(tag, 0) + 1
        self.bytes_sent[tag] = self.bytes_sent.get(tag, 0) + int(nbytes)

    @property
    def total(self) -> int:
        return sum(self.bytes_sent.values())

    def reset(self) -> None:
        self.calls.clear()
        self.bytes_sent.clear()


class Communicator:
    """Sum collectives of packed 1-D buffers on ``group`` (default: the world group).

    Every rank must make the same calls with the same segment sizes in the same order.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "distributed SP-NGD needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group, e.g. under torchrun)"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.counter = ByteCounter()

    def _global(self, k: int) -> int:
        return k if self.group is None else dist.get_global_rank(self.group, k)

    def all_reduce(self, buf: Tensor, tag: str) -> Tensor:
        """Sum ``buf`` over ranks in place and return it."""
        w = self.world_size
        if w > 1 and buf.numel():
            dist.all_reduce(buf, group=self.group)
            self.counter.add(tag, 2 * (w - 1) * _nbytes(buf) // w)
        return buf

    def reduce_scatter(self, segments: Sequence[Tensor], tag: str) -> Tensor:
        """``segments[k]`` (1-D, one dtype) summed over ranks, returned on rank ``k`` only.

        Returns this rank's summed segment (the others are left in an unspecified state).
        """
        w = self.world_size
        if len(segments) != w:
            raise ValueError(f"need {w} segments (one per rank), got {len(segments)}")
        mine = segments[self.rank]
        if w == 1:
            return mine
        sizes = [s.numel() for s in segments]
        if self.backend == "nccl":
            width = max(sizes)
            if width == 0:
                return mine
            padded = mine.new_zeros((w, width))
            for k, s in enumerate(segments):
                padded[k, : sizes[k]] = s
            out = mine.new_empty(width)
            dist.reduce_scatter_tensor(out, padded.reshape(-1), group=self.group)
            self.counter.add(tag, (w - 1) * width * mine.element_size())
            return out[: sizes[self.rank]]
        sent = 0
        for k, s in enumerate(segments):
            if s.numel() == 0:
                continue
            dist.reduce(s, dst=self._global(k), group=self.group)
            if k != self.rank:
                sent += _nbytes(s)
        self.counter.add(tag, sent)
        return mine

    def all_gather(self, segment: Tensor, sizes: Sequence[int], tag: str) -> list[Tensor]:
        """Every rank's 1-D ``segment`` (rank ``k``'s has ``sizes[k]`` elements), on every rank."""
        w = self.world_size
        if len(sizes) != w or sizes[self.rank] != segment.numel():
            raise ValueError(f"sizes {list(sizes)} do not match this rank's segment")
        if w == 1:
            return [segment]
        width = max(sizes)
        if width == 0:
            return [segment.new_empty(0) for _ in range(w)]
        if self.backend != "nccl" and min(sizes) != width:
            return self._broadcast_each(segment, sizes, tag)
        padded = segment.new_zeros(width)
        padded[: segment.numel()] = segment
        out = [segment.new_empty(width) for _ in range(w)]
        dist.all_gather(out, padded, group=self.group)
        self.counter.add(tag, (w - 1) * width * segment.element_size())
        return [o[:n] for o, n in zip(out, sizes, strict=True)]

    def _broadcast_each(self, segment: Tensor, sizes: Sequence[int], tag: str) -> list[Tensor]:
        """Uneven all-gather as one broadcast per non-empty segment: ``(W-1)/W sum_k s_k``
        bytes per rank instead of the padded all-gather's ``(W-1) max_k s_k``."""
        w = self.world_size
        out = []
        for k, n in enumerate(sizes):
            buf = segment if k == self.rank else segment.new_empty(n)
            if n:
                dist.broadcast(buf, src=self._global(k), group=self.group)
            out.append(buf)
        total = sum(sizes) * segment.element_size()
        self.counter.add(tag, (w - 1) * total // w)
        return out


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()
