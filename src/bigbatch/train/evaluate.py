"""Loss and accuracy of a model on a split, in chunks, without touching its training state.

Not here: choosing which model (EMA or live) to evaluate; the loop does that.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from bigbatch.train.batches import Split

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, chunk: int = 4096) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` in eval mode; restores its mode after."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=split.y.device)
    correct = torch.zeros((), dtype=torch.int64, device=split.y.device)
    try:
        for start in range(0, len(split), chunk):
            x, y = split.x[start : start + chunk], split.y[start : start + chunk]
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(dim=1) == y).sum()
    finally:
        model.train(was_training)
    n = max(len(split), 1)
    return float(loss_sum) / n, int(correct) / n
