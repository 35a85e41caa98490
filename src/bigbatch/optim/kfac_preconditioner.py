"""NLCG's K-FAC preconditioner: the SP-NGD curvature engine behind NLCG's interface.

``z = F^-1 r`` per Fisher block (every kind of :mod:`bigbatch.curvature.blocks`), with
stale statistics and damped inverses from :class:`bigbatch.curvature.KFACEngine`;
parameters outside any block get ``z = r``. The statistics come from hooks on the model, so
NLCG needs nothing more from the training loop than SP-NGD does (the empirical Fisher by
default).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from bigbatch.curvature.engine import KFACEngine
from bigbatch.curvature.keys import KFAC_APPROX, FisherType, KFACApprox
from bigbatch.curvature.linalg import MIN_DAMPING, InversionConfig
from bigbatch.curvature.staleness import StalenessConfig
from bigbatch.curvature.strategy import CurvatureStrategy
from bigbatch.distributed.config import DistributedConfig
from bigbatch.distributed.data_parallel import data_parallel_group, unwrap
from bigbatch.distributed.kfac_sync import DistributedCurvature
from bigbatch.optim.flat_layout import FlatLayout
from bigbatch.optim.preconditioners import Preconditioner, SecantPair
from bigbatch.optim.validation import check_choice, check_number

__all__ = ["KFACPreconditioner"]


class KFACPreconditioner(Preconditioner):
    """K-FAC natural-gradient preconditioner for :class:`bigbatch.NLCG`.

    Args:
        model: the network NLCG optimizes (its parameters must be NLCG's parameters).
        damping: Tikhonov damping of the Fisher blocks (default 1e-3).
        fisher, staleness, inversion, kfac_approx: as for :class:`bigbatch.SPNGD`.
        distributed: ``None`` (default): found by itself; with an initialised process group
            of more than one rank every rank all-reduces the due statistics (each from the
            mean loss over its own shard) and inverts every block (the ``"simple"`` mode of
            :class:`bigbatch.DistributedConfig`), so all ranks precondition alike.
            ``False``: one process. ``model`` may be ``DistributedDataParallel``-wrapped.
    """

    name = "kfac"
    needs_loss_scale = True

    def __init__(
        self,
        model: nn.Module,
        damping: float = 1e-3,
        *,
        fisher: FisherType = "empirical",
        staleness: StalenessConfig | bool = True,
        inversion: InversionConfig | None = None,
        kfac_approx: KFACApprox = "expand",
        distributed: bool | None = None,
    ) -> None:
        self.damping = check_number("damping", damping, low=MIN_DAMPING)
        if distributed is not None and not isinstance(distributed, bool):
            raise ValueError(f"distributed must be None, True or False, got {distributed!r}")
        model, _ = unwrap(model)
        strategy: CurvatureStrategy | None = None
        group = None if distributed is False else data_parallel_group()
        if distributed and group is None:
            raise ValueError(
                "distributed=True needs an initialised torch.distributed process group with "
                "more than one rank"
            )
        if group is not None:
            strategy = DistributedCurvature(DistributedConfig("simple", group))
        kfac_approx = check_choice("kfac_approx", kfac_approx, KFAC_APPROX)
        if isinstance(staleness, bool):
            staleness = StalenessConfig(enabled=staleness)
        elif not isinstance(staleness, StalenessConfig):
            raise ValueError(f"staleness must be a bool or StalenessConfig, got {staleness!r}")
        self.engine = KFACEngine(
            model, fisher, staleness, inversion, strategy, kfac_approx=kfac_approx
        )
        self._layout: FlatLayout | None = None

    def attach(self, layout: FlatLayout) -> None:
        self._layout = layout

    def update(
        self,
        bufs: Mapping[str, Tensor],
        g: Tensor,
        secant: SecantPair | None,
        step: int,
        scratch: Tensor,
    ) -> None:
        self.engine.refresh(lambda block: self.damping)
        self.engine.advance()

    def apply(self, bufs: Mapping[str, Tensor], r: Tensor, out: Tensor) -> Tensor:
        layout = self._layout
        if layout is None:
            raise RuntimeError("KFACPreconditioner.apply before NLCG attached it")
        r_views = dict(zip(layout.params, layout.views(r), strict=True))
        out.copy_(r)
        out_views = dict(zip(layout.params, layout.views(out), strict=True))
        with torch.no_grad():
            for p, z in self.engine.precondition(r_views).items():
                out_views[p].copy_(z)
        return out

    def check_extra_state(self, state: Mapping[str, Any]) -> None:
        if "engine" in state:
            self.engine.parse_state(state["engine"])

    def discard_step(self) -> None:
        self.engine.capture.arm(self.engine.capture.armed)  # drop this step's statistics

    def set_loss_scale(self, scale: float) -> None:
        self.engine.capture.grad_scale = scale

    def extra_state_dict(self) -> dict[str, Any]:
        return {"engine": self.engine.state_dict(), "damping": self.damping}

    def load_extra_state_dict(self, state: Mapping[str, Any]) -> None:
        if "engine" in state:
            self.engine.load_state_dict(state["engine"])

    def nbytes(self) -> int:
        tensors = list(self.engine.stats.values()) + [
            t for slots in self.engine.inverses.values() for t in slots.values()
        ]
        return sum(t.numel() * t.element_size() for t in tensors)

    def __repr__(self) -> str:
        return f"KFACPreconditioner(damping={self.damping}, blocks={len(self.engine.blocks)})"
