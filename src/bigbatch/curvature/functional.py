"""Functional uses of known weights: ``F.linear(x, W[rows])`` and ``x @ W.T`` seen in flight.

A ``__torch_function__`` mode (:class:`FunctionalUses`) that the capture pushes only while a
forward that may use block weights functionally runs (an ``nn.MultiheadAttention``, a tied
head, the model's forward when an embedding could serve as a tied head) and only on steps
that record statistics. For every ``F.linear`` whose weight is a known parameter or a row
slice of one (``in_proj_weight.chunk(3)``), and every ``matmul`` with the transpose of a
known weight, it computes the op and hands ``(input, parameter, row range, output)`` to the
block kind that claimed the weight (:class:`~bigbatch.curvature.blocks.base.LinearUser`).
``F.multi_head_attention_forward`` is re-dispatched with the mode kept on, so its internal
projections are seen; every other op runs unchanged (one Python call of overhead each).

Needs ``torch.overrides.redispatch_function`` (present in the supported torch releases);
where it is missing, :data:`AVAILABLE` is false and attention is refused with that reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from bigbatch.curvature.blocks.base import LinearUser, Recorder

__all__ = ["AVAILABLE", "FunctionalUses"]

_redispatch: Callable[..., Any] | None = getattr(torch.overrides, "redispatch_function", None)
AVAILABLE = _redispatch is not None

_LINEAR = F.linear
_MATMULS = (torch.matmul, Tensor.matmul, Tensor.__matmul__)
_MHA = F.multi_head_attention_forward


class FunctionalUses(TorchFunctionMode):
    """Routes the functional uses of known weights to their kinds (see the module docstring)."""

    def __init__(self, recorder: Recorder, users: Mapping[Tensor, LinearUser]) -> None:
        super().__init__()
        self.recorder = recorder
        self._users = {id(w): (w, user) for w, user in users.items()}

    def _rows_of(self, w: Tensor) -> tuple[Tensor, LinearUser, int, int] | None:
        """``(parameter, user, start, stop)`` when ``w`` is a known weight or rows of one."""
        entry = self._users.get(id(w))
        if entry is not None:
            return entry[0], entry[1], 0, int(w.shape[0])
        base = w._base
        if base is None or (entry := self._users.get(id(base))) is None:
            return None
        if w.dim() != base.dim() or w.shape[1:] != base.shape[1:] or w.stride() != base.stride():
            return None
        offset, row = w.storage_offset() - base.storage_offset(), base.stride(0)
        if row <= 0 or offset % row:
            return None
        start = offset // row
        return entry[0], entry[1], start, start + int(w.shape[0])

    def _transposed(self, wt: Tensor) -> tuple[Tensor, LinearUser, int, int] | None:
        """The same for ``wt = W.T`` of a whole known 2-D weight (``x @ W.T``)."""
        base = wt._base
        if wt.dim() != 2 or base is None or (entry := self._users.get(id(base))) is None:
            return None
        if (
            base.dim() == 2
            and tuple(wt.shape) == tuple(base.shape)[::-1]
            and tuple(wt.stride()) == tuple(base.stride())[::-1]
            and wt.storage_offset() == base.storage_offset()
        ):
            return entry[0], entry[1], 0, int(base.shape[0])
        return None

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is _MHA and _redispatch is not None:
            with self:  # keep watching inside: its projections are F.linear calls
                return _redispatch(func, types, args, kwargs)
        out = func(*args, **kwargs)
        if not isinstance(out, Tensor) or not self.recorder.recording():
            return out
        found = None
        x: Any = None
        if func is _LINEAR:
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(w, Tensor):
                found = self._rows_of(w)
        elif func in _MATMULS and len(args) >= 2 and isinstance(args[1], Tensor):
            x = args[0]
            found = self._transposed(args[1])
        if found is not None and isinstance(x, Tensor):
            param, user, start, stop = found
            user.on_linear(self.recorder, x, param, start, stop, out)
        return out
