"""Preconditioners for NLCG: how the search direction sees the curvature.

A preconditioner maps the negative gradient ``r = -g`` to ``z = P r`` where ``P``
approximates the inverse curvature. NLCG owns the buffers (so they are saved in its
``state_dict``); a preconditioner declares which flat buffers it needs, fills their initial
values, updates them from the gradient and the last step, and applies ``P``.

Built in: :class:`IdentityPreconditioner` (plain NLCG), :class:`DiagonalBFGS` (the paper's),
and :class:`AdamDiagonal` (an Adam-style second-moment diagonal). Structured preconditioners
(K-FAC) can subclass :class:`Preconditioner` and keep extra state through
:meth:`Preconditioner.extra_state_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bigbatch.optim import fused_kernels
from bigbatch.optim.flat_layout import FlatLayout

__all__ = [
    "AdamDiagonal",
    "DiagonalBFGS",
    "IdentityPreconditioner",
    "Preconditioner",
    "SecantPair",
    "make_preconditioner",
]


@dataclass
class SecantPair:
    """The last step ``s = scale * direction`` and the gradient change ``y = g - g_prev``.

    The step is kept factored so that no parameter-sized ``s`` is built when one scale
    applies to every parameter; :meth:`s` materialises it for preconditioners that need it.
    """

    direction: Tensor
    scale: float
    y: Tensor

    def s(self) -> Tensor:
        return self.direction * self.scale


class Preconditioner:
    """Interface: ``z = P r`` with ``P`` symmetric positive definite.

    Attributes:
        name: short name used in reprs and errors.
        buffers: names of the flat, parameter-sized buffers the optimizer keeps for it.
        needs_secant: whether :meth:`update` uses the secant pair (costs a buffer op).
    """

    name = "custom"
    #: whether statistics recorded from the backward pass need the loss scale (GradScaler)
    needs_loss_scale = False
    buffers: tuple[str, ...] = ()
    needs_secant = False

    def attach(self, layout: FlatLayout) -> None:
        """Called once the optimizer knows its parameters (structured preconditioners)."""

    def init_buffer(self, name: str, flat: Tensor) -> None:
        """Fill a freshly allocated buffer with its initial value (default: zeros)."""
        flat.zero_()

    def update(
        self,
        bufs: Mapping[str, Tensor],
        g: Tensor,
        secant: SecantPair | None,
        step: int,
        scratch: Tensor,
    ) -> None:
        """Refresh the curvature estimate from the current gradient ``g`` (in place).

        ``scratch`` is a parameter-sized temporary the method may overwrite (it becomes the
        output of the :meth:`apply` that follows).
        """

    def apply(self, bufs: Mapping[str, Tensor], r: Tensor, out: Tensor) -> Tensor:
        """Write ``P r`` into ``out`` and return it."""
        raise NotImplementedError

    def update_apply_fused(
        self,
        bufs: Mapping[str, Tensor],
        g: Tensor,
        last_step: tuple[Tensor, float, Tensor] | None,
        step: int,
        out: Tensor,
    ) -> Tensor | None:
        """:meth:`update` then :meth:`apply` to ``g`` in fused kernels (``NLCG(fused=True)``).

        ``last_step`` is ``(direction, scale, g_prev)`` (the step was ``scale * direction``;
        ``y = g - g_prev`` is never built), ``None`` at the first step. Writes ``P g`` into
        ``out`` and returns ``g . P g`` as a 0-d tensor; returns ``None`` (having changed
        nothing) when this preconditioner has no fused path for the call, and the optimizer
        then runs :meth:`update` and :meth:`apply`. Default: ``None``.
        """
        return None

    def check_extra_state(self, state: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` when :meth:`load_extra_state_dict` would refuse ``state``
        (checked before the optimizer changes anything). Default: nothing to check."""

    def discard_step(self) -> None:
        """The optimizer skipped this step (a non-finite gradient or loss, or a GradScaler's
        inf): forget whatever was recorded for it. Default: nothing."""

    def set_loss_scale(self, scale: float) -> None:
        """This step's gradients came from a loss multiplied by ``scale`` (GradScaler);
        statistics recorded from the backward should be unscaled. Default: nothing."""

    def extra_state_dict(self) -> dict[str, Any]:
        """State that does not live in flat buffers (scalars, per-layer factors)."""
        return {}

    def nbytes(self) -> int:
        """Bytes of tensors the preconditioner holds itself (scratch, factors)."""
        return 0

    def load_extra_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`extra_state_dict` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class IdentityPreconditioner(Preconditioner):
    """``P = I``: unpreconditioned nonlinear CG."""

    name = "none"

    def apply(self, bufs: Mapping[str, Tensor], r: Tensor, out: Tensor) -> Tensor:
        return out.copy_(r)


