"""Tests of :mod:`bigbatch.train.augment` against per-sample numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bigbatch.train.augment import random_crop_flip, random_erasing


def known_batch(n: int = 64, c: int = 2, h: int = 6, w: int = 5) -> torch.Tensor:
    """Every pixel distinct and positive (so zero padding is recognisable)."""
    return torch.arange(1, n * c * h * w + 1, dtype=torch.float32).reshape(n, c, h, w)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def numpy_crop_flip(
    x: np.ndarray, top: np.ndarray, left: np.ndarray, flipped: np.ndarray, padding: int
) -> np.ndarray:
    """Per-sample reference: zero-pad, slice the window, flip with ``[:, :, ::-1]``."""
    _, _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        crop = padded[i, :, top[i] : top[i] + h, left[i] : left[i] + w]
        out[i] = crop[:, :, ::-1] if flipped[i] else crop
    return out


@pytest.mark.parametrize("flip", [True, False])
def test_crop_flip_equals_numpy_reference(flip: bool) -> None:
    x = known_batch()
    padding = 2
    out = random_crop_flip(x, padding=padding, generator=gen(7), flip=flip)
    # Reproduce the documented draws: top, left, then the flip coins.
    g = gen(7)
    top = torch.randint(0, 2 * padding + 1, (64,), generator=g).numpy()
    left = torch.randint(0, 2 * padding + 1, (64,), generator=g).numpy()
    flipped = (torch.rand(64, generator=g) < 0.5).numpy() if flip else np.zeros(64, bool)
    expected = numpy_crop_flip(x.numpy(), top, left, flipped, padding)
    np.testing.assert_array_equal(out.numpy(), expected)
    # The draws cover the whole range of offsets and both flip states.
    assert set(top.tolist()) == set(range(5))
    assert set(left.tolist()) == set(range(5))
    if flip:
        assert 0 < flipped.sum() < 64


def test_crop_each_sample_is_one_window_of_its_padded_image() -> None:
    """Without reproducing the draws: every output sample is exactly one (offset, flip) window."""
    x = known_batch(n=32)
    padding = 1
    out = random_crop_flip(x, padding=padding, generator=gen(3)).numpy()
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)))
    seen = set()
    for i in range(32):
        matches = []
        for dy in range(3):
            for dx in range(3):
                win = padded[i, :, dy : dy + 6, dx : dx + 5]
                for f in (False, True):
                    if np.array_equal(out[i], win[:, :, ::-1] if f else win):
                        matches.append((dy, dx, f))
        assert len(matches) == 1, (i, matches)
        seen.add(matches[0])
    assert len(seen) > 6  # offsets and flips really vary


def test_flip_without_padding_mirrors_columns() -> None:
    x = known_batch(n=200)
    out = random_crop_flip(x, padding=0, generator=gen(1))
    g = gen(1)
    torch.randint(0, 1, (200,), generator=g)
    torch.randint(0, 1, (200,), generator=g)
    flipped = torch.rand(200, generator=g) < 0.5
    assert torch.equal(out[flipped], x[flipped][..., [4, 3, 2, 1, 0]])
    assert torch.equal(out[~flipped], x[~flipped])
    assert 60 < int(flipped.sum()) < 140


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_crop_shape_dtype_and_input_untouched(dtype: torch.dtype) -> None:
    x = torch.randn(5, 3, 8, 8, generator=gen(0), dtype=dtype)
    before = x.clone()
    out = random_crop_flip(x, padding=4, generator=gen(0))
    assert out.shape == x.shape
    assert out.dtype == dtype
    assert torch.equal(x, before)


def test_crop_reproducible_with_same_seed_and_resumable() -> None:
    x = known_batch()
    a = random_crop_flip(x, padding=3, generator=gen(11))
    b = random_crop_flip(x, padding=3, generator=gen(11))
    assert torch.equal(a, b)
    assert not torch.equal(a, random_crop_flip(x, padding=3, generator=gen(12)))
    # Saving the generator state mid-run and restoring it reproduces the next batch.
    g = gen(5)
    random_crop_flip(x, padding=3, generator=g)
    state = g.get_state()
    second = random_crop_flip(x, padding=3, generator=g)
    g2 = torch.Generator()
    g2.set_state(state)
    assert torch.equal(second, random_crop_flip(x, padding=3, generator=g2))


def test_crop_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="padding"):
        random_crop_flip(torch.zeros(1, 1, 4, 4), padding=-1, generator=gen(0))
    with pytest.raises(ValueError, match="x must be"):
        random_crop_flip(torch.zeros(1, 4, 4), padding=1, generator=gen(0))
    with pytest.raises(ValueError, match="x must be"):
        random_crop_flip(torch.zeros(1, 1, 4, 4, dtype=torch.long), padding=1, generator=gen(0))


def erased_rectangles(x: torch.Tensor, out: torch.Tensor) -> list[tuple[int, int, int, int] | None]:
    """(top, left, h, w) of the changed region per sample, checking it is a full rectangle."""
    result: list[tuple[int, int, int, int] | None] = []
    changed = (out != x).any(dim=1).numpy()  # N x H x W
    for m in changed:
        if not m.any():
            result.append(None)
            continue
        rows = np.flatnonzero(m.any(axis=1))
        cols = np.flatnonzero(m.any(axis=0))
        t, l_ = rows[0], cols[0]
        h, w = rows[-1] - t + 1, cols[-1] - l_ + 1
        assert m.sum() == h * w  # a solid rectangle, nothing else changed
        result.append((int(t), int(l_), int(h), int(w)))
    return result


def test_erasing_area_and_aspect_within_bounds() -> None:
    n, c, h, w = 500, 3, 32, 32
    x = torch.rand(n, c, h, w, generator=gen(0)) + 1.0  # never equal to the value 0
    scale, ratio = (0.02, 0.33), (0.3, 3.3)
    out = random_erasing(x, p=1.0, generator=gen(4), scale=scale, ratio=ratio, value=0.0)
    rects = erased_rectangles(x, out)
    erased = [r for r in rects if r is not None]
    assert len(erased) > 0.9 * n
    for r in erased:
        _, _, eh, ew = r
        assert scale[0] * h * w <= eh * ew <= scale[1] * h * w
        assert 1 <= eh < h
        assert 1 <= ew < w
    # All channels of the rectangle are set to the value; the rest is untouched.
    changed = (out != x).any(dim=1, keepdim=True).expand_as(x)
    assert torch.all(out[changed] == 0.0)
    assert torch.equal(out[~changed], x[~changed])
    # Rounded aspect ratios are spread over roughly the whole log range.
    log_aspect = np.log([r[2] / r[3] for r in erased])
    assert log_aspect.min() < math.log(0.5)
    assert log_aspect.max() > math.log(2.0)


def test_erasing_matches_documented_draws() -> None:
    n, h, w = 40, 10, 12
    x = torch.rand(n, 1, h, w, generator=gen(0)) + 1.0
    p, scale, ratio = 0.5, (0.05, 0.4), (0.5, 2.0)
    out = random_erasing(x, p=p, generator=gen(9), scale=scale, ratio=ratio, value=-1.0)
    g = gen(9)
    chosen = (torch.rand(n, generator=g) < p).numpy()
    a = torch.rand(n, 10, generator=g).double().numpy()
    r = torch.rand(n, 10, generator=g).double().numpy()
    u = torch.rand(n, generator=g).double().numpy()
    v = torch.rand(n, generator=g).double().numpy()
    rects = erased_rectangles(x, out)
    for i in range(n):
        expected = None
        if chosen[i]:
            for k in range(10):
                area = (scale[0] + (scale[1] - scale[0]) * a[i, k]) * h * w
                log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * r[i, k]
                asp = math.exp(log_r)
                eh, ew = round(math.sqrt(area * asp)), round(math.sqrt(area / asp))
                if 1 <= eh < h and 1 <= ew < w and scale[0] * h * w <= eh * ew <= scale[1] * h * w:
                    top = min(math.floor(u[i] * (h - eh + 1)), h - eh)
                    left = min(math.floor(v[i] * (w - ew + 1)), w - ew)
                    expected = (top, left, eh, ew)
                    break
        assert rects[i] == expected, i
    assert 5 < sum(r is not None for r in rects) < 35


def test_erasing_p_zero_is_identity_and_p_selects_fraction() -> None:
    x = torch.rand(300, 1, 16, 16, generator=gen(0)) + 1.0
    assert torch.equal(random_erasing(x, p=0.0, generator=gen(1)), x)
    out = random_erasing(x, p=0.3, generator=gen(1))
    frac = sum(r is not None for r in erased_rectangles(x, out)) / 300
    assert 0.2 < frac < 0.4


def test_erasing_reproducible_shape_dtype() -> None:
    x = torch.rand(8, 3, 16, 16, generator=gen(0), dtype=torch.float64)
    a = random_erasing(x, p=0.7, generator=gen(2))
    assert torch.equal(a, random_erasing(x, p=0.7, generator=gen(2)))
    assert a.shape == x.shape
    assert a.dtype == torch.float64


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"p": 1.5}, "p must"),
        ({"p": 0.5, "scale": (0.5, 0.1)}, "scale"),
        ({"p": 0.5, "scale": (0.0, 0.1)}, "scale"),
        ({"p": 0.5, "ratio": (2.0, 1.0)}, "ratio"),
    ],
)
def test_erasing_rejects_bad_arguments(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        random_erasing(torch.zeros(2, 1, 8, 8), generator=gen(0), **kwargs)  # type: ignore[arg-type]
