"""CIFAR-10 and CIFAR-100 from the official python pickle batches: verify and decode.

Layouts: ``cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5``, ``test_batch``,
``batches.meta``) and ``cifar-100-python/`` (``train``, ``test``, ``meta``). Every file is
checked against its official md5 BEFORE it is unpickled, and unpickling goes through a
restricted :class:`pickle.Unpickler` that only rebuilds numpy arrays (no arbitrary code).
Each batch's ``data`` is ``N x 3072`` uint8 in R, G, B planes of 32 x 32, so it reshapes to
``N x 3 x 32 x 32`` without any per-sample work.

``download=True`` fetches the official ``.tar.gz`` from cs.toronto.edu, verifies its md5,
extracts it safely into a temporary folder and renames the folder into place.
"""

from __future__ import annotations

import codecs
import logging
import pickle
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bigbatch.train.data.base import DatasetError, Decoded
from bigbatch.train.data.sources import download_file, file_md5

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "URLS",
    "CifarSpec",
    "download_cifar",
    "find_cifar_dir",
    "load_cifar_dir",
]

logger = logging.getLogger(__name__)

LOADER_VERSION = 1
IMAGE_SHAPE = (3, 32, 32)


@dataclass(frozen=True)
class CifarSpec:
    """One CIFAR variant. ``md5`` (official, per file) and ``split_sizes`` are patchable dicts."""

    name: str
    title: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int
    md5: dict[str, str]
    archive: str
    archive_md5: dict[str, str]
    split_sizes: dict[str, int] = field(default_factory=lambda: {"train": 50_000, "test": 10_000})

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)


CIFAR10 = CifarSpec(
    name="cifar10",
    title="CIFAR-10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key=b"labels",
    names_key=b"label_names",
    num_classes=10,
    md5={
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
        "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
    },
    archive="cifar-10-python.tar.gz",
    archive_md5={"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
)

CIFAR100 = CifarSpec(
    name="cifar100",
    title="CIFAR-100",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key=b"fine_labels",
    names_key=b"fine_label_names",
    num_classes=100,
    md5={
        "train": "16019d7e3df5f24257cddd939b257f8d",
        "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        "meta": "7973b15100ade9c7d40fb424638fde48",
    },
    archive="cifar-100-python.tar.gz",
    archive_md5={"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"},
)

SPECS = {spec.name: spec for spec in (CIFAR10, CIFAR100)}

#: Official download locations (tests point them at a local server).
URLS: dict[str, str] = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}

# What the restricted unpickler may rebuild: numpy arrays and dtypes, nothing else.
_ALLOWED: dict[tuple[str, str], Any] = {}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_module, "_reconstruct")] = np.array(0).__reduce__()[0]
for _module in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_module, "_frombuffer")] = np.arange(1).__reduce_ex__(5)[0]
_ALLOWED[("numpy", "ndarray")] = np.ndarray
_ALLOWED[("numpy", "dtype")] = np.dtype
_ALLOWED[("_codecs", "encode")] = codecs.encode  # bytes pickled by Python 3, protocol <= 2


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None


def find_cifar_dir(spec: CifarSpec, dirs: list[Path]) -> Path | None:
    """The first directory holding every file of ``spec``."""
    return next((d for d in dirs if all((d / n).is_file() for n in spec.files)), None)


def load_cifar_dir(spec: CifarSpec, source: Path) -> Decoded:
    """Verify and decode the batches in ``source``."""
    for name in spec.files:
        _verify(source / name, spec.md5.get(name))
    meta = _unpickle(source / spec.meta_file)
    names = meta.get(spec.names_key)
    if not isinstance(names, list) or len(names) != spec.num_classes:
        raise DatasetError(
            f"{source / spec.meta_file}: no list of {spec.num_classes} class names under "
            f"{spec.names_key!r}"
        )
    classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    train_x, train_y = _split(spec, source, spec.train_files, spec.split_sizes["train"])
    test_x, test_y = _split(spec, source, spec.test_files, spec.split_sizes["test"])
    return Decoded(train_x, train_y, test_x, test_y, classes)


