"""Several torch optimizers over disjoint parameters, stepping as one ``Optimizer``.

``torch.optim.Muon`` takes 2-D weight matrices only; its documentation has the other
parameters (biases, norms, embeddings, convolution kernels, the classifier) trained by AdamW.
The harness wants one optimizer per run (one LR scheduler, one checkpoint), so
:class:`CombinedOptimizer` holds both: its ``param_groups`` is the list of the parts' group
dicts (the same objects, so a scheduler's learning-rate changes reach every part), ``step``
steps each part, and ``state_dict`` holds one state dict per part.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["CombinedOptimizer", "muon_with_adamw"]


class CombinedOptimizer(Optimizer):
    """``parts`` (optimizers over disjoint parameters) as one optimizer."""

    def __init__(self, parts: Sequence[Optimizer]) -> None:
        if not parts:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        seen: set[int] = set()
        for part in parts:
            if not isinstance(part, Optimizer):
                raise TypeError(f"CombinedOptimizer parts must be optimizers, got {part!r}")
            for group in part.param_groups:
                for p in group["params"]:
                    if id(p) in seen:
                        raise ValueError("CombinedOptimizer: a parameter is in two parts")
                    seen.add(id(p))
        self.parts: list[Optimizer] = []  # empty while Optimizer.__init__ checks the params
        super().__init__([p for part in parts for g in part.param_groups for p in g["params"]], {})
        self.parts = list(parts)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The parts' own group dicts (a part's load_state_dict replaces them)."""
        return [g for part in self.parts for g in part.param_groups]

    @param_groups.setter
    def param_groups(self, value: Any) -> None:  # Optimizer.__init__'s copies are not used
        pass

    @property  # type: ignore[override]
    def state(self) -> dict[Any, Any]:
        merged: dict[Any, Any] = {}
        for part in self.parts:
            merged.update(part.state)
        return merged

    @state.setter
    def state(self, value: Any) -> None:  # Optimizer.__init__ assigns it; the parts keep theirs
        pass

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        parts = state_dict.get("parts") if isinstance(state_dict, Mapping) else None
        if not isinstance(parts, list) or len(parts) != len(self.parts):
            raise ValueError(
                f"CombinedOptimizer state_dict must hold {len(self.parts)} part states "
                f"under 'parts', got {type(parts).__name__}"
            )
        for part, state in zip(self.parts, parts, strict=True):
            part.load_state_dict(state)

    def __repr__(self) -> str:
        return "CombinedOptimizer(" + ", ".join(type(p).__name__ for p in self.parts) + ")"


def muon_with_adamw(
    groups: Sequence[Mapping[str, Any]],
    lr: float,
    muon_options: Mapping[str, Any],
    adamw_lr: float,
    adamw_options: Mapping[str, Any],
    exclude: set[int],
) -> Optimizer:
    """``torch.optim.Muon`` on the 2-D parameters of ``groups`` (not in ``exclude``, the ids
    of the embedding and classifier weights), AdamW on the rest, each group's weight decay
    kept."""
    muon_groups, adamw_groups = [], []
    for group in groups:
        options = {k: v for k, v in group.items() if k != "params"}
        matrices = [p for p in group["params"] if p.ndim == 2 and id(p) not in exclude]
        others = [p for p in group["params"] if not (p.ndim == 2 and id(p) not in exclude)]
        if matrices:
            muon_groups.append({"params": matrices, **options})
        if others:
            adamw_groups.append({"params": others, **options})
    parts: list[Optimizer] = []
    if muon_groups:
        parts.append(torch.optim.Muon(muon_groups, lr=lr, **muon_options))
    if adamw_groups:
        parts.append(torch.optim.AdamW(adamw_groups, lr=adamw_lr, **adamw_options))
    return CombinedOptimizer(parts)
