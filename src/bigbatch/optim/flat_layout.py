"""One flat buffer per optimizer: where each parameter lives inside it.

The NLCG family needs global dot products over every parameter. Keeping its state in a
single contiguous buffer makes every dot product one ``torch.dot`` and every element-wise
update one kernel, while ``torch._foreach_*`` moves gradients in and updates out. This module
only maps parameters to slices; it holds no optimizer logic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FlatLayout", "state_dtype_for"]


def state_dtype_for(params: Sequence[Tensor]) -> torch.dtype:
    """float64 if any parameter is float64, else float32 (also for bf16/fp16 parameters)."""
    return torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32


@dataclass(frozen=True)
class FlatLayout:
    """Parameters in param-group order, with their offsets in a flat buffer.

    ``group_bounds[i]`` is the ``(start, stop)`` element range of param group ``i``, and
    ``group_params[i]`` its parameters, so per-group scalars (learning rate, weight decay)
    apply to contiguous slices.
    """

    params: tuple[Tensor, ...]
    offsets: tuple[int, ...]
    group_bounds: tuple[tuple[int, int], ...]
    group_param_ranges: tuple[tuple[int, int], ...]
    numel: int
    device: torch.device
    dtype: torch.dtype

    @staticmethod
    def from_groups(groups: Sequence[Sequence[Tensor]]) -> FlatLayout:
        params: list[Tensor] = []
        offsets: list[int] = []
        bounds: list[tuple[int, int]] = []
        ranges: list[tuple[int, int]] = []
        total = 0
        for group in groups:
            start, first = total, len(params)
            for p in group:
                params.append(p)
                offsets.append(total)
                total += p.numel()
            bounds.append((start, total))
            ranges.append((first, len(params)))
        if not params:
            raise ValueError("the optimizer got an empty parameter list")
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(
                f"all parameters must be on one device, got {sorted(map(str, devices))}"
            )
        return FlatLayout(
            params=tuple(params),
            offsets=tuple(offsets),
            group_bounds=tuple(bounds),
            group_param_ranges=tuple(ranges),
            numel=total,
            device=params[0].device,
            dtype=state_dtype_for(params),
        )

    def empty(self) -> Tensor:
        return torch.empty(self.numel, device=self.device, dtype=self.dtype)

    def zeros(self) -> Tensor:
        return torch.zeros(self.numel, device=self.device, dtype=self.dtype)

    def views(self, flat: Tensor, first: int = 0, stop: int | None = None) -> list[Tensor]:
        """Views of ``flat`` shaped like parameters ``first:stop`` (no copy)."""
        stop = len(self.params) if stop is None else stop
        return [
            flat[o : o + p.numel()].view_as(p)
            for p, o in zip(self.params[first:stop], self.offsets[first:stop], strict=True)
        ]

    def group_views(self, flat: Tensor, group: int) -> list[Tensor]:
        first, stop = self.group_param_ranges[group]
        return self.views(flat, first, stop)

    def group_slice(self, flat: Tensor, group: int) -> Tensor:
        start, stop = self.group_bounds[group]
        return flat[start:stop]

    def gather(
        self, tensors: Sequence[Tensor | None], out: Tensor, views: Sequence[Tensor] | None = None
    ) -> Tensor:
        """Copy per-parameter tensors into ``out`` (``None`` becomes zeros), casting dtype.

        ``views`` may pass ``self.views(out)`` when the caller has them cached.
        """
        views = self.views(out) if views is None else views
        present = [(v, t) for v, t in zip(views, tensors, strict=True) if t is not None]
        if len(present) < len(tensors):
            out.zero_()
        if present:
            dst, src = zip(*present, strict=True)
            torch._foreach_copy_(list(dst), list(src))
        return out
