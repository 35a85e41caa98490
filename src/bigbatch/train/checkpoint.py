"""Checkpoints written atomically: a temporary file in the same folder, then a rename.

A crash or Ctrl-C while writing leaves the previous checkpoint intact (``os.replace`` is
atomic on POSIX and Windows when both names are on one file system). Not here: what goes
into a checkpoint (the training loop decides).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "load_checkpoint", "resumable_step", "save_checkpoint"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not belong to this run."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically and return the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (on the CPU)."""
    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"no checkpoint at {source}")
    try:
        state = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise CheckpointError(f"checkpoint {source} cannot be read: {exc}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{source} is not a bigbatch checkpoint")
    return state


def resumable_step(path: str | Path, launch: str | None = None) -> int | None:
    """The step of the checkpoint at ``path`` to continue from, or None if there is none
    (or, ``launch`` given, if torchrun job ``launch`` did not write it: after a restart a
    job resumes only its own files, never an earlier job's left in the same folder)."""
    if not Path(path).is_file():
        return None
    state = load_checkpoint(path)
    if launch is not None and state.get("launch_id") != launch:
        return None
    return int(state["step"])
