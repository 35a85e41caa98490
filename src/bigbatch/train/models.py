"""The harness's models, in plain PyTorch (no torchvision): :func:`build_model` by name.

For: the networks the experiments train, built only from modules the project's K-FAC supports
(``nn.Linear``, ``nn.Conv2d`` with ``groups=1`` and zero padding, ``nn.BatchNorm1d/2d`` with
affine parameters) plus parameter-free functions (ReLU, pooling, option-A shortcuts), so that
SP-NGD preconditions every parameter. Not for: data loading, training loops or benchmarks'
private variants (``benchmarks/models.py`` predates this module and may switch to it).

Models (``MODEL_NAMES``), for ``in_channels x image_size x image_size`` inputs:

- ``"mlp"``: flatten, two hidden ``nn.Linear`` layers of ``width`` units (default 512) with
  ReLU, a linear head. Any ``image_size >= 1``.
- ``"cnn"``: the small BatchNorm CNN of the project's main Fashion-MNIST job, sized so that an
  8192-image batch goes forward and backward in about half a second on two CPU cores::

      conv3x3(w)  stride 2 - BN - ReLU      28 -> 14  (32 -> 16)
      conv3x3(2w) stride 2 - BN - ReLU      14 -> 7   (16 -> 8)
      conv3x3(4w)          - BN - ReLU      7 -> 7    (8 -> 8)
      adaptive average pool to 3 x 3 - flatten (36 w features) - linear

  with ``w = width`` (default 16; 29,178 parameters for 1 x 28 x 28 and 10 classes). Strided
  convs rather than full-resolution convs followed by max-pooling: at batch 8192 a 28 x 28
  first feature map (8192 x 16 x 28 x 28 floats, 400 MB) makes BN, ReLU and pooling
  memory-bound and cost more than all the convolutions (measured 2-3x slower in total). The
  3 x 3 pooled map keeps coarse spatial layout for the head: with global average pooling the
  same network trained markedly slower in the few (~30) steps of a batch-8192 run.
  Convs have no bias (BatchNorm follows). Needs ``image_size >= 8``.
- ``"resnet20"``, ``"resnet32"``, ``"resnet56"``: the CIFAR ResNets of He et al. (2016),
  section 4.2: a 3x3 stem conv with 16 channels, 3 stages of ``n`` basic blocks (``n = 3, 5,
  9``) with 16/32/64 channels (``width``, ``2 width``, ``4 width``), stride 2 at the start of
  stages 2 and 3, BatchNorm after every conv, global average pooling, a linear head.
  Shortcuts are option A, the paper's choice for CIFAR: identity, and on the two downsampling
  blocks stride-2 subsampling with the new channels zero-padded, so shortcuts have no
  parameters. With 3 input channels and 10 classes that gives 269,722 / 464,154 / 853,018
  parameters (the paper's 0.27M / 0.46M / 0.85M). Needs ``image_size >= 8``.
- ``"gpt"``: the causal transformer language model of :mod:`bigbatch.train.lm` for text
  (``num_classes`` = vocabulary, ``context`` = window length; width default 128).

Initialisation: Kaiming normal (fan-out for convs, fan-in for linears, ReLU gain), biases zero,
BatchNorm weight 1 and bias 0. Seed the global generator (``torch.manual_seed``) before
:func:`build_model` for reproducible weights.
"""

from __future__ import annotations

import difflib

import torch.nn.functional as F
from torch import Tensor, nn

from bigbatch.train.lm import CausalLM

__all__ = [
    "MODEL_NAMES",
    "BasicBlock",
    "ResNetCifar",
    "SmallCNN",
    "build_model",
    "count_parameters",
]

MODEL_NAMES = ("mlp", "cnn", "resnet20", "resnet32", "resnet56", "gpt")

