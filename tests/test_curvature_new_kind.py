"""A new layer kind is one class and one registry entry: nothing else in the engine, the
optimizers or the distributed strategy changes. Shown with a kind written here, for a
per-feature scale layer, with a diagonal Fisher (the exact one for this layer)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from functools import partial
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from bigbatch import SPNGD
from bigbatch.curvature.blocks import registry
from bigbatch.curvature.blocks.base import (
    Claim,
    FisherBlock,
    LinearUser,
    ParamSlice,
    Recorder,
    Refusal,
)
from bigbatch.curvature.keys import BlockKind, Factor


class Scale(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class DiagonalScaleBlock(FisherBlock):
    """``F = M sum_n s_n s_n`` per feature, ``s_n`` the per-sample gradient of ``scale``."""

    kind = BlockKind.NORM  # a new kind would add a BlockKind member; reuse one here

    def __init__(self, name: str, module: Scale) -> None:
        super().__init__(name, (ParamSlice(module.scale),))
        self.module = module

    @classmethod
    def claim(cls, name: str, module: nn.Module, sample_dim: int) -> Claim | Refusal | None:
        if not isinstance(module, Scale):
            return None
        block = cls(name, module)
        return Claim([block], [block])

    def install(self, recorder: Recorder) -> list[RemovableHandle]:
        return [self.module.register_forward_hook(partial(self._on_forward, recorder))]

    def functional_weights(self) -> Mapping[Tensor, LinearUser]:
        return {}

    def _on_forward(self, rec: Recorder, module: nn.Module, inputs: Any, out: Tensor) -> None:
        if not (rec.recording() and rec.wants(self.name, Factor.F)):
            return
        x = inputs[0].detach()
        sums = rec.sums(self.name)

        def hook(gy: Tensor) -> None:
            if rec.grads_now():
                per_sample = (gy.detach() * x).reshape(x.shape[0], -1, x.shape[-1]).sum(1)
                sums.add(Factor.F, (per_sample**2).sum(0), x.shape[0])

        out.register_hook(hook)

    def factors(self) -> tuple[Factor, ...]:
        return (Factor.F,)

    def layout(self, factor: Factor) -> tuple[tuple[int, ...], bool]:
        return (self.module.scale.numel(),), False

    def cost(self) -> float:
        return float(self.module.scale.numel())

    def inversion_inputs(
        self, stats: Mapping[Factor, Tensor], damping: float
    ) -> dict[str, tuple[Tensor, float | Tensor]]:
        return {}

    def finish_inverse(
        self, stats: Mapping[Factor, Tensor], damping: float, inverted: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        return {"F": 1.0 / (stats[Factor.F] + damping)}

    def batch_key(self, inverses: Mapping[str, Tensor]) -> Hashable:
        return ("scale", id(self))

    @classmethod
    def precondition_group(
        cls,
        blocks: Sequence[FisherBlock],
        stacked: Mapping[str, Tensor],
        grads: Mapping[Tensor, Tensor],
    ) -> list[list[Tensor]]:
        return [[stacked["F"][k] * grads[b.params[0]]] for k, b in enumerate(blocks)]


def test_a_kind_added_by_one_class_and_one_registry_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "BLOCK_TYPES", (DiagonalScaleBlock, *registry.BLOCK_TYPES))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), Scale(5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    # the per-sample gradients of the scale, independently (before any hook is installed)
    losses = F.cross_entropy(model(x), y, reduction="none")
    per_sample = torch.stack(
        [torch.autograd.grad(loss, model[1].scale, retain_graph=True)[0] for loss in losses]
    )
    fisher = (per_sample**2).sum(0) / 8  # M = N = 8: M * sum (g / N)^2
    lam = 1e-2
    opt = SPNGD(model, lr=1.0, momentum=0.0, damping=lam, staleness=False)
    assert opt.fallback_parameters == []
    assert type(opt.engine.blocks["1"]) is DiagonalScaleBlock
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad = model[1].scale.grad.clone()
    before = model[1].scale.detach().clone()
    opt.step()
    torch.testing.assert_close(opt.engine.stats[("1", Factor.F)], fisher)
    torch.testing.assert_close(before - model[1].scale.detach(), grad / (fisher + lam))
