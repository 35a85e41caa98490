"""A seeded, bounded fuzz over every keyword of the optimizers and the curvature configs:
each keyword gets a fixed set of awkward values (wrong types, truthy strings, NaN, infinity,
values beyond float32 or 64-bit ranges, negative and zero sizes) plus seeded random ones.
Only ``ValueError``/``TypeError`` may escape a constructor; a bool keyword refuses anything
but a bool; whatever a constructor accepts must then take a step without any error and
without a non-finite weight."""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bigbatch import NLCG, SPNGD, InversionConfig, KFACPreconditioner, StalenessConfig

AWKWARD: list[Any] = [
    None, "", "abc", "True", "False", "0.1", True, False, 0, -1, 1, 2, 0.0, -0.5, 0.5, 1.5,
    float("nan"), float("inf"), -float("inf"), 3.5e38, 1e39, 1e300, 10**30, 10**400, [], {},
    (0.0,), (1.0, 0.0), object(),
]  # fmt: skip

#: keyword -> "bool" | "number" | "other", and its constructor
SPNGD_KEYWORDS = {
    "lr": "number", "momentum": "number", "damping": "number", "weight_decay": "number",
    "weight_rescale": "bool", "kl_clip": "number", "fisher": "other", "staleness": "other",
    "inversion": "other", "nonfinite": "other", "distributed": "other", "kfac_approx": "other",
    "consistency_every": "number", "precondition": "bool", "grad_scaler": "other",
}  # fmt: skip
NLCG_KEYWORDS = {
    "lr": "number", "beta_rule": "other", "beta_clip": "other", "preconditioner": "other",
    "step_control": "other", "step_control_period": "number",
    "step_control_threshold": "number", "weight_decay": "number",
    "decoupled_weight_decay": "bool", "lars": "bool", "lars_trust": "number",
    "restart_every": "number", "restart_on_ascent": "bool", "line_search": "other",
    "max_iter": "number", "tolerance_grad": "number", "tolerance_change": "number",
    "nonfinite": "other", "eps": "number", "distributed": "other",
    "consistency_every": "number",
}  # fmt: skip
KFAC_KEYWORDS = {
    "damping": "number", "fisher": "other", "staleness": "other", "inversion": "other",
    "kfac_approx": "other", "distributed": "other",
}  # fmt: skip
STALENESS_KEYWORDS = {
    "enabled": "bool", "threshold": "number", "min_interval": "number",
    "max_interval": "number", "initial_interval": "number", "smoothing": "number",
}  # fmt: skip
INVERSION_KEYWORDS = {"method": "other", "max_failures": "number", "float64_retry": "bool"}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2))


def _values(seed: int) -> list[Any]:
    rng = random.Random(seed)
    extra = [rng.choice([-1, 1]) * 10 ** rng.uniform(-40, 40) for _ in range(4)]
    extra += [rng.randint(-(2**40), 2**40) for _ in range(2)]
    return AWKWARD + extra


def _step(model: nn.Module, opt: Any) -> None:
    x, y = torch.randn(6, 3, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1] * 3)
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if isinstance(opt, NLCG):
        if opt.line_search is not None:
            opt.step(lambda: F.cross_entropy(model(x), y))
        else:
            opt.step(loss=loss)
    else:
        opt.step()


Build = Callable[[nn.Module, str, Any], Any]
CASES: list[tuple[str, dict[str, str], Build]] = [
    ("SPNGD", SPNGD_KEYWORDS, lambda m, k, v: SPNGD(m, **{k: v})),
    ("NLCG", NLCG_KEYWORDS, lambda m, k, v: NLCG(m.parameters(), **{k: v})),
    (
        "NLCG+KFAC",
        KFAC_KEYWORDS,
        lambda m, k, v: NLCG(m.parameters(), preconditioner=KFACPreconditioner(m, **{k: v})),
    ),
    (
        "StalenessConfig",
        STALENESS_KEYWORDS,
        lambda m, k, v: SPNGD(m, staleness=StalenessConfig(**{k: v})),
    ),
    (
        "InversionConfig",
        INVERSION_KEYWORDS,
        lambda m, k, v: SPNGD(m, inversion=InversionConfig(**{k: v})),
    ),
]


@pytest.mark.parametrize(("name", "keywords", "build"), CASES, ids=[c[0] for c in CASES])
def test_only_value_and_type_errors_escape_and_accepted_values_work(
    name: str, keywords: dict[str, str], build: Build
) -> None:
    unclear: list[str] = []
    accepted = refused = 0
    for seed, (keyword, kind) in enumerate(keywords.items()):
        for value in _values(seed):
            model = _model()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    opt = build(model, keyword, value)
            except (ValueError, TypeError) as exc:
                refused += 1
                if not str(exc):
                    unclear.append(f"{keyword}={value!r}: {type(exc).__name__} with no message")
                continue
            except Exception as exc:
                unclear.append(f"{keyword}={value!r}: {type(exc).__name__}: {exc}")
                continue
            accepted += 1
            if kind == "bool" and not isinstance(value, bool):
                unclear.append(f"{keyword}={value!r} accepted by a bool keyword")
                continue
            if kind == "number" and (
                isinstance(value, bool | str)
                or (isinstance(value, float) and not math.isfinite(value))
                or (isinstance(value, int | float) and abs(value) > 3.4028234663852886e38)
            ):
                unclear.append(f"{keyword}={value!r} accepted by a numeric keyword")
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _step(model, opt)
            except Exception as exc:
                unclear.append(f"{keyword}={value!r}: accepted, then {type(exc).__name__}: {exc}")
                continue
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                unclear.append(f"{keyword}={value!r}: accepted, then non-finite weights")
    assert not unclear, f"{name}: {len(unclear)} unclear outcomes:\n" + "\n".join(unclear[:20])
    assert accepted  # the fuzz reached both sides
    assert refused


CONFIG_VALUES = [
    "true", "false", "null", "abc", "1e400", "-1", "0", "inf", ".nan", "[1, 2]", "{a: 1}",
    "3.5e38", "1e-300", "10000000000000000000000000", "''", "[]",
]  # fmt: skip


def _config_keys() -> list[str]:
    from bigbatch.train.config import Config

    keys = []
    for section, field in Config.model_fields.items():
        for key in field.annotation.model_fields:  # type: ignore[union-attr]
            keys.append(f"{section}.{key}")
    return keys


def test_config_overrides_fail_only_with_a_config_error() -> None:
    """Every config key gets every awkward value through ``--set``'s parser: the result is a
    valid configuration or a ConfigError naming the key; numeric keys never take booleans."""
    from bigbatch.train.config import ConfigError, load_config

    unclear = []
    for key in _config_keys():
        for raw in CONFIG_VALUES:
            try:
                cfg = load_config(None, [f"{key}={raw}"])
            except ConfigError as exc:
                section_name, name_part = key.split(".")
                if name_part not in str(exc) and section_name not in str(exc):
                    unclear.append(f"{key}={raw}: the error does not name the key: {exc}")
                continue
            except Exception as exc:
                unclear.append(f"{key}={raw}: {type(exc).__name__}: {exc}")
                continue
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            default = getattr(getattr(load_config(None, []), section), name)
            numeric = isinstance(default, int | float) and not isinstance(default, bool)
            if numeric and (raw in ("true", "false") or isinstance(value, bool)):
                unclear.append(f"{key}={raw}: a boolean became {value!r} (default {default!r})")
    assert not unclear, "\n".join(unclear[:20])
