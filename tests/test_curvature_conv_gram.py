"""The correlation path for the Conv2d A factor (stride 1, "same" padding) against the im2col
path and against float64 references built from explicitly sliced patches and from unfold."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bigbatch import SPNGD
from bigbatch.curvature.blocks.conv import _is_same_stride1, conv2d_input_sum, conv2d_patches
from bigbatch.curvature.blocks.conv_gram import same_conv2d_gram
from bigbatch.curvature.blocks.kronecker import gram_with_ones
from bigbatch.curvature.keys import Factor

DT = torch.float64


def _sliced_patches(x: Tensor, kh: int, kw: int) -> Tensor:
    """(N, H*W, C*kh*kw) patches of a stride-1 'same' conv by slicing a zero-padded copy."""
    n, c, h, w = x.shape
    ph, pw = kh // 2, kw // 2
    xp = torch.zeros(n, c, h + 2 * ph, w + 2 * pw, dtype=x.dtype)
    xp[:, :, ph : ph + h, pw : pw + w] = x
    cols = [xp[:, :, r : r + kh, q : q + kw].reshape(n, -1) for r in range(h) for q in range(w)]
    return torch.stack(cols, dim=1)


def _reference(x: Tensor, kh: int, kw: int, bias: bool) -> Tensor:
    """Sum over samples of the per-sample Gram sum_p a_p a_p^T (float64), a = [patch, 1]."""
    patches = _sliced_patches(x.double(), kh, kw)
    unfolded = F.unfold(x.double(), (kh, kw), padding=(kh // 2, kw // 2)).transpose(1, 2)
    torch.testing.assert_close(patches, unfolded, rtol=0, atol=0)  # the two references agree
    if bias:
        patches = torch.cat([patches, torch.ones_like(patches[..., :1])], dim=-1)
    return sum(
        (p.T @ p for p in patches), torch.zeros(patches.shape[-1], patches.shape[-1], dtype=DT)
    )


def _im2col_gram(x: Tensor, conv: nn.Conv2d, bias: bool) -> Tensor:
    patches = conv2d_patches(x, conv)
    return gram_with_ones(patches.reshape(-1, patches.shape[-1]), bias)


# (N, C, H, W, kernel)
CASES = [
    (3, 2, 5, 7, (3, 3)),  # non-square image
    (1, 3, 4, 4, (3, 3)),  # batch 1
    (2, 4, 9, 6, (5, 5)),
    (2, 2, 3, 2, (5, 5)),  # image smaller than the kernel: every line is an edge line
    (2, 3, 4, 6, (1, 1)),
    (2, 2, 5, 9, (3, 5)),  # non-square kernel
    (4, 1, 1, 1, (3, 3)),
    (2, 5, 7, 3, (1, 3)),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("n", "c", "h", "w", "kernel"), CASES)
def test_correlation_gram_matches_patch_references_float64(
    n: int, c: int, h: int, w: int, kernel: tuple[int, int], bias: bool
) -> None:
    torch.manual_seed(n * 100 + c * 10 + h)
    x = torch.randn(n, c, h, w, dtype=DT) + 0.3  # nonzero mean: the bias column matters
    want = _reference(x, *kernel, bias)
    got = same_conv2d_gram(x, *kernel, bias)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)
    conv = nn.Conv2d(c, 2, kernel, padding="same", bias=bias).to(DT)
    assert _is_same_stride1(conv)
    a_im2col = _im2col_gram(x, conv, bias)
    torch.testing.assert_close(got, a_im2col, rtol=1e-12, atol=1e-10)
    a_hooks, rows = conv2d_input_sum(x, conv, bias)
    assert rows == n * h * w
    torch.testing.assert_close(a_hooks, got, rtol=0, atol=0)  # the library takes this path


def test_correlation_gram_float32_accuracy() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 8, 12, 10).relu()
    conv = nn.Conv2d(8, 4, 3, padding=1)
    got, _ = conv2d_input_sum(x, conv, True)
    assert got.dtype == torch.float32
    want = _reference(x, 3, 3, True)
    rel = float(torch.linalg.matrix_norm(got.double() - want) / torch.linalg.matrix_norm(want))
    assert rel < 1e-6


def test_explicit_padding_and_unbatched_input_use_the_correlation_path() -> None:
    torch.manual_seed(1)
    x = torch.randn(3, 6, 5, dtype=DT)
    conv = nn.Conv2d(3, 2, (3, 5), padding=(1, 2)).to(DT)
    assert _is_same_stride1(conv)
    a, rows = conv2d_input_sum(x, conv, True)
    assert rows == 30
    torch.testing.assert_close(a, _reference(x[None], 3, 5, True), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.Conv2d(2, 3, 3, padding=1, dilation=2),
        nn.Conv2d(2, 3, 3, padding=0),
        nn.Conv2d(2, 3, 2, padding="same"),
        nn.Conv2d(2, 3, (3, 3), padding=(1, 0)),
    ],
)
def test_other_configurations_fall_back_to_im2col(conv: nn.Conv2d) -> None:
    conv = conv.to(DT)
    x = torch.randn(2, 2, 7, 6, dtype=DT)
    assert not _is_same_stride1(conv)
    got, _ = conv2d_input_sum(x, conv, True)
    torch.testing.assert_close(got, _im2col_gram(x, conv, True), rtol=0, atol=0)


def test_hooked_conv_factor_matches_reference() -> None:
    """Through SPNGD's hooks (correlation path) the A factor is the mean of a a^T over the
    N P patches."""
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 2, 5, padding=2, bias=False),
        nn.Flatten(),
        nn.Linear(2 * 6 * 5, 3),
    ).to(DT)
    x, y = torch.randn(5, 3, 6, 5, dtype=DT), torch.randint(0, 3, (5,))
    opt = SPNGD(model, lr=0.0, momentum=0.0, staleness=False)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    torch.testing.assert_close(
        opt.engine.stats[("0", Factor.A)], _reference(x, 3, 3, True) / (5 * 30)
    )
    h = model[1](model[0](x)).detach()
    torch.testing.assert_close(
        opt.engine.stats[("2", Factor.A)], _reference(h, 5, 5, False) / (5 * 30)
    )
