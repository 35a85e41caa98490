"""Fashion-MNIST from its four official idx gzip files: find them, verify them, decode them.

The dataset behind the demo (``examples/fashion_mnist_demo.py``) and, later, the training
harness. No torchvision: the files are read with :mod:`gzip` and decoded with
``numpy.frombuffer`` into in-memory tensors (about 200 MB as float32).

Where the files are looked for, in order (the first directory holding all four wins):

1. the ``data_dir`` argument (the files directly, or in a ``fashion-mnist/`` subfolder);
2. the ``BIGBATCH_DATA_DIR`` environment variable (same two layouts);
3. ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist`` package);
4. ``~/.cache/bigbatch/fashion-mnist`` (where ``download=True`` puts them by default).

With ``download=True`` and nothing found, the files are fetched from :data:`BASE_URL` into
``data_dir`` (or the cache), each to a temporary file that is checked against the official
md5 and then moved into place with :func:`os.replace`, so an interrupted download never
leaves a half-written file under the real name.

Every file is verified by the md5 of its DECOMPRESSED bytes (Debian recompresses the files,
so their gzip bytes differ from the official ones but the content is identical), then its
idx header is checked: magic number (2051 images, 2049 labels), big-endian dimensions,
exact length and the expected sample counts.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import math
import os
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

__all__ = [
    "BASE_URL",
    "CLASSES",
    "DatasetError",
    "FashionMNIST",
    "candidate_dirs",
    "download_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
]

logger = logging.getLogger(__name__)

#: Official download location (Zalando Research's S3 bucket); tests point it elsewhere.
BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
ENV_VAR = "BIGBATCH_DATA_DIR"
SUBDIR = "fashion-mnist"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path("~/.cache/bigbatch/fashion-mnist")
DOWNLOAD_TIMEOUT_S = 60.0

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

#: md5 of each file's decompressed bytes (what is verified on every load).
RAW_MD5: dict[str, str] = {
    TRAIN_IMAGES: "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    TRAIN_LABELS: "9018921c3c673c538a1fc5bad174d6f9",
    TEST_IMAGES: "8181f5470baa50b63fa0f6fddb340f0a",
    TEST_LABELS: "15d484375f8d13e6eb1aabb0c3f46965",
}
#: md5 of the official gzip files (what a download is verified against).
GZ_MD5: dict[str, str] = {
    TRAIN_IMAGES: "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    TRAIN_LABELS: "25c81989df183df01b3e8a0aad5dffbe",
    TEST_IMAGES: "bef4ecab320f06d8554ea6380940ec79",
    TEST_LABELS: "bb300cfdad3c16e7a12a480ee83cd310",
}
#: Samples per split in the official release.
SPLIT_SIZES: dict[str, int] = {"train": 60_000, "test": 10_000}
IMAGE_SHAPE = (28, 28)
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_IDX_UBYTE = 0x08


class DatasetError(RuntimeError):
    """The dataset files are missing, corrupt, or could not be downloaded."""


@dataclass(frozen=True, eq=False)
class FashionMNIST:
    """Fashion-MNIST in memory.

    ``train_x``/``test_x``: float32, ``N x 1 x 28 x 28``, pixel values in ``[0, 1]``;
    ``train_y``/``test_y``: int64 class indices in ``[0, 10)`` (names in :data:`CLASSES`);
    ``source``: the directory the files were read from.
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    source: Path


def load_fashion_mnist(
    data_dir: str | Path | None = None,
    *,
    download: bool = False,
    base_url: str | None = None,
) -> FashionMNIST:
    """Find, verify and decode Fashion-MNIST (see the module docstring for where it looks).

    Args:
        data_dir: a directory holding the four ``*.gz`` files (or a ``fashion-mnist/``
            subfolder with them); searched first, and the download target when given.
        download: fetch the files when they are found nowhere.
        base_url: where to download from; default :data:`BASE_URL`.
    Raises:
        DatasetError: files missing (and ``download`` off), corrupt, or not downloadable.
    """
    searched = candidate_dirs(data_dir)
    source = next((d for d in searched if all((d / n).is_file() for n in FILES)), None)
    if source is None:
        if not download:
            raise DatasetError(_missing_message(searched))
        target = _expand(data_dir) if data_dir is not None else CACHE_DIR.expanduser()
        source = download_fashion_mnist(target, base_url=base_url)
    return _load_dir(source)


def candidate_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """The directories searched, in order, without duplicates."""
    roots: list[Path] = []
    if data_dir is not None:
        roots.append(_expand(data_dir))
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        roots.append(_expand(env))
    dirs: list[Path] = []
    for root in roots:
        dirs += [root, root / SUBDIR]
    dirs += [SYSTEM_DIR, CACHE_DIR.expanduser()]
    unique: list[Path] = []
    for d in dirs:
        if d not in unique:
            unique.append(d)
    return unique


