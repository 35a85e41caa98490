"""Benchmark models, in plain PyTorch (no torchvision).

- :func:`resnet20`: the CIFAR ResNet-20 of He et al. (2016), section 4.2: a 3x3 stem conv with
  16 channels, then 3 stages of 3 basic blocks with 16/32/64 channels (stride 2 at the start
  of stages 2 and 3), BatchNorm after every conv, global average pooling and a linear head.
  Shortcuts are option A (identity; on a downsampling block, stride-2 subsampling and zero
  padding of the new channels), so the model has 269,722 parameters for 10 classes. Option B
  (a 1x1 conv + BatchNorm projection on downsampling blocks; 272,474 parameters) is available
  too.
- :func:`mlp`: a fully connected ReLU network, by default 784-1024-1024-10.

Weights use He (Kaiming normal, fan-out for convs) initialisation; BatchNorm starts at
weight 1, bias 0. Seed the global generator before building a model to get the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MODEL_SPECS", "BasicBlock", "ModelSpec", "ResNetCifar", "mlp", "resnet20"]


class _ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the new channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError("the option-A shortcut cannot reduce channels")
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            half = self.extra // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.extra - half))
        return x


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection and ReLU after the sum."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str = "A"
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _ZeroPadShortcut(in_channels, out_channels, stride)
        elif shortcut == "B":
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR-style ResNet with ``6n + 2`` layers for 3x32x32 inputs."""

    def __init__(
        self,
        blocks_per_stage: int = 3,
        widths: Sequence[int] = (16, 32, 64),
        num_classes: int = 10,
        shortcut: str = "A",
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        layers: list[nn.Module] = []
        in_channels = widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(in_channels, width, stride, shortcut))
                in_channels = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(in_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.conv(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        logits: Tensor = self.fc(out)
        return logits


def resnet20(num_classes: int = 10, shortcut: str = "A") -> ResNetCifar:
    """ResNet-20 (3 stages x 3 basic blocks, 16/32/64 channels): ~0.27M parameters."""
    return ResNetCifar(3, (16, 32, 64), num_classes, shortcut)


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
