"""Capture of per-layer curvature statistics with module and tensor hooks.

Which modules become Fisher blocks, and how their statistics are recorded during the
forward and backward passes the user runs anyway:

- ``nn.Linear``, ``nn.Conv2d`` (``groups == 1``, zero padding): Kronecker factors A and G;
- ``nn.BatchNorm1d/2d`` and ``nn.LayerNorm`` with affine parameters: one 2x2 block per unit;
- ``nn.Embedding``: a diagonal A (index counts) and a full G.

Robustness choices (where hook-only designs fail): A and unit-wise inputs are reduced inside
the forward hook, so a later in-place activation cannot corrupt them (a norm layer's
``x_hat`` is recovered there from its output as ``(y - beta) / gamma`` in one pass, or
re-normalised from its input where gamma is too small or the output is half precision);
G comes from a tensor hook on the layer's output registered before any in-place op (it
receives the gradient of the layer output itself); a module called several times per
forward accumulates every call (the "expand" convention: extra calls act as extra
positions); inputs under ``torch.autocast`` are reduced in float32; forwards without grad
(evaluation) are ignored; and a block whose hooks did not fire is reported by name instead
of failing later.

Statistics are kept as SUMS with sample and position counts, so micro-batches combine
exactly as one large batch would. This module does not invert or schedule anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from bigbatch.curvature import layers as L

__all__ = ["FISHER_TYPES", "Block", "CapturedStats", "CurvatureCapture"]

FISHER_TYPES = ("empirical", "mc")
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class Block:
    """One Fisher block: a module and the parameters it preconditions.

    ``kind`` is ``"kron"`` (Linear, Conv2d), ``"unitwise"`` (BatchNorm, LayerNorm) or
    ``"embedding"``. Its statistics are named ``"<name>.A"``/``"<name>.G"`` or
    ``"<name>.F"``.
    """

    name: str
    module: nn.Module
    kind: str
    params: tuple[nn.Parameter, ...]

    @property
    def stat_names(self) -> tuple[str, ...]:
        if self.kind == "unitwise":
            return (f"{self.name}.F",)
        return (f"{self.name}.A", f"{self.name}.G")


@dataclass
class _Sums:
    a_sum: Tensor | None = None
    g_sum: Tensor | None = None
    f_sum: Tensor | None = None
    n_samples: int = 0  # samples seen (first call of each micro-batch)
    rows: int = 0  # sample-positions seen over all calls (for the expand convention)
    calls: int = 0
    grad_calls: int = 0
    last_micro: int = -1


@dataclass
class CapturedStats:
    """Normalised statistics of one refresh window, by statistic name."""

    values: dict[str, Tensor] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # armed statistics that got no data


def _add(total: Tensor | None, value: Tensor) -> Tensor:
    return value if total is None else total.add_(value)


class CurvatureCapture:
    """Finds the Fisher blocks of ``model`` and records their statistics when armed.

    Args:
        model: the network. Its parameters that no block covers are listed in
            :attr:`unsupported` (name, reason) for the optimizer's fallback.
        fisher: ``"empirical"`` (G from the user's own backward of the batch-mean loss) or
            ``"mc"`` (G only from :meth:`monte_carlo` backward passes).
    """

    def __init__(self, model: nn.Module, fisher: str = "empirical") -> None:
        if fisher not in FISHER_TYPES:
            raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}")
        self.fisher = fisher
        self.blocks: dict[str, Block] = {}
        self.unsupported: list[tuple[str, str]] = []
        self._armed: set[str] = set()
        self._sums: dict[str, _Sums] = {}
        self._micro = 0
        self._mc_active = False
        self._handles: list[RemovableHandle] = []
        self._discover(model)
        self._handles.append(model.register_forward_pre_hook(self._on_model_forward))
        for block in self.blocks.values():
            self._handles.append(
                block.module.register_forward_hook(partial(self._on_forward, block))
            )

    # ----------------------------------------------------------------- discovery
    def _discover(self, model: nn.Module) -> None:
        owner: dict[int, str] = {}
        candidates: list[Block] = []
        covered: set[int] = set()
        for name, module in model.named_modules():
            kind, reason = _classify(module)
            direct = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if kind is None:
                if direct:
                    label = name or type(module).__name__
                    for pname, p in module.named_parameters(recurse=False):
                        if p.requires_grad:
                            self.unsupported.append((f"{label}.{pname}", reason))
                            covered.add(id(p))
                continue
            weight, bias = module.weight, getattr(module, "bias", None)
            params = tuple(
                p for p in (weight, bias) if isinstance(p, nn.Parameter) and p.requires_grad
            )
            if not params:
                continue
            frozen_part = not weight.requires_grad or (kind == "unitwise" and len(params) != 2)
            if frozen_part:  # a block needs its weight (and a norm layer both parameters)
                label = name or type(module).__name__
                for p in params:
                    self.unsupported.append((label, "part of its parameters is frozen"))
                    covered.add(id(p))
                continue
            candidates.append(Block(name or type(module).__name__, module, kind, params))
        shared: set[int] = set()
        for block in candidates:
            for p in block.params:
                if id(p) in owner:
                    shared.add(id(p))
                owner[id(p)] = block.name
        for block in candidates:
            if any(id(p) in shared for p in block.params):
                for p in block.params:
                    if id(p) not in covered:
                        self.unsupported.append(
                            (f"{block.name} parameter", "shared with another module (tied)")
                        )
                        covered.add(id(p))
                continue
            self.blocks[block.name] = block
            self._sums[block.name] = _Sums()

    def remove(self) -> None:
        """Remove every hook (the model goes back to what it was)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ----------------------------------------------------------------- arming
    def stat_names(self) -> list[str]:
        return [s for block in self.blocks.values() for s in block.stat_names]

    def arm(self, stats: Iterable[str]) -> None:
        """Record exactly these statistics from the next forward/backward passes on."""
        self._armed = set(stats)
        for name in self._sums:
            self._sums[name] = _Sums()

    @property
    def armed(self) -> frozenset[str]:
        return frozenset(self._armed)

    @contextmanager
    def monte_carlo(self) -> Iterator[None]:
        """Backward passes inside this context feed G (``fisher="mc"``)."""
        previous, self._mc_active = self._mc_active, True
        try:
            yield
        finally:
            self._mc_active = previous

    def _grads_now(self) -> bool:
        return self._mc_active if self.fisher == "mc" else True

    # ----------------------------------------------------------------- hooks
    def _on_model_forward(self, module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():
            self._micro += 1

    def _on_forward(self, block: Block, module: nn.Module, inputs: Any, output: Any) -> None:
        if not self._armed or not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return
        names = block.stat_names
        want_a = names[0] in self._armed and block.kind != "unitwise"
        want_g = names[-1] in self._armed
        if not (want_a or want_g):
            return
        x = inputs[0]
        sums = self._sums[block.name]
        if sums.last_micro != self._micro:
            sums.last_micro = self._micro
            sums.n_samples += int(x.shape[0])
        sums.calls += 1
        x = x.detach()
        if block.kind == "kron" and isinstance(module, nn.Linear):
            sums.rows += x.numel() // module.in_features
            if want_a:
                has_bias = len(block.params) == 2
                sums.a_sum = _add(sums.a_sum, L.linear_input_sum(x, has_bias))
            hook = partial(self._on_output_grad, sums, -1)
        elif block.kind == "kron" and isinstance(module, nn.Conv2d):
            positions = int(output.shape[-1] * output.shape[-2])
            sums.rows += int(x.shape[0]) * positions
            if want_a:  # the im2col reduction is the expensive part: only when A is due
                a_sum, _ = L.conv2d_input_sum(x, module, len(block.params) == 2)
                sums.a_sum = _add(sums.a_sum, a_sum)
            hook = partial(self._on_output_grad, sums, 1)
        elif block.kind == "embedding" and isinstance(module, nn.Embedding):
            sums.rows += x.numel()
            if want_a:
                counts = L.embedding_input_sum(x, module.num_embeddings, module.padding_idx)
                if module.weight.dtype == torch.float64:  # statistics follow G's precision
                    counts = counts.double()
                sums.a_sum = _add(sums.a_sum, counts)
            hook = partial(self._on_output_grad, sums, -1)
        elif isinstance(module, _NORMS):
            # from the output (one pass) while this hook runs before any in-place op on it
            x_hat = L.normalized_from_output(output, module.weight, module.bias)
            if x_hat is None:
                x_hat = L.batchnorm_normalized_input(module, x)
            hook = partial(self._on_norm_grad, sums, x_hat, None)
        elif isinstance(module, nn.LayerNorm):
            nd = len(module.normalized_shape)
            x_hat = L.normalized_from_output(output, module.weight, module.bias, nd)
            if x_hat is None:
                x_hat = L.layernorm_normalized_input(module, x)
            hook = partial(self._on_norm_grad, sums, x_hat, nd)
        else:  # pragma: no cover - _classify admits nothing else
            return
        if want_g and output.requires_grad:
            output.register_hook(hook)

    def _on_output_grad(self, sums: _Sums, channel_dim: int, gy: Tensor) -> None:
        if self._grads_now():
            sums.g_sum = _add(sums.g_sum, L.output_grad_sum(gy.detach(), channel_dim))
            sums.grad_calls += 1

    def _on_norm_grad(self, sums: _Sums, x_hat: Tensor, ln_ndim: int | None, gy: Tensor) -> None:
        if not self._grads_now():
            return
        gy = gy.detach()
        if ln_ndim is None:
            f = L.batchnorm_unitwise_sum(x_hat, gy)
        else:
            f = L.layernorm_unitwise_sum(x_hat, gy, ln_ndim)
        sums.f_sum = _add(sums.f_sum, f)
        sums.grad_calls += 1

    # ----------------------------------------------------------------- results
    def collect(self) -> CapturedStats:
        """Normalise what was recorded since :meth:`arm` and start a new window."""
        out = CapturedStats()
        # the per-sample gradient is N x the mean-loss gradient (empirical), or the gradient
        # of the summed sampled loss itself (Monte Carlo)
        for block in self.blocks.values():
            sums = self._sums[block.name]
            n = sums.n_samples
            scale = float(n) if self.fisher == "empirical" else 1.0 / max(n, 1)
            for stat in block.stat_names:
                if stat not in self._armed:
                    continue
                kind = stat.rsplit(".", 1)[1]
                value: Tensor | None
                if kind == "A":
                    value = None if sums.a_sum is None or n == 0 else sums.a_sum / n
                elif kind == "G":
                    # G = mean over samples and positions of g g^T, g the per-sample grad
                    positions = sums.rows / n if n else 0.0
                    value = None
                    if sums.g_sum is not None and positions:
                        value = sums.g_sum * (scale / positions)
                else:  # F = mean over samples of v v^T with per-sample v
                    value = None if sums.f_sum is None or n == 0 else sums.f_sum * scale
                if value is None:
                    out.missing.append(stat)
                else:
                    out.values[stat] = value
        self.arm(self._armed)
        return out


def _classify(module: nn.Module) -> tuple[str | None, str]:
    """``(kind, "")`` for a supported module, ``(None, reason)`` otherwise."""
    if isinstance(module, nn.Linear):
        return "kron", ""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return None, f"Conv2d with groups={module.groups} (only groups=1 has K-FAC here)"
        if module.padding_mode != "zeros":
            return None, f"Conv2d with padding_mode={module.padding_mode!r}"
        return "kron", ""
    if isinstance(module, _NORMS):
        if not module.affine:
            return None, "BatchNorm without affine parameters"
        return "unitwise", ""
    if isinstance(module, nn.LayerNorm):
        if not module.elementwise_affine or module.bias is None:
            return None, "LayerNorm without both weight and bias"
        return "unitwise", ""
    if isinstance(module, nn.Embedding):
        if module.sparse:
            return None, "Embedding with sparse gradients"
        return "embedding", ""
    return None, f"{type(module).__name__} has no Fisher block"
