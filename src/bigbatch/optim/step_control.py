"""NLCG's loss-driven step control: shrink the step when the loss rises, recover otherwise.

Not a line search: it uses the training loss the step already computed, smoothed by an
exponential moving average (factor 0.7), and no extra forward pass. Modes:

- ``"step"`` (the reference default): every ``period`` steps compare the EMA with the EMA at
  the previous comparison.
- ``"online"``: every step compare the current loss with the EMA (recovery is gentler).
- ``"off"``: the multiplier stays 1.

When the ratio is below ``1 + 0.01*threshold`` the multiplier ``base_lr`` recovers toward 1
(x1.05 in step mode, x1.02 online). Above, it shrinks by a band-dependent factor ``gamma``
and a fraction ``undo`` of the previous update is taken back. Losses must be positive: a
non-positive reference loss makes the comparison meaningless, and it is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["STEP_CONTROL_MODES", "StepControl", "StepDecision", "shrink_band"]

StepControlMode = Literal["step", "online", "off"]
STEP_CONTROL_MODES: tuple[StepControlMode, ...] = ("step", "online", "off")
EMA_DECAY = 0.7
MIN_BASE_LR = 1e-4
# (ratio above 1 + edge*threshold) -> (gamma, undo); checked from the largest edge down.
_BANDS = (
    (0.15, 0.5, 0.9),
    (0.125, 0.7, 0.7),
    (0.10, 0.8, 0.5),
    (0.075, 0.9, 0.3),
    (0.05, 0.95, 0.2),
    (0.025, 0.975, 0.1),
    (0.01, 1.0, 0.1),
)


def shrink_band(ratio: float, threshold: float = 1.0) -> tuple[float, float]:
    """``(gamma, undo)`` for a loss ratio; ``(1, 0)`` when no band applies."""
    for edge, gamma, undo in _BANDS:
        if ratio > 1.0 + edge * threshold:
            return gamma, undo
    return 1.0, 0.0


@dataclass(frozen=True)
class StepDecision:
    base_lr: float  # the multiplier to apply from this step on
    undo: float  # fraction of the previous update to take back (0 = none)


@dataclass
class StepControl:
    """State and rule of the step control; all fields are plain floats (checkpointable)."""

    mode: StepControlMode = "step"
    period: int = 5
    threshold: float = 1.0
    base_lr: float = 1.0
    loss_ema: float = 0.0
    loss_ema_old: float = 0.0
    seen_loss: bool = False

    def decide(self, loss: float | None, step: int) -> StepDecision:
        """Update the EMA with ``loss`` (``None``: no information) and decide this step."""
        keep = StepDecision(self.base_lr, 0.0)
        if self.mode == "off" or loss is None:
            return keep
        if not self.seen_loss:
            self.loss_ema = self.loss_ema_old = loss
            self.seen_loss = True
            return keep
        self.loss_ema = EMA_DECAY * self.loss_ema + (1.0 - EMA_DECAY) * loss
        if self.mode == "online":
            return self._compare(loss, self.loss_ema, recover=1.02)
        if step % self.period != 0:
            return keep
        decision = self._compare(self.loss_ema, self.loss_ema_old, recover=1.05)
        self.loss_ema_old = self.loss_ema
        return decision

    def _compare(self, new: float, old: float, recover: float) -> StepDecision:
        if old <= 0.0:
            return StepDecision(self.base_lr, 0.0)
        ratio = new / old
        if ratio < 1.0 + 0.01 * self.threshold:
            self.base_lr = min(1.0, recover * self.base_lr)
            return StepDecision(self.base_lr, 0.0)
        gamma, undo = shrink_band(ratio, self.threshold)
        self.base_lr = max(gamma * self.base_lr, MIN_BASE_LR)
        return StepDecision(self.base_lr, undo)

    def state_dict(self) -> dict[str, Any]:
        return {
            "base_lr": self.base_lr,
            "loss_ema": self.loss_ema,
            "loss_ema_old": self.loss_ema_old,
            "seen_loss": self.seen_loss,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base_lr = float(state["base_lr"])
        self.loss_ema = float(state["loss_ema"])
        self.loss_ema_old = float(state["loss_ema_old"])
        self.seen_loss = bool(state["seen_loss"])
