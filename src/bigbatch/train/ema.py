"""Exponential moving average (EMA) of a model's weights, with torch's own machinery.

For: keeping an EMA copy of the model for evaluation, built from
:class:`torch.optim.swa_utils.AveragedModel` and
:func:`torch.optim.swa_utils.get_ema_multi_avg_fn` (nothing re-implemented). Not for: SWA
(equal-weight averaging), or averaging optimizer state.

Usage: ``ema = make_ema(model, 0.999)``; after each optimizer step
``ema.update_parameters(model)``; evaluate ``ema.module`` (in ``eval()`` mode). The first
update copies the model; each later one sets ``e = decay e + (1 - decay) w``. Buffers are
averaged too (``use_buffers=True``), so BatchNorm running statistics of the EMA model follow
its weights and no ``update_bn`` pass is needed; an integer buffer such as
``num_batches_tracked`` is averaged and truncated by torch (it is only used when a
BatchNorm's ``momentum`` is ``None``). ``ema.state_dict()`` / ``load_state_dict`` save and
restore the average and its update count.
"""

from __future__ import annotations

import math

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["make_ema"]


def make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An :class:`AveragedModel` holding the EMA of ``model`` (weights and buffers).

    Args:
        model: the trained model (deep-copied; the copy lives on ``model``'s device).
        decay: weight of the old average per update, in ``[0, 1)``.

    Raises:
        ValueError: ``decay`` outside ``[0, 1)``.
    """
    if not isinstance(decay, (int, float)) or not math.isfinite(decay) or not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay!r}")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(float(decay)), use_buffers=True)
