"""Typed configuration of the harness: sections, defaults, validation, files and overrides.

One :class:`Config` describes everything a run, a comparison or a sweep needs. It is loaded
from a TOML or YAML file (:func:`load_config`), changed with ``section.key=value`` overrides
from the command line (:func:`apply_overrides`), and validated by pydantic: an unknown key
or a value out of range raises :class:`ConfigError`, whose message names the key (for
example ``train.batch_size: Input should be greater than 0``).

Not here: what the values mean for training (``loop.py``), how optimizers are built from
them (``optimizers.py``).
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "CompareConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "RecipeConfig",
    "ScheduleConfig",
    "SweepConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_mapping",
    "load_config",
]


class ConfigError(ValueError):
    """A configuration file, key or value is invalid; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        """``true`` is no batch size: a bool for a numeric key is an error, not 1."""
        field = cls.model_fields.get(info.field_name or "")
        numeric = {int, float, int | None, float | None}
        if isinstance(value, bool) and field is not None and field.annotation in numeric:
            raise ValueError(f"must be a number, got the boolean {value!r}")
        return value


class DataConfig(_Section):
    """Which dataset, where it is, and how much of the training set is held out."""

    #: The dataset (fashion-mnist, mnist, cifar10, cifar100, image-folder, digits, text).
    name: str = "fashion-mnist"
    #: Searched first for the files; for image-folder the folder or archive, for text the
    #: file. Also $BIGBATCH_DATA_DIR, /usr/share/datasets/<name>, ~/.cache/bigbatch/<name>.
    data_dir: str | None = None
    #: Fetch the official files (checksum-verified) when no copy is found.
    download: bool = False
    #: Where decoded arrays are cached (default ~/.cache/bigbatch/decoded).
    cache_dir: str | None = None
    #: Images held out of the training set (a fixed seeded choice) to pick learning rates
    #: on; None = min(5000, a tenth of the training set); 0 = none, and learning rates are
    #: then picked on the test set (reports say so). Text has a fixed validation part.
    validation_size: int | None = Field(default=None, ge=0)
    #: Text (``name = "text"``, ``data_dir`` the file): characters per training window.
    context: int = Field(default=128, gt=0)


class ModelConfig(_Section):
    """The network; ``depth``/``heads``/``attention``/``dropout`` are the language model's."""

    #: mlp, cnn, resnet20/32/56 (images) or gpt (text).
    name: str = "cnn"
    #: Hidden units (mlp), first-stage channels (cnn, resnets) or model width (gpt);
    #: None takes the model's default.
    width: int | None = Field(default=None, gt=0)
    #: gpt: transformer blocks.
    depth: int = Field(default=2, gt=0)
    #: gpt: attention heads (width must be a multiple).
    heads: int = Field(default=4, gt=0)
    #: "mha": nn.TransformerEncoderLayer blocks; "linear": nn.Linear projections + SDPA
    attention: Literal["mha", "linear"] = "mha"
    #: gpt: dropout probability in the blocks.
    dropout: float = Field(default=0.0, ge=0, lt=1)


class OptimizerConfig(_Section):
    """One optimizer. ``options`` go to its constructor unchanged (and are checked there)."""

    #: sgd, momentum, nesterov, adam, adamw, lars, lamb, soap, shampoo, kron, muon, sfadamw,
    #: nlcg, spngd or asdl-kfac (ASDL's K-FAC, a benchmark extra).
    name: str = "momentum"
    #: Peak learning rate (the schedule scales it every step).
    lr: float = Field(default=0.1, gt=0)
    #: Weight decay on weights (matrices, kernels); biases and norm parameters get none.
    weight_decay: float = Field(default=5e-4, ge=0)
    #: Constructor options, e.g. damping for spngd, preconditioner for nlcg (kfac, bfgs).
    options: dict[str, Any] = Field(default_factory=dict)


