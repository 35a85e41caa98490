"""The in-memory dataset every loader returns (:class:`ImageDataset`) and its error type.

Loaders decode into :class:`Decoded` (numpy uint8 images ``N x C x H x W`` and int64 labels);
:func:`to_dataset` turns that into the tensors of an :class:`ImageDataset` and computes the
per-channel mean and standard deviation exactly, from integer pixel histograms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

__all__ = ["DatasetError", "Decoded", "ImageDataset", "channel_stats", "to_dataset"]

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]

#: Display names for reports; a JPEG re-encoding is lossy and reports must say so.
_DISPLAY = {
    "fashion-mnist": "Fashion-MNIST",
    "mnist": "MNIST",
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "cifar10-jpeg": "CIFAR-10 (JPEG)",
    "digits": "digits (scikit-learn, 8x8)",
}
_NOTES = {
    "cifar10-jpeg": (
        "CIFAR-10 re-encoded as JPEG (lossy): accuracies are close to, not the same as, "
        "figures on the original CIFAR-10"
    ),
    "digits": "scikit-learn's 8x8 digits (1,797 images): a tiny smoke-test set, not MNIST",
}


class DatasetError(RuntimeError):
    """The dataset files are missing, corrupt, or could not be downloaded."""


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """An image classification dataset held in memory as tensors.

    ``train_x``/``test_x``: uint8, ``N x C x H x W``, contiguous; ``train_y``/``test_y``:
    int64 class indices into ``classes``; ``mean``/``std``: per-channel statistics of
    ``train_x / 255`` (population std); ``source``: the path the data was read from.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    def __post_init__(self) -> None:
        for split, x, y in (
            ("train", self.train_x, self.train_y),
            ("test", self.test_x, self.test_y),
        ):
            if x.dtype != torch.uint8 or x.dim() != 4 or not x.is_contiguous():
                raise ValueError(f"{split}_x must be a contiguous uint8 N x C x H x W tensor")
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"{split}_y must be int64 with one label per image")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError("train and test images differ in shape")
        channels = self.train_x.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError("mean and std need one value per channel")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        _, c, h, w = self.train_x.shape
        return (int(c), int(h), int(w))

    @property
    def display_name(self) -> str:
        """The name to print in reports, e.g. ``"CIFAR-10 (JPEG)"``."""
        return _DISPLAY.get(self.name, self.name)

    @property
    def notes(self) -> str:
        """Caveats a report must carry (empty when there are none)."""
        return _NOTES.get(self.name, "")


@dataclass(frozen=True, eq=False)
class Decoded:
    """Decoded arrays: images uint8 ``N x C x H x W``, labels int64, and class names."""

    train_x: U8
    train_y: I64
    test_x: U8
    test_y: I64
    classes: tuple[str, ...]


def channel_stats(x: U8, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and population std of ``x / 255`` (``x``: ``N x C x H x W``).

    Works from 256-bin histograms accumulated in chunks, so no float copy of ``x`` is made.
    """
    n, c = x.shape[0], x.shape[1]
    counts = np.zeros((c, 256), dtype=np.int64)
    for start in range(0, n, chunk):
        block = x[start : start + chunk]
        for ch in range(c):
            counts[ch] += np.bincount(block[:, ch].reshape(-1), minlength=256)
    values = np.arange(256, dtype=np.int64)
    means: list[float] = []
    stds: list[float] = []
    for ch in range(c):
        total = int(counts[ch].sum())
        if total == 0:
            means.append(0.0)
            stds.append(0.0)
            continue
        s1 = int((counts[ch] * values).sum())
        s2 = int((counts[ch] * values * values).sum())
        means.append(s1 / total / 255.0)
        var_num = s2 * total - s1 * s1  # exact integer: total^2 * 255^2 * variance
        stds.append(math.sqrt(var_num) / total / 255.0)
    return tuple(means), tuple(stds)


def to_dataset(
    name: str,
    decoded: Decoded,
    source: str,
    stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> ImageDataset:
    """Wrap decoded arrays as tensors (copying only read-only or non-contiguous arrays)."""
    mean, std = channel_stats(decoded.train_x) if stats is None else stats
    return ImageDataset(
        name=name,
        train_x=_tensor(decoded.train_x, np.uint8),
        train_y=_tensor(decoded.train_y, np.int64),
        test_x=_tensor(decoded.test_x, np.uint8),
        test_y=_tensor(decoded.test_y, np.int64),
        classes=tuple(decoded.classes),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        source=source,
    )


def _tensor(arr: npt.NDArray[np.generic], dtype: type[np.generic]) -> Tensor:
    out = np.require(arr, dtype=dtype, requirements=["C", "W"])
    return torch.from_numpy(out)
