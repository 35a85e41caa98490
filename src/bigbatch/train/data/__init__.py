"""Dataset loaders of the training harness: find, verify, decode and cache datasets.

``load_dataset(name, data_dir=None, *, download=False, cache_dir=None)`` returns an
:class:`ImageDataset` (uint8 ``N x C x H x W`` tensors in memory, int64 labels, class names,
per-channel mean/std) or, for ``"text"``, a :class:`TextDataset` (character indices).
Names: :data:`DATASET_NAMES`. One module per job:

- :mod:`~bigbatch.train.data.base`: :class:`ImageDataset`, :class:`DatasetError`;
- :mod:`~bigbatch.train.data.sources`: where files are searched, the checked download;
- :mod:`~bigbatch.train.data.idx`: MNIST and Fashion-MNIST (official idx gzip files);
- :mod:`~bigbatch.train.data.cifar_pickle`: CIFAR-10/100 (official python pickle batches);
- :mod:`~bigbatch.train.data.image_folder`: ``train/<class>/*`` folders or archives;
- :mod:`~bigbatch.train.data.digits`: scikit-learn's 8x8 digits (always available);
- :mod:`~bigbatch.train.data.text`: any UTF-8 text, character level, fixed splits;
- :mod:`~bigbatch.train.data.cache`: the decoded-array cache;
- :mod:`~bigbatch.train.data.registry`: :func:`load_dataset`;
"""

from __future__ import annotations

from bigbatch.train.data.base import DatasetError, ImageDataset
from bigbatch.train.data.registry import DATASET_NAMES, load_dataset
from bigbatch.train.data.text import TextDataset

#: what :func:`load_dataset` returns
Dataset = ImageDataset | TextDataset

__all__ = [
    "DATASET_NAMES",
    "Dataset",
    "DatasetError",
    "ImageDataset",
    "TextDataset",
    "load_dataset",
]
