"""Loss and accuracy of a model on a split, in chunks, without touching its training state.

In a data-parallel run (``dist`` given, more than one rank) every rank evaluates its
contiguous share of the split and the sums of the losses and of the correct predictions
are added up across the ranks, so every rank returns the numbers of the whole split.
Not here: choosing which model (EMA or live) to evaluate; the loop does that.
"""

from __future__ import annotations

import torch
import torch.distributed
from torch import Tensor, nn
from torch.nn import functional as F

from bigbatch.train.batches import Split
from bigbatch.train.dist_env import DistContext

__all__ = ["evaluate"]


@torch.no_grad()
def _sums(model: nn.Module, x: Tensor, y: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """(sum of the cross-entropies in float64, number of correct predictions)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=y.device)
    correct = torch.zeros((), dtype=torch.int64, device=y.device)
    for start in range(0, int(y.shape[0]), chunk):
        xs, ys = x[start : start + chunk], y[start : start + chunk]
        logits = model(xs).float()
        if logits.dim() > 2:  # a language model: every position is a prediction
            logits, ys = logits.reshape(-1, logits.shape[-1]), ys.reshape(-1)
        loss_sum += F.cross_entropy(logits, ys, reduction="sum").double()
        correct += (logits.argmax(dim=1) == ys).sum()
    return loss_sum, correct


@torch.no_grad()
def evaluate(
    model: nn.Module, split: Split, chunk: int = 4096, *, dist: DistContext | None = None
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` in eval mode, per sample (per token for a
    language model's ``(N, T)`` targets); restores its mode after."""
    was_training = model.training
    model.eval()
    try:
        if dist is None or not dist.enabled:
            loss_sum, correct = _sums(model, split.x, split.y, chunk)
        else:
            start, stop = dist.shard(len(split))
            loss_sum, correct = _sums(model, split.x[start:stop], split.y[start:stop], chunk)
            both = torch.stack([loss_sum, correct.double()]).to(dist.comm_device)
            torch.distributed.all_reduce(both)
            loss_sum, correct = both[0], both[1].round().long()
    finally:
        model.train(was_training)
    n = max(int(split.y.numel()), 1)  # samples, or tokens of a language model
    return float(loss_sum) / n, int(correct) / n