_RESNET_BLOCKS = {"resnet20": 3, "resnet32": 5, "resnet56": 9}
_DEFAULT_WIDTH = {
    "mlp": 512,
    "cnn": 16,
    "resnet20": 16,
    "resnet32": 16,
    "resnet56": 16,
    "gpt": 128,
}
_MIN_IMAGE_SIZE = {"mlp": 1, "cnn": 8, "resnet20": 8, "resnet32": 8, "resnet56": 8, "gpt": 1}


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


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
    """Two 3x3 conv-BN layers with an option-A residual connection and ReLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = _ZeroPadShortcut(in_channels, out_channels, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet with ``6 n + 2`` weight layers (He et al. 2016, section 4.2), option A."""

    def __init__(
        self, blocks_per_stage: int, *, in_channels: int, num_classes: int, width: int = 16
    ) -> None:
        super().__init__()
        widths = (width, 2 * width, 4 * width)
        self.conv = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        layers: list[nn.Module] = []
        channels = widths[0]
        for stage, stage_width in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(channels, stage_width, stride))
                channels = stage_width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.conv(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        logits: Tensor = self.fc(out)
        return logits


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU layers (``w``, ``2w``, ``4w`` channels), 3x3 pooling, linear head.

    See the module docstring for the layout and the reasons for it.
    """

    pooled_size = 3

    def __init__(self, *, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, 1, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.fc = nn.Linear(4 * width * self.pooled_size**2, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.relu(self.bn3(self.conv3(out)))
        out = F.adaptive_avg_pool2d(out, self.pooled_size).flatten(1)
        logits: Tensor = self.fc(out)
        return logits


def _mlp(in_features: int, width: int, num_classes: int) -> nn.Sequential:
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, num_classes),
    )
    _init_weights(model)
    return model


def _check_positive_int(name: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def build_model(
    name: str,
    *,
    in_channels: int = 1,
    image_size: int = 1,
    num_classes: int,
    width: int | None = None,
    context: int | None = None,
    depth: int = 2,
    heads: int = 4,
    attention: str = "mha",
    dropout: float = 0.0,
) -> nn.Module:
    """Build the model ``name`` (one of :data:`MODEL_NAMES`) for square images.

    Args:
        name: ``"mlp"``, ``"cnn"``, ``"resnet20"``, ``"resnet32"`` or ``"resnet56"``.
        in_channels: image channels (1 for Fashion-MNIST, 3 for CIFAR).
        image_size: image height = width (at least 8 for the conv models).
        num_classes: outputs of the linear head (at least 2).
        width: hidden units of the MLP (default 512), first-layer channels of the CNN and
            ResNets (default 16; later stages use 2x and 4x), the language model's width
            (default 128). ``None`` takes the default.
        context, depth, heads, attention, dropout: the language model's (``"gpt"``).

    Raises:
        ValueError: unknown ``name`` (the message lists the valid ones) or an invalid size,
            naming the argument.
    """
    if name not in MODEL_NAMES:
        close = difflib.get_close_matches(str(name), list(MODEL_NAMES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name!r}{hint} (valid names: {', '.join(MODEL_NAMES)})")
    _check_positive_int("in_channels", in_channels)
    _check_positive_int("image_size", image_size, _MIN_IMAGE_SIZE[name])
    _check_positive_int("num_classes", num_classes, 2)
    if width is None:
        width = _DEFAULT_WIDTH[name]
    _check_positive_int("width", width)
    if name == "gpt":
        if context is None:
            raise ValueError("the gpt model needs a context (tokens per window)")
        return CausalLM(
            num_classes,
            context,
            width=width,
            depth=depth,
            heads=heads,
            attention=attention,
            dropout=dropout,
        )
    if name == "mlp":
        return _mlp(in_channels * image_size * image_size, width, num_classes)
    if name == "cnn":
        return SmallCNN(in_channels=in_channels, num_classes=num_classes, width=width)
    return ResNetCifar(
        _RESNET_BLOCKS[name], in_channels=in_channels, num_classes=num_classes, width=width
    )
