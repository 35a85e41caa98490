"""Helpers for harness tests: a small learnable image dataset (no files, no download) and a
Ctrl-C that arrives at a chosen check."""

from __future__ import annotations

import torch

from bigbatch.train.data import ImageDataset
from bigbatch.train.interrupt import GracefulInterrupt


def synthetic_dataset(
    n_train: int = 768, n_test: int = 256, classes: int = 4, size: int = 8, seed: int = 0
) -> ImageDataset:
    """Class-dependent blobs plus noise, uint8, 1 channel; linearly separable-ish."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(classes, 1, size, size, generator=gen) * 160 + 40

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, classes, (n,), generator=gen)
        noise = torch.randn(n, 1, size, size, generator=gen) * 40
        x = (prototypes[y] + noise).clamp(0, 255).round().to(torch.uint8).contiguous()
        return x, y

    train_x, train_y = split(n_train)
    test_x, test_y = split(n_test)
    pixels = train_x.float() / 255
    return ImageDataset(
        name="synthetic",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        classes=tuple(f"c{i}" for i in range(classes)),
        mean=(float(pixels.mean()),),
        std=(float(pixels.std(unbiased=False)),),
        source="memory",
    )


def ctrl_c_at_check(n: int) -> type[GracefulInterrupt]:
    """A :class:`GracefulInterrupt` whose ``requested`` turns true at its ``n``-th reading
    (the loop reads it once per step): patch it into ``bigbatch.train.loop``."""

    class CtrlCAtCheck(GracefulInterrupt):
        checks = 0

        @property  # type: ignore[override]
        def requested(self) -> bool:
            CtrlCAtCheck.checks += 1
            return CtrlCAtCheck.checks == n

        @requested.setter
        def requested(self, value: bool) -> None:
            pass

    return CtrlCAtCheck
