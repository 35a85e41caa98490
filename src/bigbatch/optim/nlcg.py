"""NLCG: stochastic preconditioned nonlinear conjugate gradient (Adya et al., 2019).

A ``torch.optim.Optimizer``. The search direction is ``d = z + beta * d_prev`` with
``z = P (-g)`` the preconditioned negative gradient and ``beta`` from a conjugacy rule on
GLOBAL scalar products (over all parameters at once). The step is ``lr * base_lr * d``
where ``lr`` comes from ``param_groups`` (so every ``torch.optim.lr_scheduler`` works) and
``base_lr`` is the loss-driven step control's multiplier. A full-batch mode replaces the step
control with a strong-Wolfe line search. Math of the parts lives in ``conjugacy``,
``preconditioners``, ``step_control`` and ``line_search``; this file runs them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from copy import deepcopy
from functools import partial
from itertools import chain
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from bigbatch.distributed.data_parallel import (
    ConsistencyCheck,
    GradientAgreement,
    data_parallel_group,
)
from bigbatch.optim import fused_kernels
from bigbatch.optim.conjugacy import (
    BETA_RULES,
    RULES_NEEDING_Y,
    RULES_NEEDING_Z_PREV,
    ConjugacyScalars,
    beta_from_rule,
)
from bigbatch.optim.flat_layout import FlatLayout
from bigbatch.optim.line_search import LineSearch, StrongWolfe
from bigbatch.optim.preconditioners import Preconditioner, SecantPair, make_preconditioner
from bigbatch.optim.step_control import STEP_CONTROL_MODES, StepControl
from bigbatch.optim.validation import (
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_unique_params,
)

__all__ = ["NLCG"]

_GLOBAL_KEY = "nlcg_global"
_NONFINITE_POLICIES = ("skip", "raise")


class NLCG(Optimizer):
    """Stochastic preconditioned nonlinear conjugate gradient.

    Args:
        params: parameters or param groups. Per-group options: ``lr``, ``weight_decay``,
            ``decoupled_weight_decay``, ``lars``, ``lars_trust`` (exclude biases and norm
            weights from decay or LARS by putting them in a group with those options off).
        lr: learning rate ``eta`` (full-batch mode: the first trial step). Default 0.1.
        beta_rule: ``"fr"`` (reference default), ``"pr"``, ``"pr+"``, ``"hs"``, ``"dy"``,
            ``"hs-dy"`` or ``"fr-pr"`` (see :mod:`bigbatch.optim.conjugacy`).
        beta_clip: ``(low, high)`` clip of beta, ``None`` for no clipping; either bound may
            be ``None``. Default ``(0.0, 1.0)`` as in the reference.
        preconditioner: ``"bfgs"`` (default, the paper's diagonal BFGS), ``"adam"``,
            ``"none"`` or a :class:`~bigbatch.optim.preconditioners.Preconditioner`.
        step_control: ``"step"`` (default in stochastic mode: compare the loss EMA every
            ``step_control_period`` steps), ``"online"`` or ``"off"`` (default and the only
            choice with a line search).
        step_control_period: steps between comparisons in ``"step"`` mode (default 5).
        step_control_threshold: scales the loss-ratio bands (default 1.0).
        weight_decay: L2 coefficient (default 0).
        decoupled_weight_decay: ``False`` (default): coupled L2, ``g += wd * w`` as in the
            reference; ``True``: ``w *= 1 - lr * wd`` outside the CG recursion (AdamW style).
        lars: scale each parameter's gradient by
            ``lars_trust * |w| / (|g| + eps + 0.1 * lars_trust * |w|)`` (the reference's
            LARS variant; a parameter with ``|w| = 0`` keeps scale 1). Default off.
        lars_trust: LARS trust coefficient (default 1e-3).
        restart_every: reset the direction to ``z`` every N steps (default ``None``: never).
        restart_on_ascent: reset the direction when ``d.g >= 0`` (default ``True``).
        line_search: ``None`` (stochastic mode), ``"strong_wolfe"`` or a callable
            implementing :class:`~bigbatch.optim.line_search.LineSearch`. Needs a closure.
        max_iter: CG iterations per ``step(closure)`` call in line-search mode (default 1).
        tolerance_grad: line-search mode stops when ``max|g| <= tolerance_grad``.
        tolerance_change: line-search mode stops when the loss or step changes less.
        nonfinite: ``"skip"`` (default): a step whose gradient or loss has a NaN/Inf is
            skipped with a warning, parameters and state untouched, and counted in
            ``skipped_steps``; ``"raise"``: ``FloatingPointError``, nothing changed.
        eps: the reference's regulariser in beta's denominator and the BFGS update (1e-8).
        distributed: data-parallel training over ``torch.distributed``: ``None`` (default)
            finds it by itself (an initialised process group of more than one rank), ``True``
            requires it, ``False`` runs each process on its own. Each rank passes the MEAN
            loss over its own shard; the step control and every decision see the mean over
            the ranks (one scalar all-reduce per step), and the gradients are averaged once:
            by ``DistributedDataParallel`` when the model is wrapped (all ranks then hold
            the same gradients, checked at the first step), else by NLCG itself (one
            all-reduce of the flat gradient). Line search is refused there.
        consistency_every: distributed only: every this many steps the parameters' float64
            checksums are compared across the ranks; a difference raises
            :class:`~bigbatch.distributed.RanksDivergedError` (default 100; 0: never).
        fused: run the element-wise work of the diagonal preconditioners (``"bfgs"``,
            ``"adam"``) and of the new direction in a few ``torch.compile``d kernels
            (:mod:`bigbatch.optim.fused_kernels`): fewer passes over parameter-sized memory,
            the same math up to float rounding (the sums are taken in another order). Each
            kernel compiles at its first use (seconds, once per process and buffer size);
            without a working compiler a warning says so and the step runs unfused. Not
            fused: the HS/DY-type rules (they need ``y`` itself), param groups with different
            learning rates under BFGS, other preconditioners. Default ``False``.

    The loss: the step control needs the training loss. Pass it as ``step(closure)`` (the
    closure's return value) or ``step(loss=loss)``. When neither is given, the step is taken
    with the current multiplier and the step control learns nothing from it (a warning says
    so once). Use ``step_control="off"`` to silence it.

    State lives in flat buffers (one per optimizer); ``state[p]`` holds views of them named
    ``d``, ``g_prev`` (when the rule or preconditioner uses ``y = g - g_prev``), ``z_prev``
    (PR-type rules; it holds ``P g_prev``) and the preconditioner's buffers, in
    float32 for float16/bfloat16 parameters. Parameters whose ``grad`` is ``None`` count as
    a zero gradient and are not moved. All parameters must be on one device.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.1,
        *,
        beta_rule: str = "fr",
        beta_clip: tuple[float | None, float | None] | None = (0.0, 1.0),
        preconditioner: str | Preconditioner | None = "bfgs",
        step_control: str | None = None,
        step_control_period: int = 5,
        step_control_threshold: float = 1.0,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        lars: bool = False,
        lars_trust: float = 1e-3,
        restart_every: int | None = None,
        restart_on_ascent: bool = True,
        line_search: str | LineSearch | None = None,
        max_iter: int = 1,
        tolerance_grad: float = 1e-10,
        tolerance_change: float = 1e-12,
        nonfinite: str = "skip",
        eps: float = 1e-8,
        distributed: bool | None = None,
        consistency_every: int = 100,
        fused: bool = False,
    ) -> None:
        self.eps = check_number("eps", eps, low=0.0)
        self.fused = check_bool("fused", fused)
        every = cast(int, check_int("consistency_every", consistency_every, low=0))
        self._group = _data_parallel(distributed)
        self.beta_rule = check_choice("beta_rule", beta_rule, BETA_RULES)
        self.beta_clip = _check_beta_clip(beta_clip)
        self.preconditioner = make_preconditioner(preconditioner, self.eps)
        self.line_search = _make_line_search(line_search)
        default_control = "off" if self.line_search is not None else "step"
        mode = check_choice(
            "step_control",
            default_control if step_control is None else step_control,
            STEP_CONTROL_MODES,
        )
        if self.line_search is not None and self._group is not None:
            raise ValueError(
                "line_search is not supported in data-parallel training (each rank's "
                "closure sees its own shard); use the stochastic mode (line_search=None)"
            )
        self._agreement = GradientAgreement(self._group) if self._group is not None else None
        self._consistency = (
            ConsistencyCheck(self._group, every) if self._group is not None else None
        )
        if self.line_search is not None and mode != "off":
            raise ValueError(
                f"step_control must be 'off' when line_search is set, got {step_control!r}"
            )
        self.control = StepControl(
            mode=mode,
            period=cast(int, check_int("step_control_period", step_control_period, low=1)),
            threshold=check_number(
                "step_control_threshold", step_control_threshold, low=0.0, low_open=True
            ),
        )
        self.restart_every = check_int("restart_every", restart_every, low=1, allow_none=True)
        self.restart_on_ascent = check_bool("restart_on_ascent", restart_on_ascent)
        self.max_iter = cast(int, check_int("max_iter", max_iter, low=1))
        self.tolerance_grad = check_number("tolerance_grad", tolerance_grad, low=0.0)
        self.tolerance_change = check_number("tolerance_change", tolerance_change, low=0.0)
        self.nonfinite = check_choice("nonfinite", nonfinite, _NONFINITE_POLICIES)
        self.skipped_steps = 0
        self._warned_no_loss = False
        self._layout: FlatLayout | None = None
        self._flat: dict[str, Tensor] = {}
        self._work: dict[str, Tensor] = {}
        self._view_cache: dict[str, list[Tensor]] = {}
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "lars": lars,
            "lars_trust": lars_trust,
        }
        _check_group(defaults)
        super().__init__(params, defaults)
        if self.line_search is not None and any(
            g["lars"] or (g["decoupled_weight_decay"] and g["weight_decay"])
            for g in self.param_groups
        ):
            raise ValueError(
                "line_search needs a fixed objective: lars and decoupled_weight_decay must be "
                "off (coupled weight_decay is added to the objective)"
            )

    # ------------------------------------------------------------------ construction
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            check_unique_params(group["params"], "NLCG")
            _check_group(group)
            for p in group["params"]:
                if not p.is_floating_point():
                    raise ValueError(f"NLCG optimizes floating-point tensors, got {p.dtype}")
        except ValueError:
            self.param_groups.pop()  # leave the optimizer as it was
            raise
        if self._layout is not None:  # a new group after steps: re-lay the buffers
            self._relayout()

    @property
    def _needs_z_prev(self) -> bool:
        return self.beta_rule in RULES_NEEDING_Z_PREV

    @property
    def _needs_y(self) -> bool:
        return self.beta_rule in RULES_NEEDING_Y or self.preconditioner.needs_secant

    def _buffer_names(self) -> list[str]:
        names = ["d", "g_prev"] if self._needs_y else ["d"]
        if self._needs_z_prev:
            names.append("z_prev")
        return names + list(self.preconditioner.buffers)

    def _new_layout(self) -> FlatLayout:
        return FlatLayout.from_groups([g["params"] for g in self.param_groups])

    def _allocate(self, layout: FlatLayout) -> None:
        self._layout = layout
        self._flat = {}
        for name in self._buffer_names():
            buf = layout.empty()
            if name in self.preconditioner.buffers:
                self.preconditioner.init_buffer(name, buf)
            else:
                buf.zero_()
            self._flat[name] = buf
        self._work = {}
        self._view_cache = {}
        self.preconditioner.attach(layout)
        for name in self._flat:
            for p, view in zip(layout.params, self._param_views(name), strict=True):
                self.state[p][name] = view

    def _global(self) -> dict[str, Any]:
        assert self._layout is not None
        return cast(dict[str, Any], self.state[self._layout.params[0]][_GLOBAL_KEY])

    def _ensure_state(self) -> FlatLayout:
        if self._layout is None:
            self._allocate(self._new_layout())
            self.state[self._layout_params0()][_GLOBAL_KEY] = _fresh_global(len(self.param_groups))
        assert self._layout is not None
        return self._layout

    def _layout_params0(self) -> Tensor:
        assert self._layout is not None
        return self._layout.params[0]

    def _relayout(self) -> None:
        """Rebuild buffers for a changed parameter set, keeping per-parameter state."""
        assert self._layout is not None
        glob = self.state[self._layout.params[0]].pop(_GLOBAL_KEY)
        saved = {
            p: {name: self.state[p][name].clone() for name in self._flat}
            for p in self._layout.params
        }
        self._allocate(self._new_layout())
        for p, entry in saved.items():
            for name, value in entry.items():
                self.state[p][name].copy_(value)
        glob["scales"] = [0.0] * len(self.param_groups)
        glob["force_restart"] = True  # the old direction does not cover the new parameters
        self.state[self._layout_params0()][_GLOBAL_KEY] = glob

    def _param_views(self, name: str) -> list[Tensor]:
        """Cached per-parameter views of a flat buffer or workspace."""
        views = self._view_cache.get(name)
        if views is None:
            assert self._layout is not None
            flat = self._flat[name] if name in self._flat else self._workspace(name)
            views = self._view_cache[name] = self._layout.views(flat)
        return views

    def _workspace(self, name: str) -> Tensor:
        buf = self._work.get(name)
        if buf is None:
            assert self._layout is not None
            buf = self._work[name] = self._layout.empty()
        return buf

    # ------------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        entry = sd["state"].get(0)
        if entry is not None and _GLOBAL_KEY in entry:
            glob = dict(entry[_GLOBAL_KEY])
            glob["step_control"] = self.control.state_dict()
            glob["preconditioner"] = deepcopy(self.preconditioner.extra_state_dict())
            glob["skipped_steps"] = self.skipped_steps
            glob["config"] = {
                "beta_rule": self.beta_rule,
                "preconditioner": self.preconditioner.name,
            }
            sd["state"][0] = {**entry, _GLOBAL_KEY: glob}  # never mutate the live state
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        saved: Mapping[Any, Any] = state_dict["state"]
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        glob = self._check_loadable(saved, saved_ids, state_dict["param_groups"])  # no change yet
        super().load_state_dict(dict(state_dict))  # validates groups, restores param_groups
        for p in list(self.state):  # drop super()'s dtype-cast copies; refilled below
            self.state.pop(p)
        self._layout, self._flat, self._work, self._view_cache = None, {}, {}, {}
        if glob is None:
            return
        layout = self._new_layout()
        self._allocate(layout)
        for j, pid in enumerate(saved_ids):
            entry = saved.get(pid, {})
            for name, buf in self._flat.items():
                if name in entry:  # a buffer the checkpoint lacks keeps its initial value
                    view = layout.views(buf, j, j + 1)[0]
                    view.copy_(entry[name].reshape(view.shape))
        glob = deepcopy(dict(glob))
        glob.pop("config", None)
        self.control.load_state_dict(glob.pop("step_control"))
        self.preconditioner.load_extra_state_dict(glob.pop("preconditioner"))
        self.skipped_steps = int(glob.pop("skipped_steps", 0))
        self.state[layout.params[0]][_GLOBAL_KEY] = glob

    def _check_loadable(
        self, saved: Mapping[Any, Any], saved_ids: list[Any], groups: list[Mapping[str, Any]]
    ) -> Mapping[str, Any] | None:
        """The checkpoint's global scalars, after checking every buffer fits its parameter."""
        for k, group in enumerate(groups):
            try:
                _check_group({**self.defaults, **{n: v for n, v in group.items() if n != "params"}})
            except ValueError as exc:
                raise ValueError(f"NLCG state_dict param_groups[{k}]: {exc}") from None
        if not saved:
            return None
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        if len(params) != len(saved_ids):
            raise ValueError(
                f"NLCG state_dict has {len(saved_ids)} parameters, the optimizer {len(params)}"
            )
        glob = None
        for j, (pid, p) in enumerate(zip(saved_ids, params, strict=True)):
            entry = saved.get(pid, {})
            for name in self._buffer_names():
                value = entry.get(name)
                if value is None:
                    continue
                if not isinstance(value, Tensor) or tuple(value.shape) != tuple(p.shape):
                    raise ValueError(
                        f"NLCG state {name!r} of parameter {j} does not match its shape "
                        f"{tuple(p.shape)}: got {getattr(value, 'shape', type(value))}"
                    )
                if not bool(torch.isfinite(value).all()):
                    raise ValueError(f"NLCG state {name!r} of parameter {j} is not finite")
            glob = entry.get(_GLOBAL_KEY, glob)
        missing = {"step", "step_control", "preconditioner"} - set(glob or {})
        if glob is None or missing:
            raise ValueError(
                f"NLCG state_dict has per-parameter state but no complete {_GLOBAL_KEY!r} "
                f"(missing {sorted(missing)})"
            )
        config = glob.get("config", {})
        ours = {"beta_rule": self.beta_rule, "preconditioner": self.preconditioner.name}
        for key, value in ours.items():
            if key in config and config[key] != value:
                raise ValueError(
                    f"NLCG state_dict was saved with {key}={config[key]!r}, this optimizer has "
                    f"{key}={value!r}: its buffers mean something else here"
                )
        self.preconditioner.check_extra_state(glob["preconditioner"])
        return cast(Mapping[str, Any], glob)

    def buffer_nbytes(self) -> int:
        """Bytes held by the optimizer: persistent state, reusable workspace and what the
        preconditioner keeps itself."""
        tensors = chain(self._flat.values(), self._work.values())
        return sum(t.numel() * t.element_size() for t in tensors) + self.preconditioner.nbytes()

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(
        self, closure: Callable[[], Any] | None = None, loss: Tensor | float | None = None
    ) -> Any:
        """One NLCG step (line-search mode: up to ``max_iter`` CG iterations).

        Args:
            closure: re-evaluates the model and returns the loss (required with a line
                search; otherwise optional and used for the step control's loss).
            loss: the loss of the current mini-batch, when not using a closure.
        Returns:
            the closure's loss (or ``loss``), as ``torch.optim`` optimizers do.
        """
        if self.line_search is not None:
            if closure is None:
                raise ValueError("NLCG with line_search needs step(closure)")
            return self._line_search_step(closure)
        if closure is not None:
            if loss is not None:
                raise ValueError("pass either closure or loss to NLCG.step, not both")
            with torch.enable_grad():
                loss = closure()
        loss_value = self._loss_value(loss)
        layout = self._ensure_state()
        g = self._gather_gradient(layout)
        if not self._amp_unscale(g):
            self.preconditioner.discard_step()
            return loss
        if self._group is not None:
            loss_value = self._data_parallel(g, loss_value)
        if not self._finite(g, loss_value):
            self.preconditioner.discard_step()
            return loss
        self._add_weight_decay_and_lars(layout, g)
        glob = self._global()
        step = int(glob["step"])
        beta, rz = self._direction_coefficient(layout, g, glob)
        if not (math.isfinite(rz) and math.isfinite(beta)):  # z = P g overflowed, or worse
            self._skip_nonfinite("preconditioned gradient")
            return loss
        base_old = self.control.base_lr
        decision = self.control.decide(loss_value, step)
        self._apply_update(layout, beta, decision.base_lr, base_old, decision.undo)
        self._finish_step(g, beta, rz, glob)
        glob["scales"] = [float(gr["lr"]) * decision.base_lr for gr in self.param_groups]
        if self._consistency is not None:
            self._consistency(int(glob["step"]), layout.params, "NLCG")
        return loss

    _step_supports_amp_scaling = True

    def _amp_unscale(self, g: Tensor) -> bool:
        """Under ``torch.amp.GradScaler`` (``scaler.step(opt)`` sets ``grad_scale`` and
        ``found_inf``): ``False`` when the scaler found an inf/NaN (the step is skipped, as
        the scaler skips it); else the flat gradient is unscaled and so are the
        preconditioner's statistics. Pass the UNSCALED loss to ``step(loss=...)``."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:
            return True
        if float(found_inf) > 0:
            return False
        scale = getattr(self, "grad_scale", None)
        if scale is not None:
            g.div_(scale.to(g.device))
            self.preconditioner.set_loss_scale(float(scale))
        elif self.preconditioner.needs_loss_scale:
            raise ValueError(
                "NLCG with the K-FAC preconditioner under a GradScaler whose gradients were "
                "unscaled already (scaler.unscale_(opt) before scaler.step(opt)): its "
                "statistics would stay scaled; let scaler.step(opt) unscale"
            )
        return True

    def _data_parallel(self, g: Tensor, loss: float | None) -> float | None:
        """Average the flat gradient over the ranks unless they agree already (DDP), and
        return the mean of the ranks' losses (what every decision of the step sees)."""
        world = dist.get_world_size(self._group)
        assert self._agreement is not None
        if not self._agreement.decide([g]):
            dist.all_reduce(g, group=self._group)
            g.div_(world)
        if loss is None:
            return None
        shared = torch.tensor([loss], dtype=torch.float64, device=g.device)
        dist.all_reduce(shared, group=self._group)
        return float(shared.item()) / world

    def _loss_value(self, loss: Tensor | float | None) -> float | None:
        if loss is None:
            if self.control.mode != "off" and not self._warned_no_loss:
                warnings.warn(
                    "NLCG step control needs the loss: call step(closure) or "
                    "step(loss=loss); without it the step multiplier stays unchanged. "
                    "Pass step_control='off' to silence this.",
                    stacklevel=3,
                )
                self._warned_no_loss = True
            return None
        value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
        return value

    def _gather_gradient(self, layout: FlatLayout, into: str = "g") -> Tensor:
        grads: list[Tensor | None] = []
        for p in layout.params:
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError("NLCG does not support sparse gradients")
            grads.append(p.grad)
        return layout.gather(grads, self._workspace(into), self._param_views(into))

    def _finite(self, g: Tensor, loss: float | None) -> bool:
        # One pass, no temporary: a NaN/Inf anywhere makes the sum non-finite (so does a
        # gradient so large that its sum overflows, which is no usable step either).
        ok = math.isfinite(float(g.sum())) and (loss is None or math.isfinite(loss))
        if ok:
            return True
        self._skip_nonfinite("gradient" if loss is None or math.isfinite(loss) else "loss")
        return False

    def _skip_nonfinite(self, what: str) -> None:
        """The non-finite policy: raise, or skip the step (parameters, direction and the
        step's scalars untouched; a preconditioner that refreshed its statistics from this
        step keeps them unless they were non-finite) with a warning."""
        message = (
            f"NLCG got a non-finite {what} (NaN or Inf); parameters and optimizer state are "
            "left unchanged"
        )
        if self.nonfinite == "raise":
            raise FloatingPointError(message + " (nonfinite='raise')")
        self.skipped_steps += 1
        warnings.warn(message + "; the step was skipped (nonfinite='skip')", stacklevel=4)

    def _add_weight_decay_and_lars(self, layout: FlatLayout, g: Tensor) -> None:
        for i, group in enumerate(self.param_groups):
            first, stop = layout.group_param_ranges[i]
            params = list(layout.params[first:stop])
            wd = float(group["weight_decay"])
            coupled = wd and not group["decoupled_weight_decay"]
            if not params or not (coupled or group["lars"]):
                continue
            views = layout.group_views(g, i)
            if coupled:
                live = [(v, p) for v, p in zip(views, params, strict=True) if p.grad is not None]
                if live:  # parameters without a gradient stay frozen: no decay either
                    v_live, p_live = zip(*live, strict=True)
                    torch._foreach_add_(list(v_live), list(p_live), alpha=wd)
            if group["lars"]:
                trust = float(group["lars_trust"])
                w_norm = torch.stack(torch._foreach_norm(params)).to(g.dtype)
                g_norm = torch.stack(torch._foreach_norm(views))
                scale = trust * w_norm / (g_norm + self.eps + 0.1 * trust * w_norm)
                scale = torch.where(w_norm > 0, scale, torch.ones_like(scale))
                sizes = torch.tensor([p.numel() for p in params], device=g.device)
                layout.group_slice(g, i).mul_(torch.repeat_interleave(scale, sizes))

    def _direction_coefficient(
        self, layout: FlatLayout, g: Tensor, glob: dict[str, Any]
    ) -> tuple[float, float]:
        """Update the preconditioner, put ``z = P g`` in the workspace, return beta and g.P.g.

        The new direction is ``d = -z + beta * d`` (``z`` is kept positive to save a pass).
        """
        step = int(glob["step"])
        first = step == 0
        d = self._flat["d"]
        y: Tensor | None = None
        secant: SecantPair | None = None
        bufs = {name: self._flat[name] for name in self.preconditioner.buffers}
        z = self._workspace("z")
        fused_rz = self._fused_update_apply(bufs, g, glob, z) if self.fused else None
        if fused_rz is not None:
            rz = float(fused_rz)
        elif not first and self._needs_y:
            y = torch.sub(g, self._flat["g_prev"], out=self._workspace("y"))
            if self.preconditioner.needs_secant:
                scales = glob["scales"]
                if len(set(scales)) == 1:  # s = scale * d, never built
                    secant = SecantPair(direction=d, scale=float(scales[0]), y=y)
                else:
                    s = self._workspace("s")
                    for i, scale in enumerate(scales):
                        torch.mul(layout.group_slice(d, i), scale, out=layout.group_slice(s, i))
                    secant = SecantPair(direction=s, scale=1.0, y=y)
        if fused_rz is None:
            self.preconditioner.update(bufs, g, secant, step, scratch=z)
            z = self.preconditioner.apply(bufs, g, out=z)
            rz = float(torch.dot(g, z))  # r.z with r = -g and the descent direction -z
        restart = (
            first
            or bool(glob.pop("force_restart", False))
            or (self.restart_every is not None and step % self.restart_every == 0)
        )
        if restart:
            return 0.0, rz
        needs_dy = self.beta_rule in RULES_NEEDING_Y
        scalars = ConjugacyScalars(
            rz=rz,
            rz_prev=float(glob["rz_prev"]),
            r_zprev=float(torch.dot(g, self._flat["z_prev"])) if self._needs_z_prev else None,
            zy=-float(torch.dot(z, y)) if y is not None and needs_dy else None,
            dy=float(torch.dot(d, y)) if y is not None and needs_dy else None,
        )
        beta = beta_from_rule(self.beta_rule, scalars, self.eps)
        low, high = self.beta_clip if self.beta_clip is not None else (None, None)
        if low is not None:
            beta = max(low, beta)
        if high is not None:
            beta = min(high, beta)
        if beta != 0.0 and self.restart_on_ascent:
            slope = -rz + beta * float(torch.dot(g, d))  # d_new . g
            if slope >= 0.0:
                glob["restarts"] = int(glob["restarts"]) + 1
                return 0.0, rz
        return beta, rz

    def _apply_update(
        self, layout: FlatLayout, beta: float, base_new: float, base_old: float, undo: float
    ) -> None:
        """``w += (1-undo) lr base_new d_new - undo lr base_old d_old`` per group, with
        ``d_new = -z + beta d_old``; ``d`` holds ``d_new`` afterwards."""
        d_views = self._param_views("d")
        groups = []
        for i, group in enumerate(self.param_groups):
            first, stop = layout.group_param_ranges[i]
            keep = [j for j in range(first, stop) if layout.params[j].grad is not None]
            if keep:
                groups.append(([layout.params[j] for j in keep], keep, group))
        for params, _, group in groups:
            lr, wd = float(group["lr"]), float(group["weight_decay"])
            if wd and group["decoupled_weight_decay"]:
                torch._foreach_mul_(params, 1.0 - lr * wd)
        if undo:  # take back part of the previous update, along the previous direction
            for params, keep, group in groups:
                alpha = -undo * float(group["lr"]) * base_old
                torch._foreach_add_(params, [d_views[j] for j in keep], alpha=alpha)
        self._new_direction(beta)
        for params, keep, group in groups:
            alpha = (1.0 - undo) * float(group["lr"]) * base_new
            torch._foreach_add_(params, [d_views[j] for j in keep], alpha=alpha)

    def _new_direction(self, beta: float) -> None:
        z, d = self._workspace("z"), self._flat["d"]
        if beta == 0.0:
            torch.neg(z, out=d)
        elif self.fused:
            fused_kernels.new_direction(d, z, torch.tensor(beta, dtype=d.dtype, device=d.device))
        else:
            d.mul_(beta).sub_(z)

    def _fused_update_apply(
        self, bufs: dict[str, Tensor], g: Tensor, glob: dict[str, Any], z: Tensor
    ) -> Tensor | None:
        """The preconditioner's fused update and ``z = P g`` (``fused=True``); returns
        ``g.z``, or ``None`` when this step has no fused path (nothing was changed)."""
        if self.beta_rule in RULES_NEEDING_Y:
            return None
        last: tuple[Tensor, float, Tensor] | None = None
        if int(glob["step"]) > 0 and self.preconditioner.needs_secant:
            scales = glob["scales"]
            if len(set(scales)) != 1:  # s differs from a multiple of d: the unfused path
                return None
            last = (self._flat["d"], float(scales[0]), self._flat["g_prev"])
        return self.preconditioner.update_apply_fused(bufs, g, last, int(glob["step"]), z)

    def _finish_step(self, g: Tensor, beta: float, rz: float, glob: dict[str, Any]) -> None:
        """The current gradient (and ``z``) become the previous ones: swap, do not copy."""
        if self._needs_y:
            self._swap("g", "g_prev")
        if self._needs_z_prev:
            self._swap("z", "z_prev")
        glob["rz_prev"] = rz
        glob["beta"] = beta
        glob["step"] = int(glob["step"]) + 1

    def _swap(self, work: str, flat: str) -> None:
        assert self._layout is not None
        self._param_views(work), self._param_views(flat)  # make sure both are cached
        self._work[work], self._flat[flat] = self._flat[flat], self._work[work]
        cache = self._view_cache
        cache[work], cache[flat] = cache[flat], cache[work]
        for p, view in zip(self._layout.params, cache[flat], strict=True):
            self.state[p][flat] = view

    # ------------------------------------------------------------------ line search
    def _line_search_step(self, closure: Callable[[], Any]) -> Any:
        layout = self._ensure_state()
        assert self.line_search is not None
        with torch.enable_grad():
            orig_loss = closure()
        f = float(orig_loss.detach()) + self._decay_penalty(layout)
        g = self._gather_gradient(layout)
        self._add_weight_decay_and_lars(layout, g)
        if not self._finite(g, f):
            return orig_loss
        glob = self._global()
        x0 = self._workspace("x0")
        params = list(layout.params)
        x0_views, d_views = self._param_views("x0"), self._param_views("d")
        phi = partial(self._evaluate_at, closure, layout, x0_views, d_views)
        for _ in range(self.max_iter):
            if float(g.abs().max()) <= self.tolerance_grad:
                break
            step = int(glob["step"])
            beta, rz = self._direction_coefficient(layout, g, glob)
            gtd_prev, t_prev = glob.get("gtd"), glob.get("t")
            self._new_direction(beta)
            self._finish_step(g, beta, rz, glob)
            d = self._flat["d"]
            gtd = float(torch.dot(g, d))
            if gtd >= 0.0:  # cannot happen with a positive-definite P; stop safely
                break
            lr = float(self.param_groups[0]["lr"])
            t0 = lr if step == 0 or not gtd_prev or not t_prev else t_prev * gtd_prev / gtd
            layout.gather(params, x0)
            result = self.line_search(phi, f, g, d, gtd, t0)
            torch._foreach_copy_(params, x0_views)
            if not self._finite(result.grad, result.loss):
                break  # parameters are back at the last good point
            torch._foreach_add_(params, d_views, alpha=result.t)
            glob["scales"] = [result.t] * len(self.param_groups)
            glob["gtd"], glob["t"] = gtd, result.t
            g = self._workspace("g")
            g.copy_(result.grad)
            converged = abs(result.loss - f) < self.tolerance_change or (
                abs(result.t) * float(d.abs().max()) < self.tolerance_change
            )
            f = result.loss
            if not math.isfinite(f) or converged:
                break
        return orig_loss

    def _evaluate_at(
        self,
        closure: Callable[[], Any],
        layout: FlatLayout,
        x0_views: list[Tensor],
        d_views: list[Tensor],
        t: float,
    ) -> tuple[float, Tensor]:
        """Objective (with coupled L2) and its flat gradient at ``x0 + t d``."""
        params = list(layout.params)
        torch._foreach_copy_(params, x0_views)
        torch._foreach_add_(params, d_views, alpha=t)
        with torch.enable_grad():
            value = float(closure().detach())
        value += self._decay_penalty(layout)
        grad = self._gather_gradient(layout, "g_trial").clone()
        self._add_weight_decay_and_lars(layout, grad)
        return value, grad

    def _decay_penalty(self, layout: FlatLayout) -> float:
        total = 0.0
        for i, group in enumerate(self.param_groups):
            wd = float(group["weight_decay"])
            first, stop = layout.group_param_ranges[i]
            if wd and stop > first:
                norms = torch._foreach_norm(list(layout.params[first:stop]))
                total += 0.5 * wd * float(sum(float(n) ** 2 for n in norms))
        return total