class DiagonalBFGS(Preconditioner):
    """The paper's diagonal BFGS estimate ``h`` of the Hessian; ``P = 1 / (h + eps)``.

    With ``s`` the last step and ``y`` the gradient change, when ``y.s >= eps`` and
    ``s.(h*s) >= eps``:
    ``h <- |h - (h*h*s*s + eps)/(s.(h*s) + eps) + (y*y + eps)/(y.s + eps)|``;
    otherwise ``h`` is kept (the curvature-condition guard). ``h`` starts at ones.
    """

    name = "bfgs"
    buffers = ("h",)
    needs_secant = True

    def __init__(self, eps: float = 1e-8) -> None:
        if not (eps >= 0.0 and math.isfinite(eps)):
            raise ValueError(f"DiagonalBFGS eps must be a finite number >= 0, got {eps!r}")
        self.eps = eps
        self.last_update_skipped = False
        self._identity = True  # the first step uses P = 1 exactly, as the reference does

    def init_buffer(self, name: str, flat: Tensor) -> None:
        flat.fill_(1.0)

    def update(
        self,
        bufs: Mapping[str, Tensor],
        g: Tensor,
        secant: SecantPair | None,
        step: int,
        scratch: Tensor,
    ) -> None:
        h = bufs["h"]
        self._identity = secant is None
        if secant is None:  # first step: h = 1, P = 1
            h.fill_(1.0)
            return
        d, c, y, eps = secant.direction, secant.scale, secant.y, self.eps
        hd = torch.mul(h, d, out=scratch)  # h*s = c * h*d
        ys = c * float(torch.dot(y, d))
        shs = c * c * float(torch.dot(d, hd))
        self.last_update_skipped = not (ys >= eps and shs >= eps)
        if self.last_update_skipped:
            return
        # h <- |h - ((h s)^2 + eps)/(s.hs + eps) + (y^2 + eps)/(y.s + eps)|, in four passes:
        # hd <- const - a (h d)^2 (the eps terms gathered in const), then h += hd + b y^2.
        const = torch.tensor(eps / (ys + eps) - eps / (shs + eps), dtype=h.dtype, device=h.device)
        torch.addcmul(const, hd, hd, value=-(c * c) / (shs + eps), out=hd)
        h.add_(hd).addcmul_(y, y, value=1.0 / (ys + eps)).abs_()

    def apply(self, bufs: Mapping[str, Tensor], r: Tensor, out: Tensor) -> Tensor:
        if self._identity:
            return out.copy_(r)
        torch.add(bufs["h"], self.eps, out=out)
        return torch.div(r, out, out=out)

    def update_apply_fused(
        self,
        bufs: Mapping[str, Tensor],
        g: Tensor,
        last_step: tuple[Tensor, float, Tensor] | None,
        step: int,
        out: Tensor,
    ) -> Tensor | None:
        if last_step is None:  # the first step (h = 1, P = 1): nothing to fuse
            return None
        d, c, g_prev = last_step
        h, eps = bufs["h"], self.eps
        yd, dhd = fused_kernels.bfgs_secant_products(g, g_prev, d, h).tolist()
        ys, shs = c * yd, c * c * dhd
        self._identity = False
        self.last_update_skipped = not (ys >= eps and shs >= eps)
        eps_t = _scalar(eps, h)
        if self.last_update_skipped:
            return fused_kernels.bfgs_apply(g, h, eps_t, out)
        return fused_kernels.bfgs_update_apply(
            g,
            g_prev,
            d,
            h,
            _scalar((c * c) / (shs + eps), h),
            _scalar(1.0 / (ys + eps), h),
            _scalar(eps / (ys + eps) - eps / (shs + eps), h),
            eps_t,
            out,
        )

    def __repr__(self) -> str:
        return f"DiagonalBFGS(eps={self.eps})"


