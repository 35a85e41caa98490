"""Batched image augmentation for the harness: random crop + flip and random erasing.

For: augmenting a whole ``N x C x H x W`` float batch at once (vectorised over the batch; no
per-sample Python loop), with every random number drawn from an explicit
:class:`torch.Generator`, so that a run is reproducible and, with the generator's state saved
in a checkpoint, resumable. Not for: normalisation, resizing, colour jitter, or
per-sample ``torchvision``-style transforms (the project does not use torchvision).

Random numbers are drawn on the generator's device (the generator must be a CPU generator
unless ``x`` lives on the generator's device) and moved to ``x``'s device. The number of
draws depends only on the batch shape and the arguments, never on the data or on earlier
draws, and the order of draws is part of the contract (tests reproduce it):

- :func:`random_crop_flip`: ``top = randint(0, 2 padding + 1, (N,))``, then
  ``left = randint(0, 2 padding + 1, (N,))``, then (only when ``flip``) ``rand(N) < 0.5``
  selects the samples flipped left-right. Sample ``i`` of the output is the ``H x W``
  window at ``(top[i], left[i])`` of ``x[i]`` zero-padded (``fill``) by ``padding`` on every
  side, flipped horizontally after cropping when selected.
- :func:`random_erasing` (Zhong et al. 2020), with ``K = 10`` attempts per sample:
  ``rand(N) < p`` selects the samples to erase; then area fractions
  ``scale[0] + (scale[1] - scale[0]) rand(N, K)``, log aspect ratios
  ``log ratio[0] + (log ratio[1] - log ratio[0]) rand(N, K)``, and two ``rand(N)`` for the
  rectangle's position. Attempt ``k`` gives ``h = round(sqrt(a H W r))``,
  ``w = round(sqrt(a H W / r))``; it is valid when ``1 <= h < H``, ``1 <= w < W`` (as in
  torchvision) and, unlike torchvision, when the rounded area ``h w`` itself lies in
  ``[scale[0] H W, scale[1] H W]``. The first valid attempt is used; a sample with none is left
  unchanged (as torchvision does after its 10 attempts). The rectangle's top-left corner is
  ``(floor(u (H - h + 1)), floor(v (W - w + 1)))`` for the two uniforms ``u, v``; all channels
  in it are set to ``value``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ERASING_ATTEMPTS", "random_crop_flip", "random_erasing"]

ERASING_ATTEMPTS = 10


def _check_batch(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(
            "x must be a floating-point N x C x H x W tensor, got "
            f"{type(x).__name__} {getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}"
        )


def _rand(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def random_crop_flip(
    x: Tensor,
    *,
    padding: int,
    generator: torch.Generator,
    flip: bool = True,
    fill: float = 0.0,
) -> Tensor:
    """Random ``H x W`` crops of the ``padding``-padded batch, optionally flipped left-right.

    Args:
        x: float batch ``N x C x H x W`` (not modified).
        padding: pixels of ``fill`` added on each side before cropping (``>= 0``).
        generator: source of all random numbers (see the module docstring for the order).
        flip: also flip each sample horizontally with probability 1/2.
        fill: value of the padding (pad before normalising for black borders).

    Returns:
        A new tensor with the shape, dtype and device of ``x``.
    """
    _check_batch(x)
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an integer >= 0, got {padding!r}")
    n, c, h, w = x.shape
    offsets = 2 * padding + 1
    dev = generator.device
    top = torch.randint(0, offsets, (n,), generator=generator, device=dev).to(x.device)
    left = torch.randint(0, offsets, (n,), generator=generator, device=dev).to(x.device)
    cols = torch.arange(w, device=x.device).expand(n, w)
    if flip:
        flipped = _rand((n,), generator, x.device) < 0.5
        cols = torch.where(flipped[:, None], w - 1 - cols, cols)
    padded = F.pad(x, (padding, padding, padding, padding), value=fill) if padding else x
    rows = top[:, None] + torch.arange(h, device=x.device)  # N x H
    cols = left[:, None] + cols  # N x W
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def random_erasing(
    x: Tensor,
    *,
    p: float,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3),
    value: float = 0.0,
) -> Tensor:
    """Set a random rectangle of each sample, with probability ``p``, to ``value``.

    Args:
        x: float batch ``N x C x H x W`` (not modified).
        p: probability that a sample is erased, in ``[0, 1]``.
        generator: source of all random numbers (see the module docstring for the order).
        scale: range of the erased fraction of the image area, ``0 < lo <= hi <= 1``.
        ratio: range of the rectangle's aspect ratio ``h / w`` (sampled log-uniformly),
            ``0 < lo <= hi``.
        value: what the erased pixels (all channels) are set to.

    Returns:
        A new tensor with the shape, dtype and device of ``x``.
    """
    _check_batch(x)
    if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p!r}")
    s_lo, s_hi = (float(v) for v in scale)
    if not 0.0 < s_lo <= s_hi <= 1.0:
        raise ValueError(f"scale must satisfy 0 < scale[0] <= scale[1] <= 1, got {scale!r}")
    r_lo, r_hi = (float(v) for v in ratio)
    if not 0.0 < r_lo <= r_hi or not math.isfinite(r_hi):
        raise ValueError(f"ratio must satisfy 0 < ratio[0] <= ratio[1] < inf, got {ratio!r}")
    n, _, h, w = x.shape
    dev = x.device
    k = ERASING_ATTEMPTS
    chosen = _rand((n,), generator, dev) < p
    area = (s_lo + (s_hi - s_lo) * _rand((n, k), generator, dev).double()) * (h * w)
    unit = _rand((n, k), generator, dev).double()
    aspect = torch.exp(math.log(r_lo) + (math.log(r_hi) - math.log(r_lo)) * unit)
    eh = torch.round(torch.sqrt(area * aspect)).long()
    ew = torch.round(torch.sqrt(area / aspect)).long()
    erased_area = eh * ew
    valid = (
        (eh >= 1)
        & (eh < h)
        & (ew >= 1)
        & (ew < w)
        & (erased_area >= s_lo * h * w)
        & (erased_area <= s_hi * h * w)
    )
    first = torch.argmax(valid.to(torch.uint8), dim=1, keepdim=True)  # first valid attempt
    erase = chosen & valid.any(dim=1)
    eh = eh.gather(1, first).squeeze(1)
    ew = ew.gather(1, first).squeeze(1)
    u = _rand((n,), generator, dev).double()
    v = _rand((n,), generator, dev).double()
    top = torch.floor(u * (h - eh + 1)).long().clamp_max(h - eh)
    left = torch.floor(v * (w - ew + 1)).long().clamp_max(w - ew)
    rows = torch.arange(h, device=dev)[None, :]
    cols = torch.arange(w, device=dev)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None]) & erase[:, None]  # N x H
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])  # N x W
    mask = in_rows[:, :, None] & in_cols[:, None, :]  # N x H x W
    return torch.where(mask[:, None], torch.tensor(value, dtype=x.dtype, device=dev), x)
