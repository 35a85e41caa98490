"""The original Fashion-MNIST API (float32 images in ``[0, 1]``), kept for its users.

``load_fashion_mnist`` predates :func:`bigbatch.train.data.load_dataset`; it shares the
idx reader, checksum tables and download with it (:mod:`bigbatch.train.data.idx`) and
returns float32 tensors ``N x 1 x 28 x 28``. It does not use the decoded-array cache
(decoding the idx files takes well under a second). New code should call
``load_dataset("fashion-mnist")``, which returns uint8 tensors.

Where the files are looked for, in order (the first directory holding all four wins):
``data_dir`` (or ``data_dir/fashion-mnist``), ``$BIGBATCH_DATA_DIR`` (same two layouts),
:data:`SYSTEM_DIR` (Debian's ``dataset-fashion-mnist``) and :data:`CACHE_DIR`, which is
where ``download=True`` puts the files when no ``data_dir`` is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from bigbatch.train.data import idx, sources
from bigbatch.train.data.base import DatasetError
from bigbatch.train.data.idx import (
    FILES,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    read_idx,
)
from bigbatch.train.data.sources import ENV_VAR

__all__ = [
    "BASE_URL",
    "CLASSES",
    "ENV_VAR",
    "FILES",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "TEST_IMAGES",
    "TEST_LABELS",
    "TRAIN_IMAGES",
    "TRAIN_LABELS",
    "DatasetError",
    "FashionMNIST",
    "candidate_dirs",
    "download_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
]

SPEC = idx.FASHION_MNIST
#: Official download location (Zalando Research's S3 bucket); tests point it elsewhere.
BASE_URL = idx.BASE_URLS[SPEC.name]
SUBDIR = SPEC.name
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path("~/.cache/bigbatch/fashion-mnist")
DOWNLOAD_TIMEOUT_S = sources.DOWNLOAD_TIMEOUT_S
#: The same dict objects as in ``idx.FASHION_MNIST`` (patching one patches both).
RAW_MD5 = SPEC.raw_md5
GZ_MD5 = SPEC.gz_md5
SPLIT_SIZES = SPEC.split_sizes
IMAGE_SHAPE = SPEC.image_shape
CLASSES = SPEC.classes


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
    source = idx.find_idx_dir(searched)
    if source is None:
        if not download:
            raise DatasetError(_missing_message(searched))
        target = Path(data_dir).expanduser() if data_dir is not None else CACHE_DIR.expanduser()
        source = download_fashion_mnist(target, base_url=base_url)
    d = idx.load_idx_dir(SPEC, source)
    return FashionMNIST(
        _floats(d.train_x), _ints(d.train_y), _floats(d.test_x), _ints(d.test_y), source
    )


def candidate_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """The directories searched, in order, without duplicates."""
    return sources.search_dirs(SUBDIR, data_dir, system=SYSTEM_DIR, user=CACHE_DIR.expanduser())


def download_fashion_mnist(
    target_dir: str | Path,
    *,
    base_url: str | None = None,
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> Path:
    """Download the files missing from ``target_dir``; return ``target_dir``."""
    url = BASE_URL if base_url is None else base_url
    return idx.download_idx(SPEC, Path(target_dir).expanduser(), base_url=url, timeout=timeout)


def _floats(x: npt.NDArray[np.uint8]) -> Tensor:
    return torch.from_numpy(x.astype(np.float32)).div_(255.0)  # astype copies: writable


def _ints(y: npt.NDArray[np.int64]) -> Tensor:
    return torch.from_numpy(np.array(y, dtype=np.int64))


def _missing_message(searched: list[Path]) -> str:
    return sources.missing_message(
        "Fashion-MNIST",
        searched,
        FILES,
        url=BASE_URL,
        subdir=SUBDIR,
        extra_hints=[f"  - apt-get install dataset-fashion-mnist (installs them in {SYSTEM_DIR});"],
    )
