"""Compatibility alias: the Fashion-MNIST loader moved to :mod:`bigbatch.train.data`.

``from bigbatch.train.fashion_mnist import load_fashion_mnist`` keeps working; the code
(and the module-level settings tests patch) live in :mod:`bigbatch.train.data.fashion_mnist`.
"""

from __future__ import annotations

from bigbatch.train.data.fashion_mnist import (
    BASE_URL,
    CLASSES,
    DatasetError,
    FashionMNIST,
    candidate_dirs,
    download_fashion_mnist,
    load_fashion_mnist,
    read_idx,
)

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
