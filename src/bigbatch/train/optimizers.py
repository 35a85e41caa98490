"""The optimizers the harness can train with, their defaults, and how each one steps.

Baselines come from their maintained implementations: SGD, Adam and AdamW from
``torch.optim``; LARS and LAMB from ``pytorch_optimizer``. bigbatch's own NLCG and SP-NGD
are built from the same :class:`~bigbatch.train.config.OptimizerConfig`. Each entry also
says, as :class:`Capabilities` of its options, what the training loop must do for it, so the
loop has no optimizer-specific branch: NLCG's step control wants the loss
(``step(loss=...)``), SP-NGD with ``fisher="mc"`` a Monte Carlo backward after each forward
(:meth:`SPNGD.mc_backward`); both average their own gradients across ranks when they carry
curvature; Schedule-Free optimizers switch to their evaluation weights (``eval()``) while
the harness evaluates; ASDL's K-FAC (a benchmark extra) runs the forward and backward pass
itself. A newcomer adds an optimizer with one :class:`OptimizerSpec`.

Not here: the training loop itself, schedules (``schedules.py``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import pytorch_optimizer
import schedulefree
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from bigbatch.curvature.linalg import InversionConfig, InversionMethod
from bigbatch.curvature.staleness import StalenessConfig
from bigbatch.optim import NLCG, SPNGD, KFACPreconditioner
from bigbatch.train.combined import muon_with_adamw
from bigbatch.train.config import ConfigError, OptimizerConfig

__all__ = [
    "OPTIMIZERS",
    "Capabilities",
    "OptimizerSpec",
    "averages_own_gradients",
    "build_optimizer",
    "capabilities",
    "optimizer_spec",
]

Builder = Callable[[nn.Module, float, float, dict[str, Any]], Optimizer]
AfterForward = Callable[[Optimizer, Tensor], None]
ForwardBackward = Callable[[Optimizer, Tensor, Callable[[Tensor], Tensor]], Tensor]


@dataclass(frozen=True)
class Capabilities:
    """What the training loop does for an optimizer in one configuration."""

    #: ``step(loss=batch_loss)`` instead of ``step()`` (NLCG's step control)
    needs_loss: bool = False
    #: called as ``after_forward(optimizer, logits)`` after each micro-batch's forward,
    #: before its backward (SP-NGD's Monte Carlo Fisher backward)
    after_forward: AfterForward | None = None
    #: in a data-parallel run it combines the ranks' gradients (and curvature statistics)
    #: itself, from each rank's mean loss over its shard; the loop must not average them
    averages_own_gradients: bool = False
    #: takes ``distributed=DistributedConfig(mode)`` (its ``distributed`` option is a mode)
    distributed_option: bool = False
    #: has ``train()`` / ``eval()`` weight switches (Schedule-Free): evaluation and the
    #: final model use ``eval()``'s weights, training ``train()``'s
    mode_switch: bool = False
    #: schedules its own learning rate (Schedule-Free: warm-up only, no decay); the
    #: harness's schedule is not applied
    own_schedule: bool = False
    #: runs the forward and backward pass itself (ASDL's K-FAC): called as
    #: ``forward_backward(optimizer, x, mean_loss)``, ``mean_loss(logits)`` the batch's mean
    #: loss, it leaves the gradients in ``.grad`` and returns the loss; the whole batch at
    #: once (no micro-batches)
    forward_backward: ForwardBackward | None = None
    #: can train in a data-parallel job (torchrun); False: refused there
    distributed: bool = True


def _plain(options: Mapping[str, Any]) -> Capabilities:
    return Capabilities()


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer the harness knows."""

    name: str
    label: str
    build: Builder
    #: Learning rates ``bigbatch compare`` tries when the config gives none: for momentum,
    #: LARS, NLCG and SP-NGD, centred on each one's best of a four-point factor-2 scan with
    #: the default configuration (Fashion-MNIST, small CNN, batch 8192, 12 epochs).
    default_lrs: tuple[float, ...]
    #: Constructor options used unless the config overrides them.
    defaults: Mapping[str, Any]
    #: What the loop must do for it, given its options (defaults merged with the config's).
    capabilities: Callable[[Mapping[str, Any]], Capabilities] = _plain


