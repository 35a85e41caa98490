"""In-memory data for training: normalised splits and the seeded order of the batches.

The dataset's uint8 images become one float32 tensor per split, normalised with the
training set's per-channel mean and std; a batch is an index into it (``x[idx]``), never
assembled sample by sample. The order is a fresh ``torch.randperm`` per epoch from a
generator seeded by (seed, epoch), so the batch of any step can be recomputed from the
step number alone: that is what makes a resumed run see the same data as an uninterrupted
one. The last partial batch of an epoch is dropped, so every step sees exactly
``batch_size`` samples.

Text (:class:`~bigbatch.train.data.text.TextDataset`): a training sample is a window of
``context`` characters starting anywhere in the training part (:class:`TextWindows`, its
target the same window shifted by one); an "epoch" is as many steps as cover the training
characters once (``n_train // (batch_size * context)``), each drawing distinct random start
positions. Validation and test are the non-overlapping windows of their parts.
Not here: augmentation (``augment.py``), loading files (``data/``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bigbatch.train.config import ConfigError
from bigbatch.train.data import ImageDataset
from bigbatch.train.data.text import TextDataset

__all__ = [
    "BatchOrder",
    "Split",
    "TextWindows",
    "derive_seed",
    "prepare_splits",
    "prepare_text",
]

#: The validation split does not depend on the run's seed, so every run of a comparison
#: holds out the same images.
SPLIT_SEED = 20_241_121


@dataclass(frozen=True)
class Split:
    """Normalised images and integer labels of one split, on one device."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Inputs and targets of the samples ``idx``."""
        return self.x[idx], self.y[idx]


@dataclass(frozen=True)
class TextWindows:
    """Every window of ``context`` tokens of a text, as samples (targets shifted by one)."""

    tokens: Tensor
    context: int

    def __len__(self) -> int:
        return int(self.tokens.numel()) - self.context

    def take(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        offsets = idx[:, None] + torch.arange(self.context + 1, device=idx.device)
        window = self.tokens[offsets]
        return window[:, :-1], window[:, 1:]


def _windows(tokens: Tensor, context: int, device: torch.device) -> Split:
    """The non-overlapping windows of ``tokens`` (targets shifted by one) as a split."""
    n = (int(tokens.numel()) - 1) // context
    x = tokens[: n * context].reshape(n, context)
    y = tokens[1 : n * context + 1].reshape(n, context)
    return Split(x.to(device), y.to(device))


def prepare_text(
    dataset: TextDataset, context: int, device: torch.device
) -> tuple[TextWindows, Split, Split]:
    """(training windows, validation windows, test windows) of a text."""
    for split in ("validation", "test"):
        if dataset.part(split).numel() <= context:
            raise ConfigError(
                f"data.context ({context}) must be shorter than the {split} part of "
                f"{dataset.source} ({dataset.part(split).numel()} characters)"
            )
    train = TextWindows(dataset.part("train").to(device), context)
    return (
        train,
        _windows(dataset.part("validation"), context, device),
        _windows(dataset.part("test"), context, device),
    )


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, step, purpose), stable across platforms."""
    h = 1_469_598_103_934_665_603
    for part in parts:
        h = ((h ^ (part & 0xFFFFFFFFFFFFFFFF)) * 1_099_511_628_211) % (1 << 64)
    return h >> 1


def validation_count(validation_size: int | None, n_train: int) -> int:
    """The number of held-out images: the configured one, or min(5000, n_train // 10)."""
    return min(5000, n_train // 10) if validation_size is None else validation_size


def prepare_splits(
    dataset: ImageDataset, validation_size: int | None, device: torch.device
) -> tuple[Split, Split | None, Split]:
    """(train, validation or None, test), normalised with the training images' statistics."""
    n = int(dataset.train_y.shape[0])
    validation_size = validation_count(validation_size, n)
    if validation_size >= n:
        raise ConfigError(
            f"data.validation_size ({validation_size}) must be smaller than the training "
            f"set of {dataset.name} ({n} images)"
        )
    mean = torch.tensor(dataset.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(dataset.std, dtype=torch.float32).view(1, -1, 1, 1)

    def normalise(images: Tensor) -> Tensor:
        return ((images.to(torch.float32) / 255.0 - mean) / std).to(device).contiguous()

    train_x, train_y = dataset.train_x, dataset.train_y
    validation = None
    if validation_size > 0:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
        keep, held = perm[: n - validation_size].sort().values, perm[n - validation_size :]
        validation = Split(normalise(train_x[held]), train_y[held].to(device))
        train_x, train_y = train_x[keep], train_y[keep]
    train = Split(normalise(train_x), train_y.to(device))
    test = Split(normalise(dataset.test_x), dataset.test_y.to(device))
    return train, validation, test


class BatchOrder:
    """Indices of the global batch of each step: one seeded permutation per epoch."""

    def __init__(
        self, n: int, batch_size: int, seed: int, steps_per_epoch: int | None = None
    ) -> None:
        if batch_size > n:
            raise ConfigError(
                f"train.batch_size ({batch_size}) is larger than the training set ({n} samples)"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        full = n // batch_size
        self.steps_per_epoch = (
            full if steps_per_epoch is None else max(1, min(steps_per_epoch, full))
        )
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def indices(self, step: int) -> Tensor:
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, 0xDA7A))
            self._perm = torch.randperm(self.n, generator=gen)
            self._epoch = epoch
        start = position * self.batch_size
        return self._perm[start : start + self.batch_size]
