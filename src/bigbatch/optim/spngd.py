"""SP-NGD: scalable and practical natural gradient descent (Osawa et al., 2020).

A ``torch.optim.Optimizer``: momentum SGD on the natural gradient ``F^-1 g``, with ``F`` the
K-FAC Fisher of Linear/Conv2d/Embedding layers and unit-wise 2x2 blocks for BatchNorm and
LayerNorm, computed from stale statistics (each refreshed only when it has changed) and
damped, pi-corrected inverses. The curvature lives in :class:`bigbatch.curvature.KFACEngine`;
this file turns preconditioned gradients into updates. With ``distributed=`` the engine runs
the data-parallel strategy :class:`bigbatch.distributed.DistributedCurvature`: the gradient
and statistics exchange then happens inside :meth:`SPNGD.step`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F
from torch.optim import Optimizer

from bigbatch.curvature.blocks.base import FisherBlock
from bigbatch.curvature.capture import FISHER_TYPES
from bigbatch.curvature.engine import KFACEngine
from bigbatch.curvature.keys import KFAC_APPROX, BlockKind, FisherType, KFACApprox
from bigbatch.curvature.linalg import MIN_DAMPING, InversionConfig
from bigbatch.curvature.staleness import StalenessConfig
from bigbatch.curvature.strategy import CurvatureStrategy, RefreshReport
from bigbatch.distributed.config import DistributedConfig
from bigbatch.distributed.data_parallel import ConsistencyCheck, data_parallel_group, unwrap
from bigbatch.distributed.kfac_sync import DistributedCurvature
from bigbatch.optim.validation import (
    check_choice,
    check_int,
    check_number,
    check_unique_params,
)

__all__ = ["SPNGD"]

_NONFINITE_POLICIES = ("skip", "raise")
_MC_LOSSES = ("cross_entropy", "mse", "gaussian")


class SPNGD(Optimizer):
    """Natural-gradient momentum SGD with a K-FAC / unit-wise Fisher and stale statistics.

    Works unchanged in a standard loop (``zero_grad(); loss.backward(); step()``) or with
    ``step(closure)``: the statistics are recorded by hooks on ``model`` during the passes
    the loop runs anyway. The loss must be the MEAN over the batch (with gradient
    accumulation, each micro-batch's mean divided by the number of micro-batches), which is
    what makes the per-sample gradients ``N * dL/dy``.

    Args:
        model: the network; its Linear, Conv2d (groups=1), MultiheadAttention (each
            projection), BatchNorm, LayerNorm, RMSNorm and Embedding layers (with a tied
            head) get Fisher blocks (:mod:`bigbatch.curvature.blocks`). Other trainable
            parameters (listed once in a warning and in :attr:`fallback_parameters`) get
            plain momentum SGD. The loss must be the MEAN over the model output's entries
            per class (``F.cross_entropy`` of flattened logits, as usual); the Fisher is
            then that of this mean loss (K-FAC as curvlinops defines it).
        lr: learning rate (default 0.1); from ``param_groups``, so schedulers work.
        momentum: heavy-ball momentum on the preconditioned gradient (default 0.9), rescaled
            by ``lr_new / lr_old`` when the learning rate changes.
        damping: Tikhonov damping ``lambda`` (default 1e-3), per param group, changeable at
            any time (blocks are re-inverted when it changes).
        weight_decay: added to the preconditioned gradient, ``w * wd`` (default 0).
        weight_rescale: cap each Linear/Conv2d weight's Frobenius norm at ``sqrt(2 C_out)``
            after the update (the reference's replacement for weight decay; default off).
        kl_clip: scale the step so that ``lr^2 * sum(F^-1 g . g) <= kl_clip`` (default off).
        fisher: ``"empirical"`` (default: free, from the loss backward) or ``"mc"``: one
            sampled label per example; call :meth:`mc_backward` with the model's outputs
            before ``loss.backward()`` on steps where :meth:`statistics_due` is true.
        staleness: refresh-interval rule (:class:`StalenessConfig`); ``False`` refreshes
            every statistic every step from that step's batch. By default (``True``) each
            statistic is the running average of its measurements and its refresh interval
            doubles (up to 32 steps) while that average changes by less than 10% between
            refreshes, and halves otherwise; ``StalenessConfig(smoothing=0.0)`` compares raw
            measurements instead (see :mod:`bigbatch.curvature.staleness`).
        inversion: :class:`InversionConfig` (``"eigh"`` or ``"cholesky"``, failure policy).
        kfac_approx: ``"expand"`` (default) or ``"reduce"``: K-FAC for layers applied at many
            positions of a sample (tokens, patches, pixels), Eschenhagen et al. (2023); see
            :mod:`bigbatch.curvature.blocks.kronecker`.
        nonfinite: ``"skip"`` (default): a step with a NaN/Inf gradient or preconditioned
            gradient changes no parameter and no momentum, and warns; ``"raise"``:
            ``FloatingPointError``.
        params: optional parameter groups (default ``model.parameters()``).
        distributed: data-parallel training over ``torch.distributed``. ``None`` (default):
            found by itself: with an initialised process group of more than one rank, the
            ``"hybrid"`` mode below; else one process. ``False``: one process even then
            (ranks training on their own). ``DistributedConfig("hybrid" | "simple")``:
            that mode. Each rank runs forward/backward on its own equal-sized shard with
            the MEAN loss over that shard, in a ``DistributedDataParallel``-wrapped model
            (``model`` given wrapped or not; DDP then averages the gradients, and SPNGD
            does not again) or without DDP (``step()`` averages them; which one holds is
            decided at the first step from a checksum of every rank's gradients); the due
            statistics are combined exactly as one process would on the global batch.
            ``"hybrid"`` gives each Fisher block to one owner rank (cost-balanced), which
            alone inverts and preconditions it; ``"simple"`` has every rank compute every
            block. Every rank ends each step with the same parameters and momentum; in
            hybrid mode ``state_dict()`` is a collective (call it on every rank; each returns
            the full state). Bytes sent per collective: ``engine.strategy.comm.counter``.
            FSDP is refused.
        grad_scaler: the ``torch.amp.GradScaler`` of a loop that calls ``scaler.unscale_(opt)``
            before ``scaler.step(opt)`` (to clip gradients), so the curvature statistics can
            be unscaled as well. Without unscale_, ``scaler.step(opt)`` hands SP-NGD the scale
            itself (it supports the scaler's protocol): leave this ``None``. An inf/NaN step
            that the scaler skips is skipped here too, its statistics dropped.
        precondition: ``False`` records no statistics and preconditions nothing: plain
            momentum SGD with weight decay (equal to ``torch.optim.SGD(momentum=...)`` to the
            bit; the reference point of the equivalence tests). Default ``True``.
        consistency_every: distributed only: every this many steps a float64 checksum of
            the parameters is compared across the ranks and a difference raises
            :class:`~bigbatch.distributed.RanksDivergedError` (default 100; 0: never).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        *,
        momentum: float = 0.9,
        damping: float = 1e-3,
        weight_decay: float = 0.0,
        weight_rescale: bool = False,
        kl_clip: float | None = None,
        fisher: FisherType = "empirical",
        staleness: StalenessConfig | bool = True,
        inversion: InversionConfig | None = None,
        nonfinite: str = "skip",
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | None = None,
        distributed: DistributedConfig | bool | None = None,
        kfac_approx: KFACApprox = "expand",
        consistency_every: int = 100,
        precondition: bool = True,
        grad_scaler: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        model, wrapped = unwrap(model)
        self.kl_clip = (
            None if kl_clip is None else check_number("kl_clip", kl_clip, low=0.0, low_open=True)
        )
        self.nonfinite = check_choice("nonfinite", nonfinite, _NONFINITE_POLICIES)
        fisher = check_choice("fisher", fisher, FISHER_TYPES)
        kfac_approx = check_choice("kfac_approx", kfac_approx, KFAC_APPROX)
        every = check_int("consistency_every", consistency_every, low=0)
        if not isinstance(precondition, bool):
            raise ValueError(f"precondition must be True or False, got {precondition!r}")
        self.precondition = precondition
        if grad_scaler is not None and not callable(getattr(grad_scaler, "get_scale", None)):
            raise ValueError(f"grad_scaler must be a torch.amp.GradScaler, got {grad_scaler!r}")
        self.grad_scaler = grad_scaler
        config = _distributed_config(distributed, wrapped)
        if isinstance(staleness, bool):
            staleness = StalenessConfig(enabled=staleness)
        elif not isinstance(staleness, StalenessConfig):
            raise ValueError(f"staleness must be a bool or StalenessConfig, got {staleness!r}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "damping": damping,
            "weight_decay": weight_decay,
            "weight_rescale": weight_rescale,
        }
        _check_group(defaults)
        super().__init__(model.parameters() if params is None else params, defaults)
        strategy: CurvatureStrategy | None = None
        self._consistency: ConsistencyCheck | None = None
        if config is not None:
            strategy = DistributedCurvature(config, averaged=True if wrapped else None)
            self._consistency = ConsistencyCheck(config.group, int(every or 0))
        self.engine = KFACEngine(model, fisher, staleness, inversion, strategy, kfac_approx)
        if not precondition:
            self.engine.capture.arm(())  # nothing is ever recorded
        self.skipped_steps = 0
        #: each param group's lr at its last update (momentum is rescaled when lr changes)
        self._prev_lr: dict[int, float] = {}
        self.last_report = RefreshReport()
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        self._blocks = [
            b for b in self.engine.blocks.values() if all(p in self._group_of for p in b.params)
        ]
        in_blocks = {p for b in self._blocks for p in b.params}
        names = {p: n for n, p in model.named_parameters()}
        self.fallback_parameters = [  # frozen ones are never updated: not "fallback"
            names.get(p, "<unnamed>")
            for p in self._group_of
            if p not in in_blocks and p.requires_grad
        ]
        if self.fallback_parameters:
            reasons = dict(self.engine.capture.unsupported)
            shown = ", ".join(self.fallback_parameters[:10])
            more = len(self.fallback_parameters) - 10
            warnings.warn(
                f"SPNGD: {len(self.fallback_parameters)} parameter(s) have no Fisher block and "
                f"get plain momentum SGD: {shown}{f' and {more} more' if more > 0 else ''}"
                + (f" ({'; '.join(sorted(set(reasons.values())))})" if reasons else ""),
                stacklevel=2,
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            check_unique_params(self.param_groups[-1]["params"], "SPNGD")
            _check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    # ------------------------------------------------------------------ Fisher
    def statistics_due(self) -> bool:
        """Whether this step records curvature statistics (an MC backward is useful)."""
        return self.engine.statistics_due()

    def mc_backward(self, outputs: Tensor, loss: str = "cross_entropy") -> None:
        """One Monte Carlo Fisher backward from ``outputs`` (``fisher="mc"`` only).

        Samples one label per example from the model's predictive distribution and
        backpropagates the summed negative log-likelihood, feeding only the curvature
        statistics (no ``.grad`` is touched), so that ``G`` estimates the GGN of the loss the
        loop trains with: ``"cross_entropy"`` (categorical, logits of shape (N, C) or
        (N, ..., C)); ``"mse"`` for ``F.mse_loss`` (the MEAN over all N D entries: a Gaussian
        scaled so its output Hessian is ``2 / D``, as that loss's); ``"gaussian"`` for
        ``0.5 ||f - t||^2`` summed over the D outputs (unit variance). Computed in the
        outputs' precision (float64 stays float64). Call it before ``loss.backward()``; it
        does nothing on steps with no statistic due.
        """
        if self.engine.capture.fisher != "mc":
            raise ValueError("mc_backward needs SPNGD(..., fisher='mc')")
        loss = check_choice("loss", loss, _MC_LOSSES)
        if not self.statistics_due():
            return
        if not outputs.requires_grad:
            raise ValueError("mc_backward needs the model outputs with their autograd graph")
        wide = outputs if outputs.dtype in (torch.float32, torch.float64) else outputs.float()
        with torch.no_grad():
            detached = wide.detach()
            if loss == "cross_entropy":
                logits = detached.reshape(-1, detached.shape[-1])
                sampled = torch.multinomial(torch.softmax(logits, dim=-1), 1).squeeze(1)
            else:
                sampled_y = detached + torch.randn_like(detached)
        if loss == "cross_entropy":
            nll = F.cross_entropy(wide.reshape(-1, wide.shape[-1]), sampled, reduction="sum")
        else:
            nll = 0.5 * (wide - sampled_y).square().sum()
            if loss == "mse":  # F.mse_loss: output Hessian 2 / D per entry, not 1
                nll = nll * math.sqrt(2.0 / wide.shape[-1])
        leaves = [p for b in self._blocks for p in b.params]
        with self.engine.capture.monte_carlo():
            torch.autograd.grad(nll, leaves, retain_graph=True, allow_unused=True)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        for p in params:
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError("SPNGD does not support sparse gradients")
        grads: dict[Tensor, Tensor] = {p: cast(Tensor, p.grad) for p in params}
        if not self._amp_unscale(list(grads.values())):
            self.engine.capture.arm(self.engine.capture.armed)  # drop this step's statistics
            return loss
        kl = self._kl_total if self.kl_clip is not None else None
        outcome = self.engine.run_step(grads, self._damping_of, kl)
        if outcome.nonfinite:
            return self._nonfinite("gradient", loss)
        self.last_report = outcome.report
        directions, kl_total = outcome.directions, outcome.kl_total
        if not _all_finite(list(directions.values())):
            return self._nonfinite("preconditioned gradient", loss)
        self._update(directions, self._kl_scale(kl_total))
        self.engine.advance(arm=self.precondition)
        if self._consistency is not None:
            params = [p for g in self.param_groups for p in g["params"]]
            self._consistency(self.engine.step, params, "SPNGD")
        return loss

    _step_supports_amp_scaling = True

    def _amp_unscale(self, grads: list[Tensor]) -> bool:
        """Under ``torch.amp.GradScaler`` (``scaler.step(opt)`` sets ``grad_scale`` and
        ``found_inf``): ``False`` when the scaler found an inf/NaN (the step is skipped as
        the scaler skips it, and its statistics are dropped); else the gradients are
        unscaled in place and the curvature statistics of the window will be."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is None:
            return True  # no GradScaler
        if float(found_inf) > 0:
            return False
        scale = getattr(self, "grad_scale", None)
        if scale is None:
            if self.grad_scaler is None:
                raise ValueError(
                    "SPNGD under a GradScaler whose gradients were unscaled already "
                    "(scaler.unscale_(opt) before scaler.step(opt)): pass "
                    "SPNGD(..., grad_scaler=scaler) so the curvature statistics are unscaled "
                    "too"
                )
            self.engine.capture.grad_scale = float(self.grad_scaler.get_scale())
            return True
        if grads:
            torch._foreach_div_(grads, scale.to(grads[0].device))
        self.engine.capture.grad_scale = float(scale)
        return True

    def _damping_of(self, block: FisherBlock) -> float:
        group = self._group_of.get(block.params[0])
        return float((group if group is not None else self.defaults)["damping"])

    def _nonfinite(self, what: str, loss: Any) -> Any:
        message = f"SPNGD got a non-finite {what} (NaN or Inf); parameters are left unchanged"
        if self.nonfinite == "raise":
            raise FloatingPointError(message + " (nonfinite='raise')")
        self.skipped_steps += 1
        warnings.warn(message + "; the step was skipped (nonfinite='skip')", stacklevel=3)
        self.engine.capture.arm(self.engine.capture.armed)  # drop this step's statistics
        return loss

    def _kl_total(
        self, directions: Mapping[Tensor, Tensor], grads: Mapping[Tensor, Tensor]
    ) -> float:
        """``sum lr^2 (F^-1 g . g)`` over the parameters in ``grads``."""
        total = 0.0
        for group in self.param_groups:
            lr = float(group["lr"])
            ps = [p for p in group["params"] if p in grads]
            if ps:
                dots = torch._foreach_mul([directions[p] for p in ps], [grads[p] for p in ps])
                total += lr * lr * float(sum(float(t.sum()) for t in dots))
        return total

    def _kl_scale(self, total: float) -> float:
        if self.kl_clip is None or total <= 0.0 or not math.isfinite(total):
            return 1.0
        return min(1.0, math.sqrt(self.kl_clip / total))

    def _update(self, directions: dict[Tensor, Tensor], scale: float) -> None:
        rescale_params = {
            b.params[0] for b in self._blocks if b.kind in (BlockKind.LINEAR, BlockKind.CONV2D)
        }
        for index, group in enumerate(self.param_groups):
            ps = [p for p in group["params"] if p in directions]
            if not ps:
                continue
            lr, m = float(group["lr"]), float(group["momentum"])
            wd = float(group["weight_decay"])
            ds = [directions[p] for p in ps]
            if scale != 1.0:
                ds = list(torch._foreach_mul(ds, scale))
            if wd:
                ds = list(torch._foreach_add(ds, ps, alpha=wd))
            if m:
                prev_lr = self._prev_lr.get(index, lr)
                ds = self._momentum(ps, ds, m * (lr / prev_lr) if prev_lr else m)
                self._prev_lr[index] = lr
            torch._foreach_add_(ps, ds, alpha=-lr)
            if group["weight_rescale"]:
                targets = [p for p in ps if p in rescale_params]
                if targets:
                    norms = torch._foreach_norm(targets)
                    for p, norm in zip(targets, norms, strict=True):
                        cap = math.sqrt(2.0 * p.shape[0])
                        if float(norm) > cap:
                            p.mul_(cap / float(norm))

    def _momentum(self, ps: list[Tensor], ds: list[Tensor], factor: float) -> list[Tensor]:
        """``buf = factor * buf + d`` (``buf = d`` on first use), float32 for low precision."""
        bufs: list[Tensor] = []
        fresh: list[tuple[Tensor, Tensor]] = []
        for p, d in zip(ps, ds, strict=True):
            buf = self.state[p].get("momentum_buffer")
            if buf is None:
                fresh.append((p, d))
            else:
                bufs.append(buf)
        if bufs:
            old = [d for p, d in zip(ps, ds, strict=True) if "momentum_buffer" in self.state[p]]
            torch._foreach_mul_(bufs, factor)
            torch._foreach_add_(bufs, old)
        for p, d in fresh:
            self.state[p]["momentum_buffer"] = d.detach().to(_state_dtype(p), copy=True)
        return [self.state[p]["momentum_buffer"] for p in ps]

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["curvature"] = self.engine.state_dict()
        sd["spngd"] = {"skipped_steps": self.skipped_steps, "prev_lr": dict(self._prev_lr)}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        curvature = state_dict.pop("curvature", None)
        extra = state_dict.pop("spngd", {})
        if curvature is None:
            raise ValueError(
                "SPNGD state_dict has no 'curvature' entry (saved by another optimizer?)"
            )
        parsed = self.engine.parse_state(curvature)  # validated before anything changes
        for k, group in enumerate(state_dict.get("param_groups", [])):
            try:
                _check_group({**self.defaults, **{n: v for n, v in group.items() if n != "params"}})
            except ValueError as exc:
                raise ValueError(f"SPNGD state_dict param_groups[{k}]: {exc}") from None
        saved_state = state_dict["state"]
        saved_ids = [i for g in state_dict.get("param_groups", []) for i in g["params"]]
        ours = [p for g in self.param_groups for p in g["params"]]
        shape_of = dict(zip(saved_ids, (tuple(p.shape) for p in ours), strict=False))
        for key, entry in saved_state.items():
            buf = entry.get("momentum_buffer") if isinstance(entry, Mapping) else None
            if buf is None:
                continue
            if not isinstance(buf, Tensor) or tuple(buf.shape) != shape_of.get(key):
                raise ValueError(
                    f"SPNGD state_dict: momentum_buffer of parameter {key} has shape "
                    f"{getattr(buf, 'shape', type(buf))}, the parameter {shape_of.get(key)}"
                )
            if not bool(torch.isfinite(buf).all()):
                raise ValueError(
                    f"SPNGD state_dict: momentum_buffer of parameter {key} is not finite"
                )
        super().load_state_dict(state_dict)
        # super() casts state to each parameter's dtype; momentum stays float32 for bf16/fp16
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params, strict=True):
            buf = saved_state.get(i, {}).get("momentum_buffer")
            if buf is not None:
                self.state[p]["momentum_buffer"] = buf.to(p.device, _state_dtype(p), copy=True)
        self.engine.apply_state(parsed)
        self.skipped_steps = int(extra.get("skipped_steps", 0))
        prev = {int(k): float(v) for k, v in extra.get("prev_lr", {}).items()}
        for index, group in enumerate(self.param_groups):
            old = group.pop("_spngd_prev_lr", None)  # where bigbatch <= 0.2.0 kept it
            if old is not None and index not in prev:
                prev[index] = float(old)
        self._prev_lr = prev

    @property
    def refresh_fraction(self) -> float:
        """Fraction of (statistic, step) pairs refreshed so far."""
        return self.engine.schedule.refresh_fraction


def _distributed_config(
    distributed: DistributedConfig | bool | None, wrapped: bool
) -> DistributedConfig | None:
    """The data-parallel mode to run: the one given, or found from the process group."""
    if distributed is False:
        if wrapped:
            raise ValueError(
                "distributed=False with a DistributedDataParallel model: each rank would "
                "precondition with its own statistics; leave distributed at None"
            )
        return None
    if isinstance(distributed, DistributedConfig):
        return distributed
    if distributed is not None and distributed is not True:
        raise ValueError(
            f"distributed must be None, True, False or a DistributedConfig, got {distributed!r}"
        )
    if data_parallel_group() is None:
        one_rank = dist.is_available() and dist.is_initialized() and dist.get_world_size() == 1
        if wrapped and distributed is None and one_rank:
            return None  # DDP over a single rank: nothing to combine
        if distributed is True or wrapped:
            raise ValueError(
                "distributed training needs an initialised torch.distributed process group "
                "with more than one rank (torchrun ...; torch.distributed.init_process_group)"
            )
        return None
    return DistributedConfig("hybrid")


def _state_dtype(p: Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def _all_finite(tensors: list[Tensor]) -> bool:
    if not tensors:
        return True
    norms = torch._foreach_norm(tensors)
    return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())


def _check_group(group: dict[str, Any]) -> None:
    check_number("lr", group["lr"], low=0.0)
    check_number("momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
    check_number("damping", group["damping"], low=MIN_DAMPING)
    check_number("weight_decay", group["weight_decay"], low=0.0)
    if not isinstance(group["weight_rescale"], bool):
        raise ValueError(f"weight_rescale must be True or False, got {group['weight_rescale']!r}")
