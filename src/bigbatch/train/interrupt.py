"""Ctrl-C during training: finish the current step, save a checkpoint, then stop.

The first SIGINT only sets a flag that the loop checks between steps (a step is never cut
in half); a second one interrupts at once, as Python normally does. Outside the main
thread (where signal handlers cannot be installed) Ctrl-C keeps its usual behaviour.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

__all__ = ["SAME_CTRL_C_S", "GracefulInterrupt", "TrainingInterrupted", "once_per_ctrl_c"]

#: Under torchrun one Ctrl-C arrives twice (from the terminal and forwarded by the launcher);
#: a repeat within this many seconds is the same Ctrl-C, not a second one.
SAME_CTRL_C_S = 2.0


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after a run was stopped by Ctrl-C and its checkpoint was written."""

    def __init__(self, checkpoint: str) -> None:
        super().__init__(f"interrupted; checkpoint saved to {checkpoint}")
        self.checkpoint = checkpoint


class GracefulInterrupt:
    """Context manager; ``requested`` turns true on the first Ctrl-C."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: object = None
        self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]


def once_per_ctrl_c(handler: Any) -> Callable[[int, FrameType | None], None]:
    """``handler``, but a SIGINT within ``SAME_CTRL_C_S`` of the previous one is dropped."""
    last = -math.inf

    def handle(signum: int, frame: FrameType | None) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last < SAME_CTRL_C_S:
            return
        last = now
        if callable(handler):
            handler(signum, frame)

    return handle
