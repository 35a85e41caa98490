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
  :data:`WATCH_INTERVAL_S` seconds, with a message, instead of training on unsupervised;
- while it waits, the launcher watches the workers' states (``rank_watch.py``): a rank
  stopped longer than the stall limit is named and ended; when the job fails, the rank
  torchrun found failing first is named in the last line.

The parent-death signal is used only for the agent, which the launcher starts from its
main thread; workers use the watcher, since torchrun may start them from another thread
(a parent-death signal follows the creating thread). Not here: what workers do on SIGINT
(``interrupt.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from bigbatch.train.rank_watch import POLL_S, RANKS_DIR_ENV, RankWatch, stall_limit

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
    ranks_dir = Path(tempfile.mkdtemp(prefix="bigbatch-ranks-"))
    watch = RankWatch(ranks_dir, stall_limit()) if Path("/proc/self/stat").exists() else None
    proc = subprocess.Popen(
        list(command),
        env={**env, RANKS_DIR_ENV: str(ranks_dir)},
        start_new_session=True,
        preexec_fn=preexec,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    relay = _StderrRelay(proc)
    received: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        relay.hold_from_now()  # torchrun's traceback of its own SIGINT says nothing
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)  # a graceful stop: checkpoint, then exit

    previous = {
        sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    }
    try:
        while True:
            try:
                code = proc.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                ended = watch.check() if watch is not None else None
                if ended is not None:  # torchrun's report of the killed rank adds nothing
                    relay.hold_from_now()
                    print(ended, file=sys.stderr, flush=True)
            except KeyboardInterrupt:  # pragma: no cover - SIGINT is forwarded above
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        user_error = relay.user_error()
        stalled = watch is not None and watch.ended is not None
        graceful = bool(received) and relay.saw_graceful_stop
        relay.finish(show_held=not (user_error or stalled or graceful))
        shutil.rmtree(ranks_dir, ignore_errors=True)
    if stalled:
        return 1
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
    if user_error:
        return 2  # a worker's one-line "bigbatch: error" said it all
    if code < 0:
        name = signal.Signals(-code).name
        print(
            f"bigbatch: the torchrun agent was killed by {name}; its workers stop themselves "
            f"within {WATCH_INTERVAL_S:.0f} s",
            file=sys.stderr,
        )
        return 1
    first = relay.first_failure() if code != 0 else None
    if first is not None:
        print(
            f"bigbatch: error: {first} failed first; torchrun stopped the others (continue "
            "from the last checkpoint with --resume)",
            file=sys.stderr,
        )
    return code


class _StderrRelay:
    """Passes torchrun's stderr (the workers' too) through, except torchrun's own report of
    a job whose end bigbatch has already explained: after a ``bigbatch: error`` line, a
    forwarded signal or a stalled rank ended by the launcher, torchrun's tracebacks and
    failure summary are held back, and dropped if the end was the explained one (status 2
    after a user error, the workers' "interrupted; checkpoint saved" after a signal, the
    stalled rank), shown otherwise. Lines starting ``bigbatch:`` always pass."""

    _TORCHRUN = re.compile(r"^(Traceback|[EWI]\d{4} |=+$|\[\d|\[rank\d+\]:|torch\.distributed|  )")

    _ROOT_CAUSE = "Root Cause (first observed failure):"
    _RANK = re.compile(r"^\s*rank\s*: (\d+)")
    _EXIT = re.compile(r"^\s*exitcode\s*: (-?\d+) \(pid: (\d+)\)\s*(\((\w+)\))?")

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.held: list[str] = []
        self._saw_error = False
        self.saw_graceful_stop = False
        self._in_root_cause = False
        self._root: dict[str, str] = {}
        self._thread = threading.Thread(target=self._run, args=(proc,), daemon=True)
        self._thread.start()

    def _run(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self._parse_root_cause(line)
            if line.startswith("bigbatch:"):  # the workers' own words always pass
                self._saw_error |= line.startswith("bigbatch: error")
                self.saw_graceful_stop |= "interrupted; checkpoint saved" in line
                sys.stderr.write(line)
            elif self._saw_error and (self.held or self._TORCHRUN.match(line)):
                self.held.append(line)
            else:
                sys.stderr.write(line)
            sys.stderr.flush()

    def _parse_root_cause(self, line: str) -> None:
        """Read the rank, pid and exit status from torchrun's "Root Cause" section."""
        if line.startswith(self._ROOT_CAUSE):
            self._in_root_cause = True
        elif self._in_root_cause:
            if (rank := self._RANK.match(line)) is not None:
                self._root["rank"] = rank.group(1)
            elif (status := self._EXIT.match(line)) is not None:
                self._root["exitcode"], self._root["pid"] = status.group(1), status.group(2)
                self._root["signal"] = status.group(4) or ""
            elif line.startswith("="):
                self._in_root_cause = False

    def first_failure(self) -> str | None:
        """The first failed rank from torchrun's report ("rank R (pid P, killed by SIG)")."""
        self._thread.join(timeout=10)
        if "rank" not in self._root or "pid" not in self._root:
            return None
        how = (
            f"killed by {self._root['signal']}"
            if self._root.get("signal")
            else f"exit code {self._root['exitcode']}"
        )
        return f"rank {self._root['rank']} (pid {self._root['pid']}, {how})"

    def hold_from_now(self) -> None:
        """Hold torchrun's reports from here on (the launcher has said what happened)."""
        self._saw_error = True

    def user_error(self) -> bool:
        """Whether the job stopped on a worker's user error (exit status 2)."""
        self._thread.join(timeout=10)
        return self._saw_error and any(
            "exitcode: 2)" in line or "exitcode  : 2 " in line for line in self.held
        )

    def finish(self, show_held: bool) -> None:
        self._thread.join(timeout=10)
        if show_held and self.held:
            sys.stderr.writelines(self.held)
            sys.stderr.flush()


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
