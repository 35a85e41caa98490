"""Soft training targets: label smoothing, mixup, running mixup, soft-target cross-entropy.

For: turning a batch's class indices into soft targets (``N x classes`` rows summing to 1),
mixing inputs and targets (mixup of Zhang et al. 2018, and the "running mixup" of SP-NGD's
large-batch recipe), and the matching loss. Not for: augmentation of single images (see
:mod:`bigbatch.train.augment`), or evaluation losses (use ``F.cross_entropy`` on indices).

Randomness: :class:`Mixup` draws everything from the ``torch.Generator`` passed to each call.
Beta(alpha, alpha) samples are not available from torch with a generator
(``torch.distributions.Beta`` and ``torch._standard_gamma`` use the global generator), so each
call draws one integer seed ``torch.randint(0, 2**62, (1,), generator=generator)`` and samples
lambda with ``numpy.random.default_rng(seed).beta(alpha, alpha, size)``. The torch generator's
state therefore determines every lambda: saving it (and :meth:`Mixup.state_dict`) makes a run
resumable and reproducible.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Mixup", "one_hot_smooth", "soft_cross_entropy"]


def one_hot_smooth(y: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """Smoothed one-hot targets: ``(1 - smoothing) one_hot(y) + smoothing / num_classes``.

    The convention of ``F.cross_entropy(..., label_smoothing=smoothing)``: the true class
    gets ``1 - smoothing + smoothing / num_classes``, every other ``smoothing / num_classes``;
    rows sum to 1. Returns a float tensor (the default dtype) on ``y``'s device.

    Raises:
        ValueError: ``y`` not a 1-D integer tensor with values in ``[0, num_classes)``,
            ``num_classes < 1`` or ``smoothing`` outside ``[0, 1]``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing!r}")
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"y must be a 1-D integer tensor, got {y.dtype} {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"y must hold class indices in [0, num_classes={num_classes})")
    off = smoothing / num_classes
    target = torch.full((y.shape[0], num_classes), off, device=y.device)
    target.scatter_(1, y.long()[:, None], 1.0 - smoothing + off)
    return target


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of ``-(target * log_softmax(logits)).sum(1)``.

    Equals ``F.cross_entropy(logits, y)`` for one-hot targets and
    ``F.cross_entropy(logits, y, label_smoothing=s)`` for ``one_hot_smooth(y, C, s)``.
    """
    if logits.dim() != 2 or logits.shape != target.shape:
        raise ValueError(
            "logits and target must both be N x classes, got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


class Mixup:
    """Mixup of inputs and soft targets, plain or running.

    Plain (``running=False``, Zhang et al. 2018): ``x' = lam x + (1 - lam) x[perm]`` and the
    same for the targets, with ``perm = torch.randperm(N, generator=generator)`` (drawn after
    the lambda seed) and ``lam ~ Beta(alpha, alpha)`` as drawn.

    Running (``running=True``, SP-NGD's recipe): each sample is mixed with the previous
    *mixed* batch, ``x'_i = lam x_i + (1 - lam) prev_x[i]`` (likewise targets), with
    ``lam = max(l, 1 - l)``, ``l ~ Beta(alpha, alpha)``, so the current batch always weighs
    at least 1/2; the mixed batch becomes the new state. Rules for the edge cases:

    - first batch (or after :meth:`reset`): nothing to mix with; the batch is returned
      unchanged (lambda = 1) and stored. The lambda seed is drawn anyway, so the generator
      advances by the same amount on every call.
    - batch sizes differ (the last, partial batch of an epoch, or the next full batch after
      it): with ``M`` stored samples, sample ``i`` is paired with stored sample ``i mod M``.
      A smaller batch (``N < M``) replaces only the first ``N`` stored samples, so the state
      keeps ``M`` samples; a larger one (``N > M``) replaces the whole state.
    - the per-sample shapes of ``x`` and of the targets must not change between calls.

    ``per_sample=True`` draws one lambda per sample instead of one per batch (both modes).
    The state (previous mixed batch, detached, on the inputs' device) is in
    :meth:`state_dict`; :attr:`last_lambda` holds the lambda(s) of the latest call
    (shape ``(1,)`` or ``(N,)``), for logging.
    """

    def __init__(self, alpha: float, *, running: bool = False, per_sample: bool = False) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"alpha must be a number > 0, got {alpha!r}")
        self.alpha = float(alpha)
        self.running = bool(running)
        self.per_sample = bool(per_sample)
        self.prev_x: Tensor | None = None
        self.prev_y: Tensor | None = None
        self.last_lambda: Tensor | None = None

    def __repr__(self) -> str:
        return f"Mixup(alpha={self.alpha}, running={self.running}, per_sample={self.per_sample})"

    def reset(self) -> None:
        """Forget the previous mixed batch (running mixup starts over)."""
        self.prev_x = None
        self.prev_y = None

    def sample_lambda(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` float64 samples of Beta(alpha, alpha), seeded from ``generator`` (one draw)."""
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        lam = np.random.default_rng(seed).beta(self.alpha, self.alpha, size=n)
        return torch.from_numpy(lam)

    def __call__(
        self, x: Tensor, y_soft: Tensor, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Mix ``x`` (``N x ...``) and ``y_soft`` (``N x classes``); see the class docstring."""
        n = x.shape[0]
        if y_soft.dim() != 2 or y_soft.shape[0] != n or not y_soft.is_floating_point():
            raise ValueError(
                f"y_soft must be a float N x classes tensor with N = {n}, got "
                f"{y_soft.dtype} {tuple(y_soft.shape)}"
            )
        if n == 0:
            raise ValueError("cannot mix an empty batch")
        lam = self.sample_lambda(n if self.per_sample else 1, generator)
        stored: tuple[Tensor, Tensor] | None = None
        if self.running:
            lam = torch.maximum(lam, 1.0 - lam)
            if self.prev_x is None or self.prev_y is None:
                self.last_lambda = torch.ones_like(lam)
                self.prev_x, self.prev_y = x.detach().clone(), y_soft.detach().clone()
                return x, y_soft
            if self.prev_x.shape[1:] != x.shape[1:] or self.prev_y.shape[1:] != y_soft.shape[1:]:
                raise ValueError(
                    "running mixup needs the same per-sample shapes on every call: stored "
                    f"{tuple(self.prev_x.shape[1:])} / {tuple(self.prev_y.shape[1:])}, got "
                    f"{tuple(x.shape[1:])} / {tuple(y_soft.shape[1:])}"
                )
            stored = (self.prev_x, self.prev_y)
            m = self.prev_x.shape[0]
            index = torch.arange(n, device=self.prev_x.device) % m
            other_x, other_y = self.prev_x[index], self.prev_y[index]
        else:
            perm = torch.randperm(n, generator=generator, device=generator.device)
            perm = perm.to(x.device)
            other_x, other_y = x[perm], y_soft[perm]
        self.last_lambda = lam
        lam_x = lam.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        lam_y = lam.to(device=y_soft.device, dtype=y_soft.dtype).reshape(-1, 1)
        mixed_x = lam_x * x + (1.0 - lam_x) * other_x.to(x.device)
        mixed_y = lam_y * y_soft + (1.0 - lam_y) * other_y.to(y_soft.device)
        if stored is not None:
            new_x, new_y = mixed_x.detach().clone(), mixed_y.detach().clone()
            if n < stored[0].shape[0]:
                new_x = torch.cat([new_x, stored[0][n:].to(new_x.device)])
                new_y = torch.cat([new_y, stored[1][n:].to(new_y.device)])
            self.prev_x, self.prev_y = new_x, new_y
        return mixed_x, mixed_y

    def state_dict(self) -> dict[str, Any]:
        """Settings and the stored previous mixed batch (``None`` before the first call)."""
        return {
            "alpha": self.alpha,
            "running": self.running,
            "per_sample": self.per_sample,
            "prev_x": self.prev_x,
            "prev_y": self.prev_y,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (settings must match this instance's)."""
        for key in ("alpha", "running", "per_sample"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"mixup state has {key}={state[key]!r}, this Mixup {getattr(self, key)!r}"
                )
        prev_x, prev_y = state.get("prev_x"), state.get("prev_y")
        if (prev_x is None) != (prev_y is None):
            raise ValueError("mixup state must hold both prev_x and prev_y, or neither")
        self.prev_x = None if prev_x is None else prev_x.detach().clone()
        self.prev_y = None if prev_y is None else prev_y.detach().clone()
