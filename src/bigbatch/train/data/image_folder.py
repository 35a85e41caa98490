"""Image folders: ``train/<class>/*.jpg|png`` and ``test/<class>/...``, as a directory or archive.

The source is either a directory (holding ``train/`` and ``test/``, or one folder that does)
or a ``.tar``/``.tar.gz``/``.tar.xz``/``.tar.bz2`` archive with the same layout, read as a
stream (:mod:`tarfile` mode ``r|*``): nothing is extracted to disk. Images are decoded with
Pillow, in (split, class, file name) order, so the result does not depend on the order of
the archive. Classes are the sorted folder names under ``train/``; every image must have the
same size. Grayscale images give 1 channel; if any image is in colour, all are RGB.
"""

from __future__ import annotations

import io
import lzma
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import numpy.typing as npt

from bigbatch.train.data.base import DatasetError, Decoded

__all__ = [
    "ARCHIVE_SUFFIXES",
    "IMAGE_SUFFIXES",
    "folder_name",
    "image_files",
    "is_archive",
    "load_image_folder",
]

LOADER_VERSION = 1
SPLITS = ("train", "test")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".gif", ".webp"})
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2")
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})

_Entry = tuple[str, str, str, npt.NDArray[np.uint8]]  # split, class, file name, H x W (x 3)


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def folder_name(path: Path) -> str:
    """The dataset name of a source: its file name without the archive suffix."""
    name = path.name
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def image_files(path: Path) -> list[Path]:
    """The files whose size and mtime decide whether a cached decode is still valid."""
    if path.is_file():
        return [path]
    root = _root(path)
    return sorted(p for split in SPLITS for p in (root / split).glob("*/*") if _is_image(p.name))


def load_image_folder(path: str | Path) -> Decoded:
    """Decode every image under ``path`` (a directory or an archive; see the module docstring)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"{path}: no such file or directory (an image folder or archive)")
    if path.is_file() and not is_archive(path):
        raise DatasetError(
            f"{path} is neither a directory nor a {'/'.join(ARCHIVE_SUFFIXES)} archive"
        )
    _require_pillow()
    entries = list(_archive_entries(path) if path.is_file() else _dir_entries(path))
    return _assemble(entries, path)


# ---------------------------------------------------------------------------- internals
def _require_pillow() -> None:
    try:
        import PIL.Image  # noqa: F401
    except ImportError as exc:  # pragma: no cover - Pillow is a dependency
        raise DatasetError("reading image folders needs Pillow: pip install Pillow") from exc


def _is_image(name: str) -> bool:
    return not name.startswith(".") and PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _root(path: Path) -> Path:
    if all((path / s).is_dir() for s in SPLITS):
        return path
    subs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if len(subs) == 1 and all((subs[0] / s).is_dir() for s in SPLITS):
        return subs[0]
    raise DatasetError(
        f"{path}: expected train/<class>/<image> and test/<class>/<image> folders in it"
    )


def _decode(data: bytes, where: str) -> npt.NDArray[np.uint8]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = im.mode not in _GRAY_MODES
            arr = np.asarray(im.convert("RGB" if rgb else "L"), dtype=np.uint8)
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise DatasetError(
            f"{where} is not a readable image ({type(exc).__name__}: {exc})"
        ) from exc
    return arr


def _dir_entries(path: Path) -> Iterator[_Entry]:
    root = _root(path)
    for split in SPLITS:
        for cls_dir in sorted(p for p in (root / split).iterdir() if p.is_dir()):
            for f in sorted(p for p in cls_dir.iterdir() if p.is_file() and _is_image(p.name)):
                try:
                    data = f.read_bytes()
                except OSError as exc:
                    raise DatasetError(f"cannot read {f} ({exc})") from exc
                yield split, cls_dir.name, f.name, _decode(data, str(f))


def _archive_entries(path: Path) -> Iterator[_Entry]:
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = [p for p in PurePosixPath(member.name).parts if p not in (".", "/")]
                if len(parts) < 3 or parts[-3] not in SPLITS or not _is_image(parts[-1]):
                    continue
                f = tar.extractfile(member)
                if f is None:
                    continue
                data = f.read()
                where = f"{path}: member {member.name}"
                yield parts[-3], parts[-2], parts[-1], _decode(data, where)
    except (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, OSError) as exc:
        raise DatasetError(
            f"{path} is corrupt or truncated ({type(exc).__name__}: {exc}). "
            "Fetch the archive again or extract it and point data_dir at the folder."
        ) from exc


def _assemble(entries: list[_Entry], source: Path) -> Decoded:
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    by_split = {s: [e for e in entries if e[0] == s] for s in SPLITS}
    for split, items in by_split.items():
        if not items:
            raise DatasetError(
                f"{source}: no images under {split}/<class>/ "
                f"(accepted: {', '.join(sorted(IMAGE_SUFFIXES))})"
            )
    classes = tuple(sorted({e[1] for e in by_split["train"]}))
    unknown = sorted({e[1] for e in by_split["test"]} - set(classes))
    if unknown:
        raise DatasetError(f"{source}: test classes {unknown} have no train/ folder")
    first = by_split["train"][0]
    hw = first[3].shape[:2]
    for split, cls, name, arr in entries:
        if arr.shape[:2] != hw:
            raise DatasetError(
                f"{source}: {split}/{cls}/{name} is {arr.shape[1]}x{arr.shape[0]}, but "
                f"{first[0]}/{first[1]}/{first[2]} is {hw[1]}x{hw[0]}; all images must "
                "have one size"
            )
    channels = 3 if any(e[3].ndim == 3 for e in entries) else 1
    index = {c: i for i, c in enumerate(classes)}
    out: list[npt.NDArray[np.uint8]] = []
    labels: list[npt.NDArray[np.int64]] = []
    for split in SPLITS:
        items = by_split[split]
        x = np.empty((len(items), channels, *hw), dtype=np.uint8)
        for i, (_, _, _, arr) in enumerate(items):
            x[i] = arr.transpose(2, 0, 1) if arr.ndim == 3 else arr  # gray broadcasts to RGB
        out.append(x)
        labels.append(np.array([index[e[1]] for e in items], dtype=np.int64))
    return Decoded(out[0], labels[0], out[1], labels[1], classes)
