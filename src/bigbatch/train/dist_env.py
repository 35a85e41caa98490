"""Data-parallel training under ``torchrun``: the process group, rank helpers, collectives.

A run is distributed when the launcher's environment says so (``WORLD_SIZE`` > 1, with
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, as ``torchrun`` sets them):
:func:`init_from_env` then joins the process group (``env://`` rendezvous; NCCL when the run
trains on CUDA, gloo on the CPU) with a timeout on every collective, so that a rank that
died or hangs makes the others fail instead of waiting forever. The timeout is
``BIGBATCH_DIST_TIMEOUT`` seconds (default 300). Without such an environment nothing is
initialised and :func:`context` describes a single process: rank 0 of 1.

The helpers: :func:`check_distributed` (the configuration errors a world size can cause),
:func:`all_reduce_sum` (bucketed, flattened all-reduce of many tensors),
:func:`from_main` (run something on rank 0 only, e.g. read a file, and give every rank its
result or its exception) and :func:`raise_together` (one rank failed during a step: every
rank raises, the failing one its own error, the others :class:`PeerRankError` naming it).

Not here: what is reduced when (the training loop, ``loop.py``; evaluation, ``evaluate.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.distributed_c10d import PrefixStore
from torch.distributed.rendezvous import rendezvous

from bigbatch.train.config import ConfigError
from bigbatch.train.optimizers import optimizer_spec

__all__ = [
    "RESTART_ENV",
    "TIMEOUT_ENV",
    "DistContext",
    "PeerRankError",
    "all_reduce_sum",
    "barrier",
    "check_distributed",
    "context",
    "env_world_size",
    "from_main",
    "init_from_env",
    "launch_id",
    "local_device",
    "raise_together",
    "restarted_by_launcher",
    "shutdown",
]

T = TypeVar("T")

#: Seconds a collective may wait for the other ranks before it fails.
TIMEOUT_ENV = "BIGBATCH_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
#: Set by torchrun: how many times it has restarted the workers of this job.
RESTART_ENV = "TORCHELASTIC_RESTART_COUNT"
#: Elements per all-reduce bucket (16 Mi float32 values = 64 MiB).
BUCKET_ELEMENTS = 1 << 24

_initialised_here = False


class PeerRankError(RuntimeError):
    """Another rank failed during a step; this rank stops too."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the world size, its rank on the machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """The device of the tensors the backend reduces (CUDA for NCCL, else the CPU)."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def shard(self, n: int) -> tuple[int, int]:
        """``[start, stop)`` of this rank's contiguous share of ``n`` items."""
        return n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def restarted_by_launcher() -> bool:
    """True in a process torchrun started again after a failure (``--max-restarts``)."""
    try:
        return int(os.environ.get(RESTART_ENV, "0")) > 0
    except ValueError:
        return False


def launch_id() -> str | None:
    """torchrun's id of this job (``TORCHELASTIC_RUN_ID``; kept across its restarts)."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def _timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} must be a number of seconds") from None
    if not seconds > 0:
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} must be > 0 seconds")
    return timedelta(seconds=seconds)


def context() -> DistContext:
    """The current process group's view (a single process when none is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    world = dist.get_world_size()
    return DistContext(
        rank=dist.get_rank(),
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        backend=str(dist.get_backend()),
    )


def init_from_env(device: str) -> DistContext:
    """Join the process group described by the environment, once; return the context.

    ``device`` is ``train.device`` ("auto", "cpu", "cuda"): NCCL when it means CUDA (each
    process then uses the GPU ``LOCAL_RANK``), gloo otherwise. A single process
    (``WORLD_SIZE`` unset or 1) initialises nothing. An already initialised process group
    (e.g. set up by the caller) is used as it is.
    """
    global _initialised_here
    if dist.is_available() and dist.is_initialized():
        return context()
    if env_world_size() <= 1:
        return DistContext()
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ConfigError("train.device is 'cuda' but no CUDA device is available")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = _timeout()
    backend = "nccl" if use_cuda else "gloo"
    if restarted_by_launcher():
        # After a torchrun restart the agent's store still holds the failed attempt's keys
        # (e.g. gloo's peer addresses): a fresh prefix per attempt keeps the new group from
        # reading them and connecting to processes that are gone.
        store, rank, world = next(rendezvous("env://", timeout=timeout))
        dist.init_process_group(
            backend=backend,
            store=PrefixStore(f"bigbatch/attempt_{os.environ[RESTART_ENV]}/", store),
            rank=rank,
            world_size=world,
            timeout=timeout,
        )
    else:
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    _initialised_here = True
    return context()