def _decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and normalisation parameters (vectors), as usual."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    plain = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if plain:
        groups.append({"params": plain, "weight_decay": 0.0})
    return groups


def _sgd(model: nn.Module, lr: float, wd: float, opts: dict[str, Any]) -> Optimizer:
    return torch.optim.SGD(_decay_groups(model, wd), lr=lr, **opts)


def _adam(model: nn.Module, lr: float, wd: float, opts: dict[str, Any]) -> Optimizer:
    return torch.optim.Adam(_decay_groups(model, wd), lr=lr, **opts)


def _adamw(model: nn.Module, lr: float, wd: float, opts: dict[str, Any]) -> Optimizer:
    return torch.optim.AdamW(_decay_groups(model, wd), lr=lr, **opts)


def _lars(model: nn.Module, lr: float, wd: float, opts: dict[str, Any]) -> Optimizer:
    optimizer: Optimizer = pytorch_optimizer.LARS(_decay_groups(model, wd), lr=lr, **opts)
    return optimizer


def _lamb(model: nn.Module, lr: float, wd: float, opts: dict[str, Any]) -> Optimizer:
    optimizer: Optimizer = pytorch_optimizer.Lamb(_decay_groups(model, wd), lr=lr, **opts)
    return optimizer


def _soap(model: nn.Module, lr: float, wd: float, opts: dict[str, Any]) -> Optimizer:
    optimizer: Optimizer = pytorch_optimizer.SOAP(_decay_groups(model, wd), lr=lr, **opts)
    return optimizer


def _shampoo(model: nn.Module, lr: float, wd: float, opts: dict[str, Any]) -> Optimizer:
    optimizer: Optimizer = pytorch_optimizer.ScalableShampoo(
        _decay_groups(model, wd), lr=lr, **opts
    )
    return optimizer


def _kron(model: nn.Module, lr: float, wd: float, opts: dict[str, Any]) -> Optimizer:
    optimizer: Optimizer = pytorch_optimizer.Kron(_decay_groups(model, wd), lr=lr, **opts)
    return optimizer


def _muon(model: nn.Module, lr: float, wd: float, opts: dict[str, Any]) -> Optimizer:
    """``torch.optim.Muon`` on the hidden weight matrices, AdamW (``adamw_lr_ratio`` x lr)
    on the rest: biases, norms, convolution kernels, embeddings and the last Linear (the
    classifier), as Muon's documentation advises."""
    opts = dict(opts)
    ratio = float(opts.pop("adamw_lr_ratio"))
    adamw = {k.removeprefix("adamw_"): opts.pop(k) for k in list(opts) if k.startswith("adamw_")}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    exclude = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    if linears:
        exclude.add(id(linears[-1].weight))
    return muon_with_adamw(_decay_groups(model, wd), lr, opts, lr * ratio, adamw, exclude)


def _schedule_free_adamw(model: nn.Module, lr: float, wd: float, opts: dict[str, Any]) -> Optimizer:
    optimizer: Optimizer = schedulefree.AdamWScheduleFree(_decay_groups(model, wd), lr=lr, **opts)
    optimizer.train()  # type: ignore[attr-defined]
    return optimizer


def _schedule_free_capabilities(options: Mapping[str, Any]) -> Capabilities:
    return Capabilities(mode_switch=True, own_schedule=True)


def _curvature_options(opts: dict[str, Any]) -> dict[str, Any]:
    """Config-file forms of the curvature options: ``inversion: eigh`` or a mapping, and
    ``staleness`` as a mapping, become the config objects the optimizers take."""
    opts = dict(opts)
    inversion = opts.get("inversion")
    if isinstance(inversion, str):
        opts["inversion"] = InversionConfig(
            method=cast(InversionMethod, inversion)
        )  # checked there
    elif isinstance(inversion, Mapping):
        opts["inversion"] = InversionConfig(**inversion)
    staleness = opts.get("staleness")
    if isinstance(staleness, Mapping):
        opts["staleness"] = StalenessConfig(**staleness)
    return opts


