"""The harness configuration: files, overrides, and bad values rejected by key name."""

from __future__ import annotations

from pathlib import Path

import pytest

from bigbatch.train.config import ConfigError, apply_overrides, load_config


def test_defaults_are_the_main_job() -> None:
    cfg = load_config(None)
    assert cfg.data.name == "fashion-mnist"
    assert cfg.model.name == "cnn"
    assert cfg.train.batch_size >= 8192
    assert set(cfg.compare.optimizers) == {"momentum", "lars", "nlcg", "spngd"}


def test_toml_and_yaml_files_and_overrides(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nepochs = 3\nbatch_size = 512\n[optimizer]\nname = "nlcg"\n')
    yml = tmp_path / "run.yaml"
    yml.write_text("train:\n  epochs: 3\n  batch_size: 512\noptimizer:\n  name: nlcg\n")
    for path in (toml, yml):
        cfg = load_config(path, ["train.batch_size=256", "compare.lrs.nlcg=[0.1, 0.2]"])
        assert cfg.train.epochs == 3.0
        assert cfg.train.batch_size == 256
        assert cfg.optimizer.name == "nlcg"
        assert cfg.compare.lrs == {"nlcg": (0.1, 0.2)}


def test_override_values_are_parsed_as_yaml_scalars() -> None:
    out = apply_overrides({}, ["a.b=0.5", "a.c=true", "a.d=[1, 2]", "a.e=null", "a.f=text"])
    assert out == {"a": {"b": 0.5, "c": True, "d": [1, 2], "e": None, "f": "text"}}


def test_exponent_notation_is_a_number_in_overrides_and_yaml(tmp_path: Path) -> None:
    """PyYAML (YAML 1.1) reads ``1e-2`` as a string; the harness reads it as 0.01."""
    out = apply_overrides({}, ["a.b=1e-2", "a.c=[2.5E-4, 1e3]", "a.d=-3e+1", "a.e=e5"])
    assert out == {"a": {"b": 0.01, "c": [2.5e-4, 1000.0], "d": -30.0, "e": "e5"}}
    yml = tmp_path / "run.yaml"
    yml.write_text("optimizer:\n  name: spngd\n  options:\n    damping: 1e-2\n")
    cfg = load_config(yml, ["optimizer.lr=5e-3"])
    assert cfg.optimizer.options["damping"] == 0.01
    assert cfg.optimizer.lr == 0.005


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.batch_size=-8", "train.batch_size"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.epochs=0", "train.epochs"),
        ("optimizer.lr=-1", "optimizer.lr"),
        ("recipe.label_smoothing=1.5", "recipe.label_smoothing"),
        ("train.bogus=1", "train.bogus"),
        ("nosuchsection.x=1", "nosuchsection"),
        ("schedule.kind=linear", "schedule.kind"),
        ("compare.lrs.sgd=[]", "compare.lrs.sgd"),
        ("train.progress=sometimes", "train.progress"),
    ],
)
def test_bad_values_name_the_key(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_says_unknown() -> None:
    with pytest.raises(ConfigError, match=r"train\.bogus: unknown key"):
        load_config(None, ["train.bogus=1"])


def test_micro_batch_must_divide_batch() -> None:
    with pytest.raises(ConfigError, match=r"micro_batch_size \(3000\) must divide"):
        load_config(None, ["train.batch_size=8192", "train.micro_batch_size=3000"])
    assert load_config(None, ["train.micro_batch_size=2048"]).train.micro_batch_size == 2048


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nepochs = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    other = tmp_path / "run.ini"
    other.write_text("x")
    with pytest.raises(ConfigError, match=r"\.toml, \.yaml or \.yml"):
        load_config(other)
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        load_config(None, ["novalue"])


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parent.parent / "configs").glob("*.*")), ids=lambda p: p.name
)
def test_shipped_configs_are_valid(path: Path) -> None:
    from bigbatch.train.optimizers import optimizer_spec

    cfg = load_config(path)
    for name in (cfg.optimizer.name, *cfg.compare.optimizers):
        optimizer_spec(name)


def test_the_config_reference_is_complete_and_current() -> None:
    """docs/config.md lists every key, as the generator prints it today."""
    from pathlib import Path

    from bigbatch.train.config import Config
    from bigbatch.train.config_reference import render

    text = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    assert text == render(), (
        "regenerate: python -m bigbatch.train.config_reference > docs/config.md"
    )
    for section, field in Config.model_fields.items():
        for key in field.annotation.model_fields:  # type: ignore[union-attr]
            assert f"`{section}.{key}`" in text
