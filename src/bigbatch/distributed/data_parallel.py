"""What the optimizers need to know about the data-parallel job they run in, found by themselves.

- :func:`unwrap`: the module inside a ``DistributedDataParallel`` wrapper (hooks go there);
  FSDP is refused (its parameters are sharded, which the curvature blocks cannot see).
- :func:`data_parallel_group`: the initialised process group with more than one rank, or
  ``None`` for a single process.
- :class:`GradientAgreement`: at the first step, whether every rank holds the same gradients
  (DDP, or a loop that all-reduces them itself) or its own (each rank's shard): then the
  optimizer averages them itself, once. Decided with one tiny all-gather of checksums.
- :class:`ConsistencyCheck`: every ``every`` steps, a float64 checksum of the parameters is
  compared across ranks; a difference raises :class:`RanksDivergedError` naming the step and
  the checksums, instead of letting ranks train apart silently.

Nothing here knows about Fisher blocks or optimizer state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "ConsistencyCheck",
    "GradientAgreement",
    "RanksDivergedError",
    "data_parallel_group",
    "unwrap",
]


class RanksDivergedError(RuntimeError):
    """The ranks of a data-parallel job no longer hold the same parameters."""


def unwrap(model: nn.Module) -> tuple[nn.Module, bool]:
    """``(module, wrapped)``: the module inside a DDP wrapper, or ``model`` itself."""
    if type(model).__name__ == "FullyShardedDataParallel":
        raise ValueError(
            "FullyShardedDataParallel is not supported: its parameters are sharded across "
            "ranks, which the Fisher blocks cannot see. Use DistributedDataParallel (or no "
            "wrapper: the optimizer then averages the gradients itself)"
        )
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module, True
    return model, False


def data_parallel_group(group: Any = None) -> Any:
    """The process group when ``torch.distributed`` is initialised with more than one rank
    (``group`` or the world), else ``None``."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_world_size(group) <= 1:
        return None
    return group if group is not None else dist.group.WORLD


def _checksum(tensors: Sequence[Tensor]) -> Tensor:
    """``(sum, sum of squares, weighted sum)`` in float64 over the tensors, on the CPU."""
    total = torch.zeros(3, dtype=torch.float64)
    for k, t in enumerate(tensors):
        v = t.detach().double()
        total += torch.stack([v.sum(), v.square().sum(), v.sum() * (k + 1)]).cpu()
    return total


def _gather(value: Tensor, group: Any) -> list[Tensor]:
    world = dist.get_world_size(group)
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
    local = value.to(device)
    out = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(out, local, group=group)
    return [t.cpu() for t in out]


class GradientAgreement:
    """Decides once whether the gradients arrive averaged (see the module docstring)."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.averaged: bool | None = None  # None until the first step decides

    def decide(self, grads: Sequence[Tensor]) -> bool:
        """Whether the gradients are the same on every rank, decided at the first call whose
        gradients are finite on every rank (a collective until then: call it on every rank);
        until decided, ``False`` (averaging gradients that agree changes nothing)."""
        if self.averaged is None:
            sums = _gather(_checksum(grads), self.group)
            if not all(bool(torch.isfinite(s).all()) for s in sums):
                return False
            self.averaged = all(torch.equal(s, sums[0]) for s in sums[1:])
        return self.averaged


class ConsistencyCheck:
    """Compares a checksum of the parameters across ranks every ``every`` steps."""

    def __init__(self, group: Any, every: int) -> None:
        self.group = group
        self.every = every

    def __call__(self, step: int, params: Sequence[Tensor], who: str) -> None:
        if not self.every or step % self.every:
            return
        sums = _gather(_checksum(params), self.group)
        if any(not torch.equal(s, sums[0]) for s in sums[1:]):
            shown = ", ".join(f"rank {r}: {float(s[0]):.17g}" for r, s in enumerate(sums))
            raise RanksDivergedError(
                f"{who}: the ranks hold different parameters after step {step} ({shown}). "
                "Every rank must run the same model on its shard with the same loss "
                "reduction (the MEAN over its shard); with DistributedDataParallel wrap the "
                "model before the first step. consistency_every=0 turns this check off."
            )
