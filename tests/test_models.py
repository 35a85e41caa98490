"""Tests of :mod:`bigbatch.train.models`: parameter counts by formula, shapes, errors, training.

The ResNet counts are computed here from the architecture of He et al. (2016), section 4.2,
independently of the code, and checked against the paper's 0.27M / 0.46M / 0.85M.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bigbatch.train.models import MODEL_NAMES, build_model, count_parameters

#: the image models (the language model "gpt" has its own tests in test_text_lm.py)
IMAGE_MODELS = tuple(name for name in MODEL_NAMES if name != "gpt")


def resnet_param_count(n: int, in_channels: int, num_classes: int, w: int = 16) -> int:
    """Option-A CIFAR ResNet with 3 stages of n basic blocks: convs (no bias), BN, head."""

    def conv(cin: int, cout: int) -> int:
        return 9 * cin * cout

    def bn(c: int) -> int:
        return 2 * c

    total = conv(in_channels, w) + bn(w)
    cin = w
    for c in (w, 2 * w, 4 * w):
        for _ in range(n):
            total += conv(cin, c) + bn(c) + conv(c, c) + bn(c)
            cin = c
    return total + 4 * w * num_classes + num_classes


def test_names() -> None:
    assert MODEL_NAMES == ("mlp", "cnn", "resnet20", "resnet32", "resnet56", "gpt")


def test_resnet20_count_is_the_known_value() -> None:
    assert resnet_param_count(3, 3, 10) == 269_722
    model = build_model("resnet20", in_channels=3, image_size=32, num_classes=10)
    assert count_parameters(model) == 269_722


@pytest.mark.parametrize(
    ("name", "n", "paper_millions"),
    [("resnet20", 3, 0.27), ("resnet32", 5, 0.46), ("resnet56", 9, 0.85)],
)
@pytest.mark.parametrize(("in_channels", "num_classes"), [(3, 10), (1, 10), (3, 100)])
def test_resnet_counts(
    name: str, n: int, paper_millions: float, in_channels: int, num_classes: int
) -> None:
    model = build_model(name, in_channels=in_channels, image_size=32, num_classes=num_classes)
    expected = resnet_param_count(n, in_channels, num_classes)
    assert count_parameters(model) == expected
    if (in_channels, num_classes) == (3, 10):
        assert round(expected / 1e6, 2) == paper_millions
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6 * n + 1  # plus the head: 6n + 2 weight layers, no 1x1 shortcuts
    assert all(m.kernel_size == (3, 3) for m in convs)


def test_resnet_option_a_shortcut_matches_definition() -> None:
    """The first stage-2 block's shortcut is x[:, :, ::2, ::2] with 8 zero channels each side."""
    model = build_model("resnet20", in_channels=3, image_size=32, num_classes=10)
    block = model.layers[3]  # type: ignore[index]
    x = torch.randn(2, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(out[:, :8]) == 0
    assert torch.count_nonzero(out[:, 24:]) == 0


def test_cnn_and_mlp_counts() -> None:
    cnn = build_model("cnn", in_channels=1, image_size=28, num_classes=10)
    # conv 1->16, 16->32, 32->64 (3x3, no bias), BN pairs, linear 64*3*3 -> 10.
    expected_cnn = 9 * 16 + 9 * 16 * 32 + 9 * 32 * 64 + 2 * (16 + 32 + 64) + 576 * 10 + 10
    assert count_parameters(cnn) == expected_cnn == 29_178
    mlp = build_model("mlp", in_channels=1, image_size=28, num_classes=10, width=100)
    assert count_parameters(mlp) == 785 * 100 + 101 * 100 + 101 * 10


@pytest.mark.parametrize("name", IMAGE_MODELS)
@pytest.mark.parametrize(("in_channels", "image_size"), [(1, 28), (3, 32), (3, 8)])
def test_forward_shapes(name: str, in_channels: int, image_size: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, in_channels=in_channels, image_size=image_size, num_classes=7)
    out = model(torch.randn(3, in_channels, image_size, image_size))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


def test_only_kfac_supported_parametrised_modules() -> None:
    allowed = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)
    for name in IMAGE_MODELS:
        model = build_model(name, in_channels=3, image_size=32, num_classes=10)
        for m in model.modules():
            if any(True for _ in m.parameters(recurse=False)):
                assert isinstance(m, allowed), (name, type(m))
            if isinstance(m, nn.Conv2d):
                assert m.groups == 1
                assert m.padding_mode == "zeros"


def test_seeded_build_is_reproducible_and_kaiming() -> None:
    torch.manual_seed(3)
    a = build_model("resnet20", in_channels=3, image_size=32, num_classes=10)
    torch.manual_seed(3)
    b = build_model("resnet20", in_channels=3, image_size=32, num_classes=10)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    # Kaiming normal, fan-out: std = sqrt(2 / (64 * 9)) for the 64-channel convs.
    w = torch.cat(
        [
            m.weight.flatten()
            for m in a.modules()
            if isinstance(m, nn.Conv2d) and m.out_channels == 64
        ]
    )
    assert w.std().item() == pytest.approx((2 / (64 * 9)) ** 0.5, rel=0.02)


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(ValueError, match="resnet56") as info:
        build_model("vgg", in_channels=3, image_size=32, num_classes=10)
    assert "vgg" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"in_channels": 0, "image_size": 32, "num_classes": 10}, "in_channels"),
        ({"in_channels": 3, "image_size": 4, "num_classes": 10}, "image_size"),
        ({"in_channels": 3, "image_size": 32, "num_classes": 1}, "num_classes"),
        ({"in_channels": 3, "image_size": 32, "num_classes": 10, "width": 0}, "width"),
        ({"in_channels": 3.0, "image_size": 32, "num_classes": 10}, "in_channels"),
    ],
)
def test_bad_sizes(kwargs: dict[str, object], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        build_model("cnn", **kwargs)  # type: ignore[arg-type]


def test_mlp_accepts_small_images() -> None:
    model = build_model("mlp", in_channels=1, image_size=2, num_classes=2)
    assert model(torch.randn(4, 1, 2, 2)).shape == (4, 2)


@pytest.mark.parametrize("name", ["cnn", "resnet20"])
def test_fits_a_small_batch(name: str) -> None:
    """A few Adam steps fit 16 randomly labelled images (training loss falls below 10%)."""
    torch.manual_seed(0)
    model = build_model(name, in_channels=1, image_size=8, num_classes=4)
    x = torch.randn(16, 1, 8, 8)
    y = torch.randint(0, 4, (16,))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    first = F.cross_entropy(model(x), y).item()
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first
