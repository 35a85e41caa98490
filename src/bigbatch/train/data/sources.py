"""Where dataset files are looked for, and the checked download that fetches them.

Search order for a dataset ``<name>`` (the first place holding every needed file wins):

1. the explicit ``data_dir`` (the files directly, or in ``data_dir/<name>/``);
2. the ``BIGBATCH_DATA_DIR`` environment variable (same two layouts);
3. the system location ``/usr/share/datasets/<name>`` (Debian's ``dataset-*`` packages);
4. the user cache ``~/.cache/bigbatch/<name>`` (where ``download=True`` puts files by default).

A download goes to a temporary file beside its destination, is checked against the expected
md5 and only then renamed into place with :func:`os.replace`: an interrupted or corrupt
download never leaves a file under the real name.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

from bigbatch.train.data.base import DatasetError

__all__ = [
    "DOWNLOAD_TIMEOUT_S",
    "ENV_VAR",
    "SYSTEM_ROOT",
    "USER_ROOT",
    "download_file",
    "file_md5",
    "missing_message",
    "search_dirs",
    "system_dir",
    "user_dir",
]

logger = logging.getLogger(__name__)

ENV_VAR = "BIGBATCH_DATA_DIR"
SYSTEM_ROOT = Path("/usr/share/datasets")
USER_ROOT = Path("~/.cache/bigbatch")
DOWNLOAD_TIMEOUT_S = 60.0


def _digits_hint() -> str:
    """The line "not found" messages end with, offering scikit-learn's digits only where
    scikit-learn is installed (never a silent fallback)."""
    import importlib.util

    if importlib.util.find_spec("sklearn") is None:
        return (
            "  - offline with no copy at all: pip install scikit-learn, then --dataset digits "
            "trains on its bundled 8x8 digits (a tiny, different dataset)."
        )
    return (
        "  - offline with no copy at all: load_dataset('digits') (--dataset digits) trains on "
        "scikit-learn's bundled 8x8 digits, a tiny always-available set (a different dataset)."
    )


def system_dir(name: str) -> Path:
    return SYSTEM_ROOT / name


def user_dir(name: str) -> Path:
    return USER_ROOT.expanduser() / name


def search_dirs(
    name: str,
    data_dir: str | Path | None = None,
    *,
    subdirs: Sequence[str] = (),
    system: Path | None = None,
    user: Path | None = None,
) -> list[Path]:
    """The directories searched for ``name``, in order, without duplicates.

    Each of ``data_dir`` and ``$BIGBATCH_DATA_DIR`` contributes itself and ``<it>/<name>``;
    then come the system and user directories (defaults :func:`system_dir`, :func:`user_dir`).
    ``subdirs`` (e.g. ``cifar-10-batches-py``) are also tried inside every one of those.
    """
    roots: list[Path] = []
    if data_dir is not None:
        roots.append(Path(data_dir).expanduser())
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        roots.append(Path(env).expanduser())
    bases: list[Path] = []
    for root in roots:
        bases += [root, root / name]
    bases += [system_dir(name) if system is None else system]
    bases += [user_dir(name) if user is None else user]
    dirs: list[Path] = []
    for base in bases:
        dirs += [base, *(base / s for s in subdirs)]
    return list(dict.fromkeys(dirs))


def file_md5(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download_file(url: str, dest: Path, expected_md5: str, *, timeout: float | None = None) -> None:
    """Fetch ``url`` to ``dest`` through a verified temporary file (see the module docstring)."""
    logger.info("downloading %s -> %s", url, dest)
    tmp: str | None = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        digest = hashlib.md5(usedforsecurity=False)
        limit = DOWNLOAD_TIMEOUT_S if timeout is None else timeout
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=limit) as resp:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if got != expected_md5:
            raise DatasetError(
                f"download of {url} failed verification: md5 {got}, expected {expected_md5}; "
                f"nothing was saved as {dest}. Retry, or fetch the file by hand."
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, dest)
        tmp = None
    except (OSError, http.client.HTTPException) as exc:
        raise DatasetError(
            f"downloading {url} to {dest} failed ({type(exc).__name__}: {exc}).\n"
            "If this machine is offline, copy the files here by hand (or point data_dir / "
            f"{ENV_VAR} at a copy), or:\n{_digits_hint()}"
        ) from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def missing_message(
    title: str,
    searched: Iterable[Path],
    needed: Sequence[str],
    *,
    url: str | None,
    subdir: str,
    extra_hints: Sequence[str] = (),
    also: str = "",
) -> str:
    """The one message for "not found": what was needed, where it looked, how to fix it."""
    lines = [
        f"{title} not found: no directory holds all of {', '.join(needed)}{also}.",
        "Searched:",
    ]
    for d in searched:
        if not d.is_dir():
            lines.append(f"  {d}  (no such directory)")
        else:
            missing = [n for n in needed if not (d / n).exists()]
            lines.append(f"  {d}  (missing: {', '.join(missing)})")
    lines += [
        "To fix, do one of:",
        "  - pass --data-dir DIR (data_dir=DIR) for a directory with the files;",
        f"  - set {ENV_VAR}=DIR (the files in DIR or in DIR/{subdir});",
        *extra_hints,
    ]
    if url is not None:
        lines.append(f"  - pass --download (download=True) to fetch them from {url};")
    lines.append(_digits_hint())
    return "\n".join(lines)
