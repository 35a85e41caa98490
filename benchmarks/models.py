"""Benchmark models, in plain PyTorch (no torchvision).

- :func:`resnet20`: the CIFAR ResNet-20 of He et al. (2016) from the package
  (:func:`bigbatch.train.models.build_model`; option-A shortcuts, 269,722 parameters).
- :func:`mlp`: the package's MLP, 784-1024-1024-10.

Both are the package's models (:func:`bigbatch.train.models.build_model`), so the
benchmarks measure what the harness trains. Seed the global generator before building a
model to get the same weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from bigbatch.train.models import build_model

__all__ = ["MODEL_SPECS", "ModelSpec", "mlp", "resnet20"]


def resnet20(num_classes: int = 10) -> nn.Module:
    """ResNet-20 (3 stages x 3 basic blocks, 16/32/64 channels, option A): 269,722 params."""
    return build_model("resnet20", in_channels=3, image_size=32, num_classes=num_classes)


def mlp(width: int = 1024) -> nn.Module:
    """The package's MLP (flatten, two hidden ReLU layers of ``width``, a linear head) on
    784 inputs: 784-1024-1024-10 by default, 1,863,690 parameters."""
    return build_model("mlp", in_channels=1, image_size=28, num_classes=10, width=width)


class ModelSpec:
    """A benchmark model: how to build it and the shape of one input sample."""

    def __init__(
        self, name: str, build: Callable[[], nn.Module], input_shape: tuple[int, ...]
    ) -> None:
        self.name = name
        self.build = build
        self.input_shape = input_shape

    def random_batch(
        self, batch_size: int, num_classes: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        x = torch.randn((batch_size, *self.input_shape), generator=generator)
        y = torch.randint(0, num_classes, (batch_size,), generator=generator)
        return x, y


MODEL_SPECS: dict[str, ModelSpec] = {
    "resnet20": ModelSpec("resnet20", resnet20, (3, 32, 32)),
    "mlp": ModelSpec("mlp", mlp, (784,)),
}