def _fresh_global(n_groups: int) -> dict[str, Any]:
    return {"step": 0, "rz_prev": 0.0, "beta": 0.0, "restarts": 0, "scales": [0.0] * n_groups}


def _check_group(group: Mapping[str, Any]) -> None:
    check_number("lr", group["lr"], low=0.0)
    check_number("weight_decay", group["weight_decay"], low=0.0)
    check_number("lars_trust", group["lars_trust"], low=0.0, low_open=True)
    for flag in ("decoupled_weight_decay", "lars"):
        if not isinstance(group[flag], bool):
            raise ValueError(f"{flag} must be True or False, got {group[flag]!r}")


def _data_parallel(distributed: bool | None) -> Any:
    """The process group NLCG averages over, or ``None`` for one process."""
    if distributed is not None and not isinstance(distributed, bool):
        raise ValueError(f"distributed must be None, True or False, got {distributed!r}")
    if distributed is False:
        return None
    group = data_parallel_group()
    if group is None and distributed:
        raise ValueError(
            "distributed=True needs an initialised torch.distributed process group with more "
            "than one rank (torchrun ...; torch.distributed.init_process_group)"
        )
    return group


def _check_beta_clip(
    clip: tuple[float | None, float | None] | None,
) -> tuple[float | None, float | None] | None:
    if clip is None:
        return None
    if not isinstance(clip, (tuple, list)) or len(clip) != 2:
        raise ValueError(f"beta_clip must be None or a (low, high) pair, got {clip!r}")
    low = None if clip[0] is None else check_number("beta_clip[0]", clip[0])
    high = None if clip[1] is None else check_number("beta_clip[1]", clip[1])
    if low is not None and high is not None and low > high:
        raise ValueError(f"beta_clip must have low <= high, got {clip!r}")
    return (low, high)


def _make_line_search(spec: str | LineSearch | None) -> LineSearch | None:
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec.lower() == "strong_wolfe":
            return StrongWolfe()
        raise ValueError(f"line_search must be None, 'strong_wolfe' or a callable, got {spec!r}")
    if callable(spec):
        return spec
    raise ValueError(f"line_search must be None, 'strong_wolfe' or a callable, got {spec!r}")