def download_cifar(
    spec: CifarSpec, target: Path, *, url: str | None = None, timeout: float | None = None
) -> Path:
    """Fetch and verify the official archive, extract ``spec.folder`` into ``target``."""
    url = URLS[spec.name] if url is None else url
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"cannot create the download directory {target}: {exc}") from exc
    archive = target / spec.archive
    if not archive.is_file() or file_md5(archive) != spec.archive_md5[spec.archive]:
        download_file(url, archive, spec.archive_md5[spec.archive], timeout=timeout)
    dest = target / spec.folder
    tmp = Path(tempfile.mkdtemp(dir=target, prefix=f".{spec.folder}."))
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = [m for m in tar.getmembers() if _safe_member(m, spec.folder)]
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
                tar.extractall(tmp, members=members, filter="data")
            else:  # pragma: no cover - the members are already checked by _safe_member
                tar.extractall(tmp, members=members)
        extracted = tmp / spec.folder
        if not extracted.is_dir():
            raise DatasetError(f"{archive} holds no {spec.folder}/ folder")
        if dest.exists():
            shutil.rmtree(dest)
        extracted.replace(dest)
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise DatasetError(
            f"extracting {archive} failed ({type(exc).__name__}: {exc}); delete it and retry"
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    archive.unlink(missing_ok=True)  # extracted and verified at load time: no need to keep it
    return dest


# ---------------------------------------------------------------------------- internals
def _safe_member(m: tarfile.TarInfo, folder: str) -> bool:
    parts = Path(m.name).parts
    return (
        bool(parts)
        and parts[0] == folder
        and ".." not in parts
        and not Path(m.name).is_absolute()
        and (m.isfile() or m.isdir())
    )


def _verify(path: Path, expected: str | None) -> None:
    if expected is None:
        return
    try:
        got = file_md5(path)
    except OSError as exc:
        raise DatasetError(f"cannot read {path} ({exc})") from exc
    if got != expected:
        raise DatasetError(
            f"{path} is corrupt, truncated or not the official file: md5 {got}, expected "
            f"{expected}. Delete the folder and fetch it again (download=True)."
        )


def _unpickle(path: Path) -> dict[bytes, Any]:
    try:
        with path.open("rb") as f:
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as exc:
        raise DatasetError(
            f"{path} is corrupt or truncated ({type(exc).__name__}: {exc}). "
            "Delete the folder and fetch it again (download=True)."
        ) from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return obj


def _split(
    spec: CifarSpec, source: Path, files: tuple[str, ...], count: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    xs: list[npt.NDArray[np.uint8]] = []
    ys: list[npt.NDArray[np.int64]] = []
    for name in files:
        path = source / name
        batch = _unpickle(path)
        data = batch.get(b"data")
        labels = batch.get(spec.label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
            raise DatasetError(f"{path}: b'data' is not a uint8 N x 3072 array")
        if data.shape[1] != int(np.prod(IMAGE_SHAPE)):
            raise DatasetError(f"{path}: images of {data.shape[1]} bytes, expected 3072")
        y = np.asarray(labels if labels is not None else [], dtype=np.int64)
        if y.shape != (data.shape[0],):
            raise DatasetError(
                f"{path}: {y.size} labels under {spec.label_key!r} for {len(data)} images"
            )
        if y.size and (int(y.min()) < 0 or int(y.max()) >= spec.num_classes):
            raise DatasetError(f"{path}: label outside [0, {spec.num_classes})")
        xs.append(data.reshape(-1, *IMAGE_SHAPE))
        ys.append(y)
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    if len(x) != count:
        raise DatasetError(f"{source}: {len(x)} images in {', '.join(files)}, expected {count}")
    return x, y
