"""Whether a checkpoint may be resumed under the current configuration.

A run resumes only with the configuration it was written with, except for the keys that do
not change what is computed (where the data is, threads, progress bars, how often to
checkpoint, the device) and the ``compare``/``sweep`` sections; anything else is refused with
every changed key named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bigbatch.train.checkpoint import CheckpointError

__all__ = ["RESUMABLE_CHANGES", "check_same_run"]

#: Config keys that may change between a checkpoint and its resumption.
RESUMABLE_CHANGES = {
    "data.data_dir",
    "data.download",
    "data.cache_dir",
    "train.threads",
    "train.progress",
    "train.tensorboard",
    "train.checkpoint_every",
    "train.device",
}


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "options":
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def check_same_run(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    old, new = _flatten(saved), _flatten(current)
    changed = sorted(
        k
        for k in old.keys() | new.keys()
        if old.get(k) != new.get(k)
        and k not in RESUMABLE_CHANGES
        and not k.startswith(("compare.", "sweep."))
    )
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise CheckpointError(
            f"the checkpoint {path} was written with a different configuration ({details}); "
            "resume with the same configuration or start a new run directory"
        )