class ScheduleConfig(_Section):
    """Learning-rate schedule, evaluated every step: linear warm-up, then a decay."""

    #: The decay after the warm-up.
    kind: Literal["constant", "polynomial", "step", "cosine"] = "cosine"
    #: Linear warm-up from 0, in epochs.
    warmup_epochs: float = Field(default=1.0, ge=0)
    #: polynomial: the exponent of the decay.
    power: float = Field(default=2.0, gt=0)
    #: step: fractions of the run where the lr is multiplied by gamma.
    milestones: tuple[float, ...] = (0.5, 0.75)
    #: step: the factor at each milestone.
    gamma: float = Field(default=0.1, gt=0)
    #: polynomial/cosine: the lr factor at the end of the run.
    final_factor: float = Field(default=0.0, ge=0, le=1)


class RecipeConfig(_Section):
    """Large-batch regularisation: targets, mixing, augmentation, weight averaging."""

    #: Label smoothing of the targets (images).
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    #: Mixup's Beta(alpha, alpha) parameter; 0 switches mixup off (images).
    mixup_alpha: float = Field(default=0.0, ge=0)
    #: Running mixup (SP-NGD's recipe): mix with the previous step's batch.
    running_mixup: bool = False
    #: Random crop with this zero padding (images); 0 switches it off.
    crop_padding: int = Field(default=0, ge=0)
    #: Random horizontal flips (images).
    flip: bool = False
    #: Random erasing probability (images).
    random_erasing: float = Field(default=0.0, ge=0, le=1)
    #: Exponential moving average of the weights used for evaluation; 0 switches it off.
    ema_decay: float = Field(default=0.0, ge=0, lt=1)


class TrainConfig(_Section):
    """The budget and the bookkeeping of one run."""

    #: Seed of the initial weights and of every random choice of a step.
    seed: int = Field(default=0, ge=0)
    #: The budget, in passes over the training set (text: over its characters).
    epochs: float = Field(default=12.0, gt=0)
    #: The global batch (all micro-batches, all processes) of one step.
    batch_size: int = Field(default=8192, gt=0)
    #: Samples per forward/backward; the batch is accumulated over batch/micro_batch_size
    #: micro-batches. 0 = the whole batch at once; -1 = chosen automatically from memory.
    micro_batch_size: int = Field(default=0, ge=-1)
    #: Evaluate every this many steps; 0 = once per epoch (and always at the end).
    eval_every: int = Field(default=0, ge=0)
    #: Checkpoint every this many steps; 0 = only at the end (and on Ctrl-C).
    checkpoint_every: int = Field(default=0, ge=0)
    #: Test accuracy whose first crossing is reported as "steps to target".
    target_accuracy: float = Field(default=0.85, gt=0, le=1)
    #: Torch intra-op threads; None keeps torch's choice.
    threads: int | None = Field(default=None, gt=0)
    #: auto: CUDA when available, else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Progress bars: auto shows them on a terminal only.
    progress: Literal["auto", "always", "never"] = "auto"
    #: Also write TensorBoard event files (needs the tensorboard extra).
    tensorboard: bool = False
    #: Stop a run as "diverged" when its training loss is NaN/Inf or exceeds this multiple
    #: of its lowest loss so far (that minimum floored at a tenth of the first loss).
    divergence_factor: float = Field(default=10.0, gt=1)

    @model_validator(mode="after")
    def _micro_divides_batch(self) -> TrainConfig:
        m = self.micro_batch_size
        if m > 0 and self.batch_size % m != 0:
            raise ValueError(
                f"train.micro_batch_size ({m}) must divide train.batch_size "
                f"({self.batch_size}); use 0 for the whole batch or -1 for automatic"
            )
        return self


class CompareConfig(_Section):
    """``bigbatch compare``: optimizers, each with its own learning-rate grid and options."""

    #: The optimizers compared (registry names).
    optimizers: tuple[str, ...] = ("momentum", "lars", "nlcg", "spngd")
    #: Learning-rate grid per optimizer; an optimizer without an entry uses its default grid.
    lrs: dict[str, tuple[float, ...]] = Field(default_factory=dict)
    #: Constructor options per optimizer, on top of the registry's defaults.
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    #: How the best learning rate of each optimizer is chosen.
    select_by: Literal["validation", "test"] = "validation"
    #: Trials per optimizer and batch size at most: while the best learning rate sits at
    #: an edge of what was tried, one more rate ``search_factor`` beyond it is tried, up to
    #: this many (0: the grid only). The table says when the bound was hit at an edge.
    max_trials: int = Field(default=0, ge=0, le=64)
    #: Step between learning rates tried beyond an edge (a factor > 1).
    search_factor: float = Field(default=2.0, gt=1.0, le=100.0)
    #: More seeds run at each chosen learning rate (besides train.seed), for mean and spread.
    seeds: tuple[int, ...] = ()

    @model_validator(mode="after")
    def _grids_positive(self) -> CompareConfig:
        if not self.optimizers:
            raise ValueError("compare.optimizers must name at least one optimizer")
        for name, grid in self.lrs.items():
            if not grid or any(lr <= 0 for lr in grid):
                raise ValueError(f"compare.lrs.{name} must be a non-empty list of lrs > 0")
        return self