class AdamDiagonal(Preconditioner):
    """Adam's second-moment diagonal: ``P = 1 / (sqrt(v / (1 - beta2^t)) + eps)``."""

    name = "adam"
    buffers = ("exp_avg_sq",)

    def __init__(self, beta2: float = 0.999, eps: float = 1e-8) -> None:
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"AdamDiagonal beta2 must be in [0, 1), got {beta2!r}")
        if not (eps > 0.0 and math.isfinite(eps)):
            raise ValueError(f"AdamDiagonal eps must be a finite number > 0, got {eps!r}")
        self.beta2 = beta2
        self.eps = eps
        self._bias_correction = 1.0

    def update(
        self,
        bufs: Mapping[str, Tensor],
        g: Tensor,
        secant: SecantPair | None,
        step: int,
        scratch: Tensor,
    ) -> None:
        v = bufs["exp_avg_sq"]
        v.mul_(self.beta2).addcmul_(g, g, value=1.0 - self.beta2)
        self._bias_correction = 1.0 - self.beta2 ** (step + 1)

    def apply(self, bufs: Mapping[str, Tensor], r: Tensor, out: Tensor) -> Tensor:
        # r / (sqrt(v / bc) + eps) = sqrt(bc) * r / (sqrt(v) + eps sqrt(bc)), no temporary
        root_bc = math.sqrt(self._bias_correction)
        torch.sqrt(bufs["exp_avg_sq"], out=out).add_(self.eps * root_bc)
        zero = torch.zeros((), dtype=out.dtype, device=out.device)
        return torch.addcdiv(zero, r, out, value=root_bc, out=out)

    def update_apply_fused(
        self,
        bufs: Mapping[str, Tensor],
        g: Tensor,
        last_step: tuple[Tensor, float, Tensor] | None,
        step: int,
        out: Tensor,
    ) -> Tensor | None:
        v = bufs["exp_avg_sq"]
        self._bias_correction = 1.0 - self.beta2 ** (step + 1)
        root_bc = math.sqrt(self._bias_correction)
        return fused_kernels.adam_update_apply(
            g,
            v,
            _scalar(self.beta2, v),
            _scalar(1.0 - self.beta2, v),
            _scalar(root_bc, v),
            _scalar(self.eps * root_bc, v),
            out,
        )

    def extra_state_dict(self) -> dict[str, Any]:
        return {"bias_correction": self._bias_correction}

    def load_extra_state_dict(self, state: Mapping[str, Any]) -> None:
        self._bias_correction = float(state.get("bias_correction", 1.0))

    def __repr__(self) -> str:
        return f"AdamDiagonal(beta2={self.beta2}, eps={self.eps})"


def _scalar(value: float, like: Tensor) -> Tensor:
    """A 0-d tensor (a new value does not recompile a fused kernel, a Python float would)."""
    return torch.tensor(value, dtype=like.dtype, device=like.device)


_BY_NAME: dict[str, type[Preconditioner]] = {
    "none": IdentityPreconditioner,
    "bfgs": DiagonalBFGS,
    "adam": AdamDiagonal,
}


def make_preconditioner(spec: str | Preconditioner | None, eps: float) -> Preconditioner:
    """Resolve ``"none" | "bfgs" | "adam" | None | Preconditioner`` to an instance."""
    if spec is None:
        return IdentityPreconditioner()
    if isinstance(spec, Preconditioner):
        return spec
    if isinstance(spec, str) and spec.lower() == "kfac":
        raise ValueError(
            "preconditioner='kfac' needs the model: pass bigbatch.KFACPreconditioner(model) instead"
        )
    if isinstance(spec, str) and spec.lower() in _BY_NAME:
        cls = _BY_NAME[spec.lower()]
        if cls is DiagonalBFGS:
            return DiagonalBFGS(eps=eps)
        return cls()
    raise ValueError(
        f"preconditioner must be one of {sorted(_BY_NAME)}, None or a Preconditioner "
        f"instance, got {spec!r}"
    )
