"""MNIST and Fashion-MNIST from their four official idx gzip files: verify and decode.

Each file is verified before it is decoded: it passes if its gzip bytes have the official md5
or, since Debian recompresses the files (different gzip bytes, identical content), if its
DECOMPRESSED bytes have the official content md5. Then the idx header is checked: magic
number (2051 images, 2049 labels), big-endian dimensions, exact length, the expected sample
counts and labels in range. Decoding is ``numpy.frombuffer``: no per-sample work.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from bigbatch.train.data.base import DatasetError, Decoded
from bigbatch.train.data.sources import download_file

__all__ = [
    "BASE_URLS",
    "FASHION_MNIST",
    "FILES",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "MNIST",
    "IdxSpec",
    "download_idx",
    "find_idx_dir",
    "load_idx_dir",
    "read_idx",
]

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_IDX_UBYTE = 0x08
#: Bumped whenever decoding changes, to invalidate cached arrays.
LOADER_VERSION = 1


@dataclass(frozen=True)
class IdxSpec:
    """One idx dataset: its files' checksums, split sizes and class names.

    The dicts are module-level objects that tests patch with ``monkeypatch.setitem``.
    ``raw_md5`` maps a file to the md5 of its decompressed bytes (``None``: not known, then
    only the official gzip bytes (``gz_md5``) are accepted).
    """

    name: str
    title: str
    classes: tuple[str, ...]
    gz_md5: dict[str, str]
    raw_md5: dict[str, str | None]
    split_sizes: dict[str, int] = field(default_factory=lambda: {"train": 60_000, "test": 10_000})
    image_shape: tuple[int, int] = (28, 28)
    apt_package: str | None = None


FASHION_MNIST = IdxSpec(
    name="fashion-mnist",
    title="Fashion-MNIST",
    classes=(
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
    ),
    gz_md5={
        TRAIN_IMAGES: "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        TRAIN_LABELS: "25c81989df183df01b3e8a0aad5dffbe",
        TEST_IMAGES: "bef4ecab320f06d8554ea6380940ec79",
        TEST_LABELS: "bb300cfdad3c16e7a12a480ee83cd310",
    },
    raw_md5={
        TRAIN_IMAGES: "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        TRAIN_LABELS: "9018921c3c673c538a1fc5bad174d6f9",
        TEST_IMAGES: "8181f5470baa50b63fa0f6fddb340f0a",
        TEST_LABELS: "15d484375f8d13e6eb1aabb0c3f46965",
    },
    apt_package="dataset-fashion-mnist",
)

MNIST = IdxSpec(
    name="mnist",
    title="MNIST",
    classes=tuple(str(d) for d in range(10)),
    gz_md5={
        TRAIN_IMAGES: "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        TRAIN_LABELS: "d53e105ee54ea40749a09fcbcd1e9432",
        TEST_IMAGES: "9fb629c4189551a2d022fa330f9573f3",
        TEST_LABELS: "ec29112dd5afa0611ce80d1b7f02629c",
    },
    # The content md5s of MNIST are not published; only the official gzip files pass.
    raw_md5={TRAIN_IMAGES: None, TRAIN_LABELS: None, TEST_IMAGES: None, TEST_LABELS: None},
)

SPECS = {spec.name: spec for spec in (FASHION_MNIST, MNIST)}

#: Official download locations (tests point them at a local server). MNIST: the PyTorch
#: project's mirror of Yann LeCun's files (the original site refuses most downloads).
BASE_URLS: dict[str, str] = {
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
}


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def read_idx(
    path: str | Path,
    *,
    magic: int,
    expected_md5: str | None,
    gz_md5: str | None = None,
) -> npt.NDArray[np.uint8]:
    """Verify and decode one idx gzip file; a read-only uint8 array shaped by its header.

    ``expected_md5``: md5 of the decompressed content; ``gz_md5``: md5 of the official
    gzip bytes. The file passes if either matches (see the module docstring); with both
    ``None`` nothing is verified but the header.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read {path} ({exc})") from exc
    verified = gz_md5 is not None and _md5(data) == gz_md5
    if expected_md5:
        hint = f"expected md5 of the decompressed content: {expected_md5}"
    elif gz_md5:
        hint = f"expected md5 of the official gzip file: {gz_md5}"
    else:
        hint = "no checksum known"
    try:
        raw = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(
            f"{path} is corrupt or truncated ({type(exc).__name__}: {exc}); {hint}. "
            "Delete it and fetch it again (download=True)."
        ) from exc
    if not verified and expected_md5 is not None:
        got = _md5(raw)
        if got != expected_md5:
            raise DatasetError(
                f"{path} is corrupt or not the official file: md5 of its decompressed "
                f"content is {got}, {hint}. Delete it and fetch it again (download=True)."
            )
    elif not verified and gz_md5 is not None:
        raise DatasetError(
            f"{path} is corrupt or not the official file: its md5 is {_md5(data)}, {hint}. "
            "Delete it and fetch it again (download=True)."
        )
    return _decode_idx(raw, path, magic)


def find_idx_dir(dirs: list[Path]) -> Path | None:
    """The first directory holding all four files."""
    return next((d for d in dirs if all((d / n).is_file() for n in FILES)), None)


def load_idx_dir(spec: IdxSpec, source: Path) -> Decoded:
    """Verify and decode the four files in ``source`` (images as ``N x 1 x 28 x 28``)."""
    train_x = _images(spec, source / TRAIN_IMAGES, spec.split_sizes["train"])
    train_y = _labels(spec, source / TRAIN_LABELS, spec.split_sizes["train"])
    test_x = _images(spec, source / TEST_IMAGES, spec.split_sizes["test"])
    test_y = _labels(spec, source / TEST_LABELS, spec.split_sizes["test"])
    return Decoded(train_x, train_y, test_x, test_y, spec.classes)


def download_idx(
    spec: IdxSpec, target: Path, *, base_url: str | None = None, timeout: float | None = None
) -> Path:
    """Download the files missing from ``target`` (each checked against ``spec.gz_md5``)."""
    base = (BASE_URLS[spec.name] if base_url is None else base_url).rstrip("/") + "/"
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"cannot create the download directory {target}: {exc}") from exc
    for name in FILES:
        dest = target / name
        if not dest.is_file():
            download_file(base + name, dest, spec.gz_md5[name], timeout=timeout)
    return target


# ---------------------------------------------------------------------------- internals
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


def _images(spec: IdxSpec, path: Path, count: int) -> npt.NDArray[np.uint8]:
    arr = read_idx(
        path,
        magic=IDX_IMAGES_MAGIC,
        expected_md5=spec.raw_md5.get(path.name),
        gz_md5=spec.gz_md5.get(path.name),
    )
    shape = (count, *spec.image_shape)
    if arr.shape != shape:
        raise DatasetError(f"{path}: images of shape {arr.shape}, expected {shape}")
    return arr.reshape(count, 1, *spec.image_shape)


def _labels(spec: IdxSpec, path: Path, count: int) -> npt.NDArray[np.int64]:
    arr = read_idx(
        path,
        magic=IDX_LABELS_MAGIC,
        expected_md5=spec.raw_md5.get(path.name),
        gz_md5=spec.gz_md5.get(path.name),
    )
    if arr.shape != (count,):
        raise DatasetError(f"{path}: labels of shape {arr.shape}, expected {(count,)}")
    if count and int(arr.max()) >= len(spec.classes):
        raise DatasetError(f"{path}: label {int(arr.max())} outside [0, {len(spec.classes)})")
    return arr.astype(np.int64)
