"""Ctrl-C during training: finish the current step, save a checkpoint, then stop.

The first SIGINT only sets a flag that the loop checks between steps (a step is never cut
in half); a second one interrupts at once, as Python normally does. Outside the main
thread (where signal handlers cannot be installed) Ctrl-C keeps its usual behaviour.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

__all__ = ["GracefulInterrupt", "TrainingInterrupted"]


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
