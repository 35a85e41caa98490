"""Run a function on N gloo ranks on 127.0.0.1: for tests, benchmarks and quick experiments.

``run_on_ranks(fn, world_size, *args)`` spawns ``world_size`` processes, initialises a gloo
process group in each (a free local port, a collective timeout), calls
``fn(rank, world_size, *args)`` and returns the results in rank order. A child's exception
is re-raised in the parent with the child's traceback; a hung child fails the test after
``timeout`` seconds instead of hanging it. ``fn`` must be a module-level function (spawned
children import it by name). Each child uses one intra-op thread. Not a launcher for
training: use torchrun (``bigbatch train --nproc``) for that.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "run_on_ranks"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(
    rank: int,
    world_size: int,
    port: int,
    collective_timeout: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    try:
        torch.set_num_threads(1)  # N ranks share the cores; identical numerics on every rank
        if os.path.exists("/sys/class/net/lo"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=collective_timeout),
        )
        try:
            out = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, pickle.dumps(out)))  # plain bytes: no shared memory
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    collective_timeout: float = 60.0,
) -> list[Any]:
    """``[fn(rank, world_size, *args) for rank in range(world_size)]``, each in its own process."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, collective_timeout, fn, args, results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    outs: dict[int, Any] = {}
    try:
        while len(outs) < world_size:
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(
                    f"distributed test: ranks {sorted(set(range(world_size)) - set(outs))} "
                    f"gave no result within {timeout} s"
                ) from None
            if not ok:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{value}")
            outs[rank] = pickle.loads(value)
    finally:
        for proc in procs:
            proc.join(timeout=10)
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
    return [outs[r] for r in range(world_size)]