def _nlcg(model: nn.Module, lr: float, wd: float, opts: dict[str, Any]) -> Optimizer:
    """NLCG; ``preconditioner: kfac`` builds the K-FAC preconditioner on ``model``, with
    ``kfac_damping`` (default 1e-3) as its damping."""
    opts = dict(opts)
    damping = opts.pop("kfac_damping", None)
    kfac = {
        k: opts.pop(k) for k in ("kfac_approx", "kfac_staleness", "kfac_inversion") if k in opts
    }
    if isinstance(opts.get("preconditioner"), str) and opts["preconditioner"].lower() == "kfac":
        extra = _curvature_options(
            {k.removeprefix("kfac_") if k != "kfac_approx" else k: v for k, v in kfac.items()}
        )
        opts["preconditioner"] = KFACPreconditioner(
            model, 1e-3 if damping is None else damping, **extra
        )
    elif damping is not None:
        raise ValueError("kfac_damping is only used with preconditioner 'kfac'")
    return NLCG(_decay_groups(model, wd), lr=lr, **opts)


def _spngd(model: nn.Module, lr: float, wd: float, opts: dict[str, Any]) -> Optimizer:
    return SPNGD(model, lr=lr, params=_decay_groups(model, wd), **_curvature_options(opts))


def _is_kfac(preconditioner: Any) -> bool:
    return isinstance(preconditioner, str) and preconditioner.lower() == "kfac"


def _nlcg_capabilities(options: Mapping[str, Any]) -> Capabilities:
    # with K-FAC, statistics come from each rank's mean loss and NLCG averages the gradients
    return Capabilities(
        needs_loss=True, averages_own_gradients=_is_kfac(options.get("preconditioner"))
    )


def _mc_backward(optimizer: Optimizer, logits: Tensor) -> None:
    if not isinstance(optimizer, SPNGD):
        raise TypeError(f"the Monte Carlo backward is SP-NGD's, not {type(optimizer).__name__}'s")
    optimizer.mc_backward(logits)


def _spngd_capabilities(options: Mapping[str, Any]) -> Capabilities:
    return Capabilities(
        after_forward=_mc_backward if options.get("fisher") == "mc" else None,
        averages_own_gradients=True,
        distributed_option=True,
    )


def _asdl_kfac(model: nn.Module, lr: float, wd: float, opts: dict[str, Any]) -> Optimizer:
    from bigbatch.train.asdl_kfac import AsdlKfac  # ASDL: an optional benchmark extra

    return AsdlKfac(model, _decay_groups(model, wd), lr, **opts)


