"""How SP-NGD's curvature is distributed: the ``distributed=`` option of SPNGD and KFACEngine.

``None`` (the default everywhere) is a single process. ``DistributedConfig("simple")`` has every
rank all-reduce the gradients and every due statistic and then compute every block (the
baseline); ``DistributedConfig("hybrid")`` (SP-NGD's scheme) sends each block's summed
gradient and due statistics only to the rank that owns it, which refreshes, inverts and
preconditions it, and all-gathers the preconditioned gradients. This file only holds the
options.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["MODES", "DistributedConfig"]

DistributedMode = Literal["simple", "hybrid"]
MODES: tuple[DistributedMode, ...] = ("simple", "hybrid")


@dataclass(frozen=True)
class DistributedConfig:
    """Distributed curvature options.

    Args:
        mode: ``"hybrid"`` (default: data-parallel backward, model-parallel curvature) or
            ``"simple"`` (all-reduce everything, every rank computes every block).
        group: the ``torch.distributed`` process group (default: the world group), which
            must be initialised before the optimizer is built.
    """

    mode: DistributedMode = "hybrid"
    group: Any = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"distributed mode must be one of {MODES}, got {self.mode!r}")
