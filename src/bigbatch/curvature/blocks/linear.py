"""``nn.Linear`` as a Kronecker block, captured by hooks on the module.

``A`` is reduced inside the forward hook (a later in-place activation cannot change it) and
``G`` comes from a tensor hook on the module's output (registered before any in-place op
on it). A module called several times per forward adds every call (its positions). The
sample dim of a 3-D or larger input is dim 0, or dim 1 inside a module tree that declares
``batch_first=False`` (``nn.TransformerEncoderLayer`` and friends).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from bigbatch.curvature.blocks.base import Claim, LinearUser, ParamSlice, Recorder, Refusal
from bigbatch.curvature.blocks.kronecker import KroneckerBlock
from bigbatch.curvature.keys import BlockKind

__all__ = ["LinearBlock", "samples_in"]


def samples_in(x: Tensor, sample_dim: int) -> int:
    """How many samples a features-last input holds (1-D: one; 2-D: its rows)."""
    if x.dim() <= 1:
        return 1
    if x.dim() == 2:
        return int(x.shape[0])
    return int(x.shape[sample_dim])


class LinearBlock(KroneckerBlock):
    """The weight (and trainable bias) of one ``nn.Linear``."""

    kind = BlockKind.LINEAR

    def __init__(self, name: str, module: nn.Linear, bias: bool, sample_dim: int = 0) -> None:
        super().__init__(name, ParamSlice(module.weight), ParamSlice(module.bias) if bias else None)
        self.module = module
        self.sample_dim = sample_dim

    @classmethod
    def claim(cls, name: str, module: nn.Module, sample_dim: int) -> Claim | Refusal | None:
        if not isinstance(module, nn.Linear):
            return None
        if not module.weight.requires_grad:
            return Refusal("its weight is frozen")
        bias = isinstance(module.bias, nn.Parameter) and module.bias.requires_grad
        block = cls(name, module, bias, sample_dim)
        return Claim([block], [block])

    def install(self, recorder: Recorder) -> list[RemovableHandle]:
        return [self.module.register_forward_hook(partial(self._on_forward, recorder))]

    def functional_weights(self) -> Mapping[Tensor, LinearUser]:
        return {}

    def _on_forward(self, rec: Recorder, module: nn.Module, inputs: Any, output: Any) -> None:
        if not rec.recording() or not isinstance(output, Tensor):
            return
        x = inputs[0]
        rec.sums(self.name).saw_samples(rec.micro, samples_in(x, self.sample_dim))
        self.record_input(rec, x, self.sample_dim)
        self.record_output(rec, output, self.sample_dim)