def _asdl_capabilities(options: Mapping[str, Any]) -> Capabilities:
    from bigbatch.train.asdl_kfac import forward_backward

    return Capabilities(forward_backward=forward_backward, distributed=False)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    spec.name: spec
    for spec in (
        OptimizerSpec("sgd", "SGD", _sgd, (0.05, 0.1, 0.2), {"momentum": 0.0}),
        OptimizerSpec("momentum", "SGD momentum 0.9", _sgd, (0.1, 0.2, 0.4), {"momentum": 0.9}),
        OptimizerSpec(
            "nesterov",
            "SGD Nesterov 0.9",
            _sgd,
            (0.1, 0.2, 0.4),
            {"momentum": 0.9, "nesterov": True},
        ),
        OptimizerSpec("adam", "Adam", _adam, (1e-3, 3e-3, 1e-2), {}),
        OptimizerSpec("adamw", "AdamW", _adamw, (1e-3, 3e-3, 1e-2), {}),
        OptimizerSpec(
            "lars", "LARS (pytorch_optimizer)", _lars, (4.0, 8.0, 16.0), {"momentum": 0.9}
        ),
        OptimizerSpec("lamb", "LAMB (pytorch_optimizer)", _lamb, (3e-3, 1e-2, 3e-2), {}),
        OptimizerSpec("soap", "SOAP (pytorch_optimizer)", _soap, (1e-3, 3e-3, 1e-2), {}),
        OptimizerSpec(
            "shampoo",
            "Shampoo (pytorch_optimizer ScalableShampoo)",
            _shampoo,
            (1e-3, 3e-3, 1e-2),
            # the first steps graft SGD; preconditioners recomputed every 20 steps
            {"start_preconditioning_step": 10, "preconditioning_compute_steps": 20},
        ),
        OptimizerSpec("kron", "PSGD Kron (pytorch_optimizer)", _kron, (3e-4, 1e-3, 3e-3), {}),
        OptimizerSpec(
            "muon",
            "Muon (torch.optim) + AdamW",
            _muon,
            (0.01, 0.02, 0.04),
            {"adamw_lr_ratio": 0.015},
        ),
        OptimizerSpec(
            "sfadamw",
            "Schedule-Free AdamW (schedulefree)",
            _schedule_free_adamw,
            (1e-3, 3e-3, 1e-2),
            {"warmup_steps": 0},
            capabilities=_schedule_free_capabilities,
        ),
        OptimizerSpec(
            "nlcg",
            "NLCG (FR, BFGS)",
            _nlcg,
            (0.1, 0.2, 0.4),
            {"preconditioner": "bfgs"},
            capabilities=_nlcg_capabilities,
        ),
        OptimizerSpec(
            "spngd",
            "SP-NGD (K-FAC, stale)",
            _spngd,
            (0.005, 0.01, 0.02),
            # weight rescaling as in the SP-NGD reference: with weight decay alone (lr * wd is
            # tiny at natural-gradient learning rates) the weights of BatchNorm networks grow
            # and the effective step shrinks; Fashion-MNIST CNN, batch 4096, 8 epochs:
            # 84.8% -> 88.1% test (85.8% -> 88.7% validation)
            {"momentum": 0.9, "damping": 1e-3, "weight_rescale": True},
            capabilities=_spngd_capabilities,
        ),
        OptimizerSpec(
            "asdl-kfac",
            "K-FAC (ASDL, benchmark extra asdfghjkl)",
            _asdl_kfac,
            (0.005, 0.01, 0.02),
            # SP-NGD's momentum and damping; ASDL's own interval default (every step)
            {"momentum": 0.9, "damping": 1e-3, "interval": 1},
            capabilities=_asdl_capabilities,
        ),
    )
}


def optimizer_spec(name: str, key: str = "optimizer.name") -> OptimizerSpec:
    """The registry entry for ``name``; an error naming ``key`` and the known names."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        known = ", ".join(OPTIMIZERS)
        close = difflib.get_close_matches(str(name), list(OPTIMIZERS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}: unknown optimizer {name!r}{hint} (known: {known})") from None


def capabilities(cfg: OptimizerConfig) -> Capabilities:
    """What the loop must do for ``cfg``'s optimizer with its options."""
    spec = optimizer_spec(cfg.name)
    return spec.capabilities({**spec.defaults, **cfg.options})


def averages_own_gradients(cfg: OptimizerConfig) -> bool:
    """Whether the optimizer combines the ranks' gradients and curvature statistics itself
    in a data-parallel run (SP-NGD; NLCG with the K-FAC preconditioner, whose statistics
    must come from each rank's mean loss over its own shard)."""
    return capabilities(cfg).averages_own_gradients


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> Optimizer:
    """Build ``cfg.name`` for ``model`` with its defaults updated by ``cfg.options``."""
    spec = optimizer_spec(cfg.name)
    options = {**spec.defaults, **cfg.options}
    try:
        return spec.build(model, cfg.lr, cfg.weight_decay, options)
    except TypeError as exc:  # an option the constructor does not take
        raise ConfigError(f"optimizer.options for {cfg.name!r}: {exc}") from None
    except ValueError as exc:  # the constructor's own range checks
        raise ConfigError(f"optimizer.options for {cfg.name!r}: {exc}") from None