def shutdown(*, together: bool = True) -> None:
    """Leave the process group if :func:`init_from_env` joined it.

    ``together``: wait for every rank first (a barrier), so that no rank tears down its
    connections while another still uses them; pass False after an error, when a peer
    may be gone.
    """
    global _initialised_here
    if _initialised_here and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()
    _initialised_here = False


def local_device(device: torch.device, ctx: DistContext) -> torch.device:
    """``device`` made explicit for this rank (``cuda`` becomes ``cuda:LOCAL_RANK``)."""
    if ctx.enabled and device.type == "cuda" and device.index is None:
        return torch.device("cuda", ctx.local_rank)
    return device


def check_distributed(
    world_size: int,
    *,
    batch_sizes: Iterable[int],
    micro_batch_size: int,
    optimizers: Iterable[str],
    options: Mapping[str, Mapping[str, Any]] | None = None,
    options_key: str = "optimizer.options",
) -> None:
    """The configuration errors of a data-parallel run with ``world_size`` processes.

    Every rank takes ``batch_size / world_size`` samples of each global batch and splits
    them into micro-batches, so ``train.batch_size`` must be divisible by
    ``world_size * train.micro_batch_size`` (by ``world_size`` with micro-batch 0 or -1).
    ``options`` (constructor options per optimizer name; ``options_key`` names them in
    messages, ``{name}`` filled in) are kept for checks of what has no distributed mode
    (every optimizer here has one).
    """
    if world_size <= 1:
        return
    for name in optimizers:
        spec = optimizer_spec(name, "optimizer.name")  # an unknown name fails here already
        given = (options or {}).get(name, {})
        if not spec.capabilities({**spec.defaults, **given}).distributed:
            raise ConfigError(
                f"optimizer {name!r} ({spec.label}) runs in one process only, not in a "
                f"data-parallel job of {world_size} processes"
            )
    for batch in batch_sizes:
        per_rank = world_size * max(micro_batch_size, 1)
        if batch % per_rank != 0:
            detail = (
                f"the number of processes ({world_size}) times train.micro_batch_size "
                f"({micro_batch_size}) = {per_rank}"
                if micro_batch_size > 0
                else f"the number of processes ({world_size})"
            )
            raise ConfigError(
                f"train.batch_size ({batch}) must be divisible by {detail}: every rank "
                "takes an equal share of each global batch in whole micro-batches"
            )


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def all_reduce_sum(tensors: list[Tensor], ctx: DistContext) -> None:
    """Sum ``tensors`` over the ranks in place, a few flattened buckets at a time."""
    if not ctx.enabled or not tensors:
        return
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    comm = ctx.comm_device
    for members in groups.values():
        bucket: list[Tensor] = []
        size = 0
        for t in members:
            if bucket and size + t.numel() > BUCKET_ELEMENTS:
                _reduce_bucket(bucket, comm)
                bucket, size = [], 0
            bucket.append(t)
            size += t.numel()
        if bucket:
            _reduce_bucket(bucket, comm)


def _reduce_bucket(bucket: list[Tensor], comm: torch.device) -> None:
    flat = torch.cat([t.reshape(-1) for t in bucket]).to(comm)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in bucket:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def from_main(ctx: DistContext, fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 only; every rank returns its result or raises its exception."""
    if not ctx.enabled:
        return fn()
    payload: list[Any] = [None]
    if ctx.is_main:
        try:
            payload = [("ok", fn())]
        except Exception as exc:
            payload = [("error", exc)]
    dist.broadcast_object_list(payload, src=0, device=ctx.comm_device)
    kind, value = payload[0]
    if kind == "error":
        raise value
    result: T = value
    return result


def raise_together(ctx: DistContext, error: BaseException | None, what: str) -> None:
    """Some rank failed (every rank calls this): raise its error everywhere.

    The failing ranks re-raise their own exception; the others raise
    :class:`PeerRankError` with the first failing rank's message.
    """
    message = None if error is None else f"{type(error).__name__}: {error}"
    messages: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(messages, message)
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    rank, text = failed[0] if failed else (-1, "unknown error")
    raise PeerRankError(f"rank {rank} failed {what}: {text}")
