"""Cache of decoded datasets, so a slow decode (60,000 JPEGs: ~9 s) happens once.

One ``.npz`` file per (dataset, source path) under ``cache_dir`` (default
``~/.cache/bigbatch/decoded``), holding the uint8 images, int64 labels and a JSON ``meta``
entry. The entry is valid only while its *stamp* matches: a hash of the loader version, the
dataset name and the path, size and mtime of every source file (plus whatever the loader
adds, such as its checksum table). A stale entry is rebuilt and overwritten; an unreadable
one is logged and rebuilt, never fatal. Writes go to a temporary file renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from bigbatch.train.data import sources
from bigbatch.train.data.base import Decoded, ImageDataset, channel_stats, to_dataset

__all__ = ["FORMAT_VERSION", "cache_path", "default_cache_dir", "file_stamps", "load_cached"]

logger = logging.getLogger(__name__)

#: Bumped when the cache layout changes; loaders add their own version to the stamp.
FORMAT_VERSION = 1
_ARRAYS = ("train_x", "train_y", "test_x", "test_y")


def default_cache_dir() -> Path:
    return sources.USER_ROOT.expanduser() / "decoded"


def file_stamps(paths: Iterable[Path]) -> list[list[Any]]:
    """``[path, size, mtime_ns]`` for each file (resolved paths, in the given order)."""
    out: list[list[Any]] = []
    for p in paths:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def cache_path(cache_dir: Path, name: str, source: Path) -> Path:
    key = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]
    return cache_dir / f"{name}-{key}.npz"


def load_cached(
    name: str,
    source: Path,
    stamp: Any,
    decode: Callable[[], Decoded],
    cache_dir: str | Path | None,
    *,
    enabled: bool = True,
) -> ImageDataset:
    """Return the dataset from the cache when its stamp matches, else decode and store it.

    ``stamp``: anything JSON-serialisable that changes whenever the decoded result would
    (use :func:`file_stamps` for the source files and add the loader's version).
    """
    label = os.path.abspath(source)  # for reports: absolute, symlinks kept
    if not enabled:
        return to_dataset(name, decode(), label)
    root = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    path = cache_path(root, name, source)
    digest = hashlib.sha256(
        json.dumps([FORMAT_VERSION, name, stamp], sort_keys=True, default=str).encode()
    ).hexdigest()
    hit = _read(path, digest)
    if hit is not None:
        decoded, stats = hit
        logger.info("%s: decoded arrays from the cache %s", name, path)
        return to_dataset(name, decoded, label, stats)
    decoded = decode()
    stats = channel_stats(decoded.train_x)
    _write(path, digest, decoded, stats, label)
    return to_dataset(name, decoded, label, stats)


def _read(
    path: Path, digest: str
) -> tuple[Decoded, tuple[tuple[float, ...], tuple[float, ...]]] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"][()]))
            if meta.get("stamp") != digest:
                logger.info("cache %s is stale (sources changed); rebuilding it", path)
                return None
            arrays = {k: np.ascontiguousarray(z[k]) for k in _ARRAYS}
        if arrays["train_x"].dtype != np.uint8 or arrays["train_y"].dtype != np.int64:
            raise ValueError("unexpected dtypes")
        decoded = Decoded(
            arrays["train_x"],
            arrays["train_y"],
            arrays["test_x"],
            arrays["test_y"],
            tuple(str(c) for c in meta["classes"]),
        )
        stats = (tuple(map(float, meta["mean"])), tuple(map(float, meta["std"])))
        return decoded, stats
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        logger.warning(
            "cache %s is unreadable (%s: %s); rebuilding it", path, type(exc).__name__, exc
        )
        return None


def _write(
    path: Path,
    digest: str,
    decoded: Decoded,
    stats: tuple[tuple[float, ...], tuple[float, ...]],
    source: str,
) -> None:
    meta = {
        "stamp": digest,
        "classes": list(decoded.classes),
        "mean": list(stats[0]),
        "std": list(stats[1]),
        "source": source,
    }
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                meta=np.array(json.dumps(meta)),
                train_x=decoded.train_x,
                train_y=decoded.train_y,
                test_x=decoded.test_x,
                test_y=decoded.test_y,
            )
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        tmp = None
        logger.info("cached the decoded arrays in %s", path)
    except OSError as exc:  # a read-only or full disk costs speed, not correctness
        logger.warning("could not write the cache %s (%s); continuing without it", path, exc)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
