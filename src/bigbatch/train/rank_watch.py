"""The launcher's watch over its ranks: a stopped worker is named in one line and ended.

Each worker, started by torchrun under ``bigbatch --nproc N``, writes its pid to a file
per rank in a folder the launcher made (:data:`RANKS_DIR_ENV`); the launcher reads the
workers' states from ``/proc`` every :data:`POLL_S` seconds while it waits for the job:

- a rank *stopped* (SIGSTOP, Ctrl-Z of that process, a debugger's stop) for
  :data:`DEFAULT_STALL_LIMIT_S` seconds (``--stall-limit`` / :data:`STALL_LIMIT_ENV`) is
  named and killed, so that the job ends (the other ranks, waiting for it in a collective,
  fail at once when its connections close) instead of waiting for the collective timeout;
  the launcher exits with status 1 and says to continue with ``--resume``.

A rank that *died* is named by the launcher from torchrun's own report of the first failure
(``process_lifetime.py``): torchrun tears the other ranks down faster than a poll sees it.

Bound: a stopped rank is named within the stall limit plus :data:`POLL_S`; the job ends
within seconds after (torchrun tears the others down). A rank that runs but never returns
from a step (a hang in Python or a kernel) is not seen here: the collective timeout
(``--dist-timeout``) ends that job. Without ``/proc`` (not Linux) nothing is watched.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from bigbatch.train.config import ConfigError

__all__ = [
    "DEFAULT_STALL_LIMIT_S",
    "POLL_S",
    "RANKS_DIR_ENV",
    "STALL_LIMIT_ENV",
    "RankWatch",
    "announce_worker",
    "stall_limit",
]

RANKS_DIR_ENV = "BIGBATCH_RANKS_DIR"
STALL_LIMIT_ENV = "BIGBATCH_STALL_LIMIT"
DEFAULT_STALL_LIMIT_S = 60.0
POLL_S = 1.0


def stall_limit() -> float:
    """Seconds a rank may stay stopped (:data:`STALL_LIMIT_ENV`; ``inf`` never ends it)."""
    raw = os.environ.get(STALL_LIMIT_ENV)
    if not raw:
        return DEFAULT_STALL_LIMIT_S
    try:
        seconds = float(raw)
    except ValueError:
        raise ConfigError(
            f"--stall-limit / {STALL_LIMIT_ENV}={raw!r} must be a number of seconds"
        ) from None
    if math.isnan(seconds) or seconds <= 0:
        raise ConfigError(f"--stall-limit / {STALL_LIMIT_ENV}={raw!r} must be > 0 seconds")
    return seconds


def announce_worker() -> None:
    """In a worker: record this process's pid for the launcher (when it asked for it)."""
    folder, rank = os.environ.get(RANKS_DIR_ENV), os.environ.get("RANK")
    if not folder or rank is None:
        return
    target = Path(folder) / f"rank{rank}"
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    with contextlib.suppress(OSError):  # the launcher's folder is gone: nobody watches
        tmp.write_text(f"{os.getpid()}\n")
        tmp.replace(target)


def _state(pid: int) -> str | None:
    """The process's state letter from /proc (None when it no longer exists)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


@dataclass
class RankWatch:
    """What the launcher knows of its ranks; :meth:`check` once per poll."""

    folder: Path
    limit: float
    stopped_since: dict[int, float] = field(default_factory=dict)
    ended: str | None = None

    def _ranks(self) -> dict[int, int]:
        ranks = {}
        for entry in self.folder.glob("rank*"):
            with contextlib.suppress(OSError, ValueError):
                ranks[int(entry.name[4:])] = int(entry.read_text())
        return ranks

    def check(self, now: float | None = None) -> str | None:
        """Look at every rank; returns the one-line error when a stopped rank was ended."""
        if self.ended is not None:
            return None
        now = time.monotonic() if now is None else now
        for rank, pid in sorted(self._ranks().items()):
            state = _state(pid)
            if state is None or state not in "Tt":
                self.stopped_since.pop(pid, None)
                continue
            since = self.stopped_since.setdefault(pid, now)
            if now - since >= self.limit:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                self.ended = (
                    f"bigbatch: error: rank {rank} (pid {pid}) was stopped for "
                    f"{now - since:.0f} s (SIGSTOP or a debugger; --stall-limit is "
                    f"{self.limit:g} s), so it was ended and the job with it; continue "
                    "from the last checkpoint with --resume"
                )
                return self.ended
        return None
