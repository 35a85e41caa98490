"""B1's contenders (``step_overhead.py``): their names, settings and plans, and building them.

A contender is one copy of the model with its optimizer (and, for ASDL's K-FAC, the
gradient maker that runs forward and backward); its plan is its untimed warm-up and timed
rounds. ``benchmarks/gpu/step_cost.py`` builds its contenders here too.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import bigbatch
from models import ModelSpec

try:  # the peer K-FAC (PyPI "asdfghjkl"); optional
    import asdl
except ImportError as exc:  # pragma: no cover - depends on the environment
    asdl = None
    ASDL_IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    ASDL_IMPORT_ERROR = None

FUSED_NLCG = ("nlcg-bfgs-fused", "nlcg-adam-fused")  # NLCG(fused=True)
BASE_CONTENDERS = ("sgd", "adam", "nlcg-none", "nlcg-bfgs", "nlcg-adam", *FUSED_NLCG)
KFAC_CONTENDERS = ("spngd-stale", "spngd-every", "nlcg-kfac", "asdl-kfac-every", "asdl-kfac-10")
CONTENDERS = BASE_CONTENDERS + KFAC_CONTENDERS
CHEAP_NLCG = ("nlcg-none", "nlcg-bfgs", "nlcg-adam", *FUSED_NLCG)  # judged by the NLCG targets
AMORTIZED = ("spngd-stale", "nlcg-kfac", "asdl-kfac-10")  # extra work on some steps only
EVERY_STEP_KFAC = ("spngd-every", "asdl-kfac-every")
ASDL_INTERVAL = 10  # asdl-kfac-10: curvature and inverse every 10 steps
NLCG_LR = 0.01
KFAC_LR = 0.01
KFAC_MOMENTUM = 0.9
KFAC_DAMPING = 1e-3


@dataclass(frozen=True)
class Plan:
    """A contender's untimed warm-up and timed rounds."""

    warmup: int
    rounds: int


@dataclass
class Contender:
    """One model copy with its optimizer, and the timings collected for it."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    plan: Plan
    grad_maker: Any = None  # ASDL's KfacGradientMaker, which runs forward and backward
    first_round: int = 0  # set by the schedule: first round it takes part in
    timed_from: int = 0  # first timed round
    full_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    timed_rounds: list[int] = field(default_factory=list)
    refreshed: list[int] = field(default_factory=list)  # statistics refreshed, per timed step
    last_loss: float = float("nan")

    @property
    def is_nlcg(self) -> bool:
        return isinstance(self.optimizer, bigbatch.NLCG)

    @property
    def engine(self) -> Any:
        """The bigbatch K-FAC engine (SP-NGD or NLCG's K-FAC preconditioner), if any."""
        if isinstance(self.optimizer, bigbatch.SPNGD):
            return self.optimizer.engine
        if isinstance(self.optimizer, bigbatch.NLCG) and isinstance(
            self.optimizer.preconditioner, bigbatch.KFACPreconditioner
        ):
            return self.optimizer.preconditioner.engine
        return None

    @property
    def n_statistics(self) -> int:
        """Curvature statistics (Kronecker factors, unit-wise blocks); 0 without any."""
        if self.engine is not None:
            return len(self.engine.schedule.intervals)
        if self.grad_maker is not None:
            gm = self.grad_maker
            return 2 * len(gm.modules_for(asdl.SHAPE_KRON)) + len(
                gm.modules_for(asdl.SHAPE_UNIT_WISE)
            )
        return 0

    def refresh_due(self) -> int:
        """Statistics the next step will refresh (read before the step, outside timing)."""
        if self.engine is not None:
            return -1  # counted from the schedule's counter after the step instead
        if self.grad_maker is not None:
            gm = self.grad_maker
            return self.n_statistics if gm.do_update_curvature(gm.state["step"]) else 0
        return 0

    def optimizer_step(self, loss: Tensor) -> None:
        if isinstance(self.optimizer, bigbatch.NLCG):
            self.optimizer.step(loss=loss)
        else:
            self.optimizer.step()


def describe_optimizer(c: Contender) -> str:
    """Class name and the settings that matter here, e.g. ``NLCG(DiagonalBFGS(eps=1e-08))``."""
    optimizer = c.optimizer
    name = type(optimizer).__name__
    if isinstance(optimizer, bigbatch.NLCG):
        fused = ", fused=True" if optimizer.fused else ""
        return f"{name}(beta_rule={optimizer.beta_rule!r}, {optimizer.preconditioner!r}{fused})"
    group = optimizer.param_groups[0]
    keys = [k for k in ("lr", "momentum", "damping", "betas", "foreach") if k in group]
    text = f"{name}(" + ", ".join(f"{k}={group[k]!r}" for k in keys)
    if isinstance(optimizer, bigbatch.SPNGD):
        cfg = optimizer.engine.schedule.config
        text += (
            f", staleness={cfg.enabled}"
            + (f" (max_interval={cfg.max_interval})" if cfg.enabled else "")
            + f", inversion={optimizer.engine.inverter.config.method!r}"
        )
    text += ")"
    if c.grad_maker is not None:
        cfg = c.grad_maker.config
        text = (
            f"asdl.KfacGradientMaker(fisher_type={c.grad_maker.fisher_type!r}, "
            f"damping={cfg.damping}, interval={cfg.preconditioner_upd_interval}) + {text}"
        )
    return text


def make_contender(name: str, model: nn.Module, plan: Plan, batch_size: int) -> Contender:
    params = list(model.parameters())
    grad_maker = None
    optimizer: torch.optim.Optimizer
    if name == "sgd":
        optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, foreach=True)
    elif name == "adam":
        optimizer = torch.optim.Adam(params, lr=1e-3, foreach=True)
    elif name == "nlcg-kfac":
        pre = bigbatch.KFACPreconditioner(model, damping=KFAC_DAMPING)
        optimizer = bigbatch.NLCG(params, lr=NLCG_LR, preconditioner=pre)
    elif name in CHEAP_NLCG:
        optimizer = bigbatch.NLCG(
            params,
            lr=NLCG_LR,
            preconditioner=name.removeprefix("nlcg-").removesuffix("-fused"),
            fused=name in FUSED_NLCG,
        )
    elif name in ("spngd-stale", "spngd-every"):
        optimizer = bigbatch.SPNGD(
            model,
            lr=KFAC_LR,
            momentum=KFAC_MOMENTUM,
            damping=KFAC_DAMPING,
            staleness=name == "spngd-stale",
        )
    elif name in ("asdl-kfac-every", "asdl-kfac-10"):
        if asdl is None:
            raise RuntimeError(f"{name} needs the asdl package ({ASDL_IMPORT_ERROR})")
        interval = 1 if name == "asdl-kfac-every" else ASDL_INTERVAL
        config = asdl.PreconditioningConfig(
            data_size=batch_size,
            damping=KFAC_DAMPING,
            preconditioner_upd_interval=interval,
            curvature_upd_interval=interval,
        )
        grad_maker = asdl.KfacGradientMaker(model, config, fisher_type=asdl.FISHER_EMP)
        optimizer = torch.optim.SGD(params, lr=KFAC_LR, momentum=KFAC_MOMENTUM, foreach=True)
    else:
        raise ValueError(f"unknown contender {name!r}")
    return Contender(name, model, optimizer, plan, grad_maker=grad_maker)


