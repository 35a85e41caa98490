"""Benchmark models, in plain PyTorch (no torchvision).

- :func:`resnet20`: the CIFAR ResNet-20 of He et al. (2016) from the package
  (:func:`bigbatch.train.models.build_model`; option-A shortcuts, 269,722 parameters).
- :func:`mlp`: a fully connected ReLU network, by default 784-1024-1024-10.

Weights use He (Kaiming normal, fan-out for convs) initialisation; BatchNorm starts at
weight 1, bias 0. Seed the global generator before building a model to get the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise

import torch
from torch import Tensor, nn

from bigbatch.train.models import build_model

__all__ = ["MODEL_SPECS", "ModelSpec", "mlp", "resnet20"]


def resnet20(num_classes: int = 10) -> nn.Module:
    """ResNet-20 (3 stages x 3 basic blocks, 16/32/64 channels, option A): 269,722 params."""
    return build_model("resnet20", in_channels=3, image_size=32, num_classes=num_classes)


def mlp(sizes: Sequence[int] = (784, 1024, 1024, 10)) -> nn.Sequential:
    """Fully connected ReLU network with the given layer sizes (no activation at the end)."""
    if len(sizes) < 2:
        raise ValueError("an MLP needs at least an input and an output size")
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(pairwise(sizes)):
        linear = nn.Linear(fan_in, fan_out)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers.append(linear)
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


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