class SweepConfig(_Section):
    """``bigbatch sweep``: steps to target against batch size (benchmark B5)."""

    #: The global batch sizes swept.
    batch_sizes: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)
    #: How each optimizer's learning-rate grid moves with the batch (relative to
    #: train.batch_size): "linear" (x B/B0), "sqrt" (x sqrt(B/B0)) or "none".
    lr_scaling: Literal["linear", "sqrt", "none"] = "sqrt"

    @model_validator(mode="after")
    def _sizes_positive(self) -> SweepConfig:
        if not self.batch_sizes or any(b <= 0 for b in self.batch_sizes):
            raise ValueError("sweep.batch_sizes must be a non-empty list of sizes > 0")
        return self


class Config(_Section):
    """Everything ``bigbatch train``, ``compare`` and ``sweep`` read."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    recipe: RecipeConfig = Field(default_factory=RecipeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible copy (what checkpoints and reports store)."""
        out: dict[str, Any] = json.loads(self.model_dump_json())
        return out


def config_from_mapping(data: Mapping[str, Any], *, origin: str = "configuration") -> Config:
    """Validate a nested mapping; errors name every offending key."""
    try:
        return Config.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from None


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file, then apply overrides."""
    data: dict[str, Any] = {}
    origin = "settings (command line)" if overrides else "defaults"
    if path is not None:
        file = Path(path)
        origin = f"configuration ({file} and the command line)" if overrides else str(file)
        if not file.is_file():
            raise ConfigError(f"config file {file} does not exist")
        data = _read_file(file)
    return config_from_mapping(apply_overrides(data, overrides), origin=origin)


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with ``section.key=value`` overrides set.

    Values are parsed as YAML scalars/lists (``0.1``, ``true``, ``[0.1, 0.2]``, ``null``);
    anything else stays a string. Keys are checked later, by validation.
    """
    out: dict[str, Any] = json.loads(json.dumps(dict(data)))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like section.key=value")
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        try:
            node[parts[-1]] = _yaml_value(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse value: {exc}") from None
    return out


#: What YAML 1.1 (PyYAML) leaves a string although every user means a number: ``1e-3``.
_EXPONENT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _exponents_as_floats(value: Any) -> Any:
    """``"1e-3"`` -> ``0.001``, in nested lists and mappings too."""
    if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [_exponents_as_floats(v) for v in value]
    if isinstance(value, dict):
        return {k: _exponents_as_floats(v) for k, v in value.items()}
    return value


def _yaml_value(raw: str) -> Any:
    return _exponents_as_floats(yaml.safe_load(raw))


def _read_file(file: Path) -> dict[str, Any]:
    suffix = file.suffix.lower()
    try:
        if suffix == ".toml":
            with file.open("rb") as fh:
                loaded: Any = tomllib.load(fh)
        elif suffix in (".yaml", ".yml"):
            loaded = _exponents_as_floats(yaml.safe_load(file.read_text()) or {})
        else:
            raise ConfigError(f"config file {file} must end in .toml, .yaml or .yml")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {file} is not valid {suffix[1:].upper()}: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {file} must hold a table of sections")
    return loaded


def _known_keys(loc: Sequence[Any]) -> list[str]:
    """The keys valid where ``loc`` points (for "did you mean")."""
    model: Any = Config
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(str(part))
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def _describe(exc: ValidationError, origin: str) -> str:
    lines = [f"invalid {origin}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key"
            close = difflib.get_close_matches(str(err["loc"][-1]), _known_keys(err["loc"]), n=1)
            if close:
                prefix = ".".join(str(p) for p in err["loc"][:-1])
                message += f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)
