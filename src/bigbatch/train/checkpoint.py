"""Checkpoints written atomically, with a format version and a checksum.

The file is one header line, ``BIGBATCH-CHECKPOINT <format> <sha256 of the rest>``, then
the ``torch.save`` payload. It is written to a temporary file in the same folder and renamed
(``os.replace`` is atomic on POSIX and Windows when both names are on one file system), so
a crash or Ctrl-C while writing leaves the previous checkpoint intact; temporary files that
a killed writer left behind are removed by the next write. Reading checks the header and
the checksum, so a damaged file (flipped bytes, truncation) is refused with one line.
Not here: what goes into a checkpoint (the training loop decides).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "load_checkpoint",
    "resumable_step",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = 2
_MAGIC = b"BIGBATCH-CHECKPOINT"
#: temporary files older than this are a killed writer's leftovers (a live writer's is new)
_STALE_TMP_S = 60.0


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not belong to this run."""


def _remove_stale_temporaries(target: Path) -> None:
    now = time.time()
    for leftover in target.parent.glob(f".{target.name}.*.tmp"):
        try:
            if now - leftover.stat().st_mtime > _STALE_TMP_S:
                leftover.unlink()
        except OSError:
            pass


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (header, checksum, payload); return the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    header = b" ".join([_MAGIC, str(CHECKPOINT_FORMAT).encode(), digest]) + b"\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(header)
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (on the CPU), after checking
    its header and checksum."""
    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"no checkpoint at {source}")
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {source} cannot be read: {exc}") from None
    header, _, payload = data.partition(b"\n")
    fields = header.split(b" ")
    if len(fields) != 3 or fields[0] != _MAGIC:
        raise CheckpointError(
            f"{source} is not a bigbatch checkpoint of this version (no checksum header; "
            "bigbatch < 0.2 wrote another format): start the run again in a new folder"
        )
    if fields[1] != str(CHECKPOINT_FORMAT).encode():
        raise CheckpointError(
            f"{source} has checkpoint format {fields[1].decode(errors='replace')}, this "
            f"bigbatch reads format {CHECKPOINT_FORMAT}"
        )
    if hashlib.sha256(payload).hexdigest().encode() != fields[2]:
        raise CheckpointError(
            f"checkpoint {source} is damaged: its checksum does not match its content "
            "(a partial copy, or changed bytes)"
        )
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    except Exception as exc:  # a foreign payload with a forged header
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
