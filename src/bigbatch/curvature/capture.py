"""Recording the statistics of a model's Fisher blocks during the passes the loop runs anyway.

:class:`CurvatureCapture` finds the blocks (:func:`~bigbatch.curvature.blocks.registry.discover`),
installs their hooks, and keeps one refresh window: which statistics are armed (only due
ones are computed), the sums each block recorded, the micro-batch counter (a forward
pre-hook on the model) and the number of loss terms ``M`` (read from the model's output in
a forward hook: its entries per class, see :mod:`~bigbatch.curvature.blocks.base`).
Functional uses of block weights (``nn.MultiheadAttention``'s projections, tied heads) are
seen through :class:`~bigbatch.curvature.functional.FunctionalUses`, pushed only while such
a forward runs on a recording step.

Robustness choices (where hook-only designs fail): inputs are reduced inside forward hooks,
so later in-place ops cannot change them; gradients come from tensor hooks on layer
outputs; autocast inputs are reduced in float32; forwards without grad (evaluation) are
ignored; a block whose statistics did not arrive is reported by the engine, by name.
It does not invert or schedule anything.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from bigbatch.curvature.blocks.base import FactorValue, FisherBlock, LinearUser, Sums
from bigbatch.curvature.blocks.embedding import EmbeddingBlock
from bigbatch.curvature.blocks.registry import discover
from bigbatch.curvature.functional import FunctionalUses
from bigbatch.curvature.keys import KFAC_APPROX, FisherType, KFACApprox, StatKey

__all__ = ["FISHER_TYPES", "CapturedStats", "CurvatureCapture", "loss_terms"]

FISHER_TYPES: tuple[FisherType, ...] = ("empirical", "mc")


@dataclass
class CapturedStats:
    """Normalised statistics of one refresh window, with the weights they are means over."""

    values: dict[StatKey, FactorValue] = field(default_factory=dict)
    missing: list[StatKey] = field(default_factory=list)  # armed statistics that got no data


def _guard_compiled_hooks() -> None:
    """Make ``torch.compile`` recompile a graph when a module's hooks change.

    By default dynamo does not guard on nn.Module hooks, so a model compiled and run before
    the optimizer existed (or another copy of the same model class) would keep running a
    graph without the capture's hooks, and record nothing. With the guards on, the hooks
    added here cause one recompilation. Only set when dynamo is loaded already (importing it
    costs seconds): a model compiled later is traced with the hooks in place.
    """
    dynamo = sys.modules.get("torch._dynamo")
    config = getattr(dynamo, "config", None)
    if config is not None and getattr(config, "skip_nnmodule_hook_guards", False):
        config.skip_nnmodule_hook_guards = False


def _first_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        logits = output.get("logits")
        if isinstance(logits, Tensor):
            return logits
        output = list(output.values())
    if isinstance(output, list | tuple):
        for item in output:
            if isinstance(item, Tensor):
                return item
    return None


def loss_terms(output: Any) -> int | None:
    """The loss terms ``M`` a model output stands for: its entries per class (the last dim),
    so a ``(N, C)`` classifier has ``N`` and a ``(N, T, V)`` language model ``N T``; ``None``
    for a scalar (a loss returned by the model) or an output without a tensor."""
    t = _first_tensor(output)
    if t is None or t.dim() == 0:
        return None
    if t.dim() == 1:
        return int(t.shape[0])
    return int(t.numel() // max(int(t.shape[-1]), 1))


class CurvatureCapture:
    """Finds the Fisher blocks of ``model`` and records their statistics when armed.

    Args:
        model: the network. Its parameters that no block covers are listed in
            :attr:`unsupported` (name, reason) for the optimizer's fallback.
        fisher: ``"empirical"`` (G from the user's own backward of the mean loss) or
            ``"mc"`` (G only from backward passes inside :meth:`monte_carlo`).
        kfac_approx: ``"expand"`` or ``"reduce"`` for layers with weight sharing (see
            :mod:`~bigbatch.curvature.blocks.kronecker`).
    """

    def __init__(
        self, model: nn.Module, fisher: FisherType = "empirical", kfac_approx: KFACApprox = "expand"
    ) -> None:
        if fisher not in FISHER_TYPES:
            raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}")
        if kfac_approx not in KFAC_APPROX:
            raise ValueError(f"kfac_approx must be one of {KFAC_APPROX}, got {kfac_approx!r}")
        self._fisher = fisher
        self._approx: KFACApprox = kfac_approx
        found = discover(model)
        self.blocks: dict[str, FisherBlock] = found.blocks
        self.unsupported: list[tuple[str, str]] = found.unsupported
        self._armed: set[StatKey] = set()
        self._sums: dict[str, Sums] = {name: Sums() for name in self.blocks}
        self._micro = 0
        #: the loss scale of this window's backward passes (``torch.amp.GradScaler``): the
        #: gradient statistics are divided by its square (set by the optimizer)
        self.grad_scale = 1.0
        self._terms = 0
        self._terms_known = True
        self._mc_active = False
        self._depth = 0
        self._pushed = False
        users: dict[Tensor, LinearUser] = {}
        for capturer in found.capturers:
            users.update(capturer.functional_weights())
        self._mode = FunctionalUses(self, users) if users else None
        # an embedding may also serve as a head through F.linear anywhere in the forward
        self._watch_model = any(isinstance(b, EmbeddingBlock) for b in self.blocks.values())
        self._handles: list[RemovableHandle] = [
            model.register_forward_pre_hook(self._on_model_forward),
            model.register_forward_hook(self._after_model_forward, always_call=True),
        ]
        for capturer in found.capturers:
            self._handles += capturer.install(self)
        _guard_compiled_hooks()

    def remove(self) -> None:
        """Remove every hook (the model goes back to what it was)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ----------------------------------------------------------------- the Recorder protocol
    @property
    def fisher(self) -> str:
        return self._fisher

    @property
    def approx(self) -> KFACApprox:
        return self._approx

    @property
    def micro(self) -> int:
        return self._micro

    def recording(self) -> bool:
        return bool(self._armed) and torch.is_grad_enabled()

    def wants(self, block: str, factor: Any) -> bool:
        return (block, factor) in self._armed

    def grads_now(self) -> bool:
        return self._mc_active if self._fisher == "mc" else True

    def sums(self, block: str) -> Sums:
        sums = self._sums.get(block)
        if sums is None:
            sums = self._sums[block] = Sums()
        return sums

    def enter_functional(self) -> None:
        self._depth += 1
        if self._depth == 1 and self._mode is not None and self.recording():
            self._mode.__enter__()
            self._pushed = True

    def exit_functional(self) -> None:
        if self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0 and self._pushed:
            self._pushed = False
            assert self._mode is not None
            self._mode.__exit__(None, None, None)

    # ----------------------------------------------------------------- arming
    def stat_keys(self) -> list[StatKey]:
        """Every statistic of every block (a tied head's appear once it is seen)."""
        return [(b.name, f) for b in self.blocks.values() for f in b.factors()]

    def arm(self, keys: Iterable[StatKey]) -> None:
        """Record exactly these statistics from the next forward/backward passes on."""
        self._armed = set(keys)
        self._sums = {name: Sums() for name in self.blocks}
        self._terms = 0
        self._terms_known = True

    @property
    def armed(self) -> frozenset[StatKey]:
        return frozenset(self._armed)

    @contextmanager
    def monte_carlo(self) -> Iterator[None]:
        """Backward passes inside this context feed G (``fisher="mc"``)."""
        previous, self._mc_active = self._mc_active, True
        try:
            yield
        finally:
            self._mc_active = previous

    # ----------------------------------------------------------------- model hooks
    def _on_model_forward(self, module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():
            self._micro += 1
        if self._watch_model:
            self.enter_functional()

    def _after_model_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._watch_model:
            self.exit_functional()
        if output is None or not self.recording():
            return
        terms = loss_terms(output)
        if terms is None:
            self._terms_known = False
        else:
            self._terms += terms

    # ----------------------------------------------------------------- results
    def collect(self) -> CapturedStats:
        """Normalise what was recorded since :meth:`arm` and start a new window."""
        out = CapturedStats()
        terms = self._terms if self._terms_known else 0
        for block in self.blocks.values():
            sums = self._sums[block.name]
            for factor in block.factors():
                key = (block.name, factor)
                if key not in self._armed:
                    continue
                value = block.finalize(factor, sums, terms, self._fisher)
                if value is None:
                    out.missing.append(key)
                    continue
                if self.grad_scale != 1.0 and factor in block.grad_factors:
                    value = FactorValue(value.value / self.grad_scale**2, value.weight)
                out.values[key] = value
        self.grad_scale = 1.0
        self.arm(self._armed)
        return out