def plan_contenders(
    names: Sequence[str], fast_rounds: int, args: argparse.Namespace
) -> dict[str, Plan]:
    """Warm-up and timed rounds per contender; SGD is timed over the longest window."""
    plans: dict[str, Plan] = {}
    for name in names:
        if name == "spngd-stale":
            plans[name] = Plan(args.stale_warmup, args.amortized_rounds)
        elif name == "nlcg-kfac":  # half the window, to bound the run time
            plans[name] = Plan(args.stale_warmup, max(1, args.amortized_rounds // 2))
        elif name == "asdl-kfac-10":
            rounds = ASDL_INTERVAL * math.ceil(args.amortized_rounds / ASDL_INTERVAL)
            plans[name] = Plan(args.warmup, rounds)
        elif name in EVERY_STEP_KFAC:
            plans[name] = Plan(args.warmup, args.kfac_rounds)
        else:
            plans[name] = Plan(args.warmup, fast_rounds)
    plans["sgd"] = Plan(args.warmup, max(p.rounds for p in plans.values()))
    return plans


def build_contenders(
    spec: ModelSpec, names: Sequence[str], plans: dict[str, Plan], batch_size: int, seed: int
) -> list[Contender]:
    contenders = []
    for name in names:
        torch.manual_seed(seed)  # the same initial weights for every contender
        model = spec.build()
        model.train()
        contenders.append(make_contender(name, model, plans[name], batch_size))
    total = max(c.plan.warmup + c.plan.rounds for c in contenders)
    for c in contenders:  # every window ends at the last round
        c.timed_from = total - c.plan.rounds
        c.first_round = c.timed_from - c.plan.warmup
    return contenders


def select_contenders(
    requested: Sequence[str], model: str, kfac_models: Sequence[str]
) -> list[str]:
    """The contenders to run on ``model``, in the canonical order, SGD always first."""
    names = [n for n in CONTENDERS if n in requested or n == "sgd"]
    if model not in kfac_models:
        names = [n for n in names if n not in KFAC_CONTENDERS]
    if asdl is None:
        names = [n for n in names if not n.startswith("asdl-")]
    return names


def asdl_version() -> str | None:
    """The installed ASDL's version (PyPI ``asdfghjkl``); None where it cannot be imported."""
    if asdl is None:
        return None
    try:
        from importlib.metadata import version

        return version("asdfghjkl")
    except Exception:  # pragma: no cover - metadata missing
        return getattr(asdl, "__version__", "unknown")
