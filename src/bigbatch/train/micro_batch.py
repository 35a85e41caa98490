"""Choosing the micro-batch: the largest divisor of the batch whose activations fit.

The activation memory of one sample is measured, not guessed: a probe forward/backward on a
few samples records the bytes autograd saves (``torch.autograd.graph.saved_tensors_hooks``),
which is what a training step keeps alive between forward and backward. The budget is a
fraction of the device's free memory (CUDA) or of the available RAM (CPU).
Not here: the accumulation itself (``loop.py``).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["activation_bytes_per_sample", "auto_micro_batch", "available_memory"]

PROBE_SAMPLES = 8
MEMORY_FRACTION = 0.25


def activation_bytes_per_sample(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Bytes saved for backward per sample, from a probe of ``len(x)`` samples."""
    saved = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    finally:
        model.load_state_dict(state)  # BatchNorm running statistics moved; undo that
        model.zero_grad(set_to_none=True)
    return saved / max(len(x), 1)


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device`` (CUDA) or available RAM (CPU, from /proc/meminfo)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    return int(pages * os.sysconf("SC_PAGE_SIZE")) if pages else 4 << 30


def auto_micro_batch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    budget_bytes: int | None = None,
) -> int:
    """The largest divisor of ``batch_size`` whose probed activations fit the budget."""
    per_sample = activation_bytes_per_sample(model, x[:PROBE_SAMPLES], y[:PROBE_SAMPLES])
    budget = (
        budget_bytes
        if budget_bytes is not None
        else int(available_memory(x.device) * MEMORY_FRACTION)
    )
    fits = max(int(budget // max(per_sample, 1.0)), 1)
    return max(d for d in range(1, batch_size + 1) if batch_size % d == 0 and d <= fits)