def download_fashion_mnist(
    target_dir: str | Path,
    *,
    base_url: str | None = None,
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> Path:
    """Download the files missing from ``target_dir``; return ``target_dir``.

    Each file goes to a temporary file in ``target_dir``, is checked against :data:`GZ_MD5`
    and is then renamed into place; files already present are left alone (they are
    verified when loaded).
    """
    target = _expand(target_dir)
    base = (BASE_URL if base_url is None else base_url).rstrip("/") + "/"
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"cannot create the download directory {target}: {exc}") from exc
    for name in FILES:
        dest = target / name
        if not dest.is_file():
            _download_file(base + name, dest, GZ_MD5[name], timeout)
    return target


def read_idx(path: str | Path, *, magic: int, expected_md5: str | None) -> npt.NDArray[np.uint8]:
    """Decompress one idx gzip file, verify its content md5 and decode it (no copy).

    Returns a read-only uint8 array shaped by the header's dimensions.
    """
    path = Path(path)
    hint = f"expected md5 of the decompressed content: {expected_md5}" if expected_md5 else ""
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(
            f"{path} is corrupt or truncated ({type(exc).__name__}: {exc}); {hint}. "
            "Delete it and fetch it again."
        ) from exc
    if expected_md5 is not None:
        got = hashlib.md5(raw, usedforsecurity=False).hexdigest()
        if got != expected_md5:
            raise DatasetError(
                f"{path} is corrupt or not the official file: md5 of its decompressed "
                f"content is {got}, {hint}. Delete it and fetch it again."
            )
    return _decode_idx(raw, path, magic)


# ---------------------------------------------------------------------------- internals
def _expand(path: str | Path) -> Path:
    return Path(path).expanduser()


def _decode_idx(raw: bytes, path: Path, magic: int) -> npt.NDArray[np.uint8]:
    if len(raw) < 4:
        raise DatasetError(f"{path}: {len(raw)} bytes, too short for an idx header")
    got_magic = int.from_bytes(raw[:4], "big")
    if got_magic != magic:
        raise DatasetError(f"{path}: idx magic number {got_magic}, expected {magic}")
    ndim = magic & 0xFF
    if (magic >> 8) != _IDX_UBYTE:
        raise DatasetError(f"{path}: idx type {magic >> 8:#x} is not unsigned byte")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: {len(raw)} bytes, too short for a {ndim}-d idx header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise DatasetError(
            f"{path}: {len(raw)} bytes after decompression, but its header {dims} needs {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_dir(source: Path) -> FashionMNIST:
    train_x = _images(source / TRAIN_IMAGES, SPLIT_SIZES["train"])
    train_y = _labels(source / TRAIN_LABELS, SPLIT_SIZES["train"])
    test_x = _images(source / TEST_IMAGES, SPLIT_SIZES["test"])
    test_y = _labels(source / TEST_LABELS, SPLIT_SIZES["test"])
    return FashionMNIST(train_x, train_y, test_x, test_y, source)


def _images(path: Path, count: int) -> Tensor:
    arr = read_idx(path, magic=IDX_IMAGES_MAGIC, expected_md5=RAW_MD5.get(path.name))
    if arr.shape != (count, *IMAGE_SHAPE):
        raise DatasetError(f"{path}: images of shape {arr.shape}, expected {(count, *IMAGE_SHAPE)}")
    x = torch.from_numpy(arr.astype(np.float32))  # astype copies: the tensor is writable
    return x.div_(255.0).unsqueeze(1)


def _labels(path: Path, count: int) -> Tensor:
    arr = read_idx(path, magic=IDX_LABELS_MAGIC, expected_md5=RAW_MD5.get(path.name))
    if arr.shape != (count,):
        raise DatasetError(f"{path}: labels of shape {arr.shape}, expected {(count,)}")
    if count and int(arr.max()) >= len(CLASSES):
        raise DatasetError(f"{path}: label {int(arr.max())} outside [0, {len(CLASSES)})")
    return torch.from_numpy(arr.astype(np.int64))


def _download_file(url: str, dest: Path, expected_md5: str, timeout: float) -> None:
    logger.info("downloading %s -> %s", url, dest)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        got = digest.hexdigest()
        if got != expected_md5:
            raise DatasetError(
                f"download of {url} failed verification: md5 {got}, expected {expected_md5}; "
                "nothing was saved. Retry, or fetch the file by hand."
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, dest)
        tmp = None
    except (OSError, http.client.HTTPException) as exc:
        raise DatasetError(
            f"downloading {url} to {dest} failed ({type(exc).__name__}: {exc}). Check the "
            "network, or get the files another way (see load_fashion_mnist)."
        ) from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _missing_message(searched: list[Path]) -> str:
    lines = [f"Fashion-MNIST not found: no directory holds all of {', '.join(FILES)}.", "Searched:"]
    for d in searched:
        if not d.is_dir():
            lines.append(f"  {d}  (no such directory)")
        else:
            missing = [n for n in FILES if not (d / n).is_file()]
            lines.append(f"  {d}  (missing: {', '.join(missing)})")
    lines += [
        "To fix, do one of:",
        "  - pass --data-dir DIR (data_dir=DIR) for a directory with the four files;",
        f"  - set {ENV_VAR}=DIR (the files in DIR or in DIR/{SUBDIR});",
        f"  - apt-get install dataset-fashion-mnist (installs them in {SYSTEM_DIR});",
        f"  - pass --download (download=True) to fetch them from {BASE_URL}.",
    ]
    return "\n".join(lines)
