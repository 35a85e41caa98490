"""Who ends whom: ``bigbatch --nproc N`` owns its torchrun agent, the agent its workers.

The design (Linux; elsewhere the same minus the parent-death signal):

- the launcher starts torchrun in a new session (its own process group), with
  ``prctl(PR_SET_PDEATHSIG, SIGTERM)``: if the launcher dies, even by SIGKILL, the kernel
  sends torchrun SIGTERM, and torchrun's own handler terminates its workers;
- the launcher turns SIGINT (Ctrl-C on the terminal, or ``kill -INT`` to its pid), SIGTERM
  and SIGHUP into a SIGINT to the agent, which passes it to every worker (torchrun starts
  each in its own session): each finishes its step, the checkpoint is written, and the
  launcher exits with 130 (SIGINT) or ``128 + signal`` with a message; a worker that does
  not stop is killed by torchrun 30 s later;
- every worker watches its parent (the agent): when the agent is gone (SIGKILLed, so it
  could not stop them), the worker is re-parented and stops itself within
  :data:`WATCH_INTERVAL_S` seconds, with a message, instead of training on unsupervised.

The parent-death signal is used only for the agent, which the launcher starts from its
main thread; workers use the watcher, since torchrun may start them from another thread
(a parent-death signal follows the creating thread). Not here: what workers do on SIGINT
(``interrupt.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType

__all__ = ["WATCH_INTERVAL_S", "run_launcher", "watch_parent"]

#: how often a worker checks that its agent is alive
WATCH_INTERVAL_S = 1.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent (the launcher) dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def run_launcher(command: Sequence[str], env: dict[str, str]) -> int:
    """Run torchrun ``command`` and wait for it; returns the exit status to report."""
    preexec: Callable[[], None] | None = _die_with_parent if sys.platform == "linux" else None
    proc = subprocess.Popen(list(command), env=env, start_new_session=True, preexec_fn=preexec)
    received: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)  # a graceful stop: checkpoint, then exit

    previous = {
        sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    }
    try:
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # pragma: no cover - SIGINT is forwarded above
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    stops = [s for s in received if s != signal.SIGINT]
    if stops:
        name = signal.Signals(stops[0]).name
        print(
            f"bigbatch: stopped by {name}; the workers stopped after their step and wrote the "
            "checkpoint (continue with --resume)",
            file=sys.stderr,
        )
        return 128 + stops[0]
    if received:
        return 130 if code != 0 else code
    if code < 0:
        name = signal.Signals(-code).name
        print(
            f"bigbatch: the torchrun agent was killed by {name}; its workers stop themselves "
            f"within {WATCH_INTERVAL_S:.0f} s",
            file=sys.stderr,
        )
        return 1
    return code


def watch_parent(interval: float = WATCH_INTERVAL_S) -> None:
    """In a worker: stop this process when its parent (the torchrun agent) is gone."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                print(
                    f"bigbatch: rank {os.environ.get('RANK', '?')}: the torchrun agent is gone; "
                    "stopping this worker",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)

    threading.Thread(target=watch, name="bigbatch-parent-watch", daemon=True).start()
