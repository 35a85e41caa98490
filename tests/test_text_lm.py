"""The harness's language-model path: the text dataset, its windows and splits, the gpt model,
and training runs on the real KJV text (../shared/data/kjv/kjv.txt.gz)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bigbatch import SPNGD
from bigbatch.train.batches import prepare_text
from bigbatch.train.config import ConfigError, config_from_mapping
from bigbatch.train.data import DatasetError, TextDataset, load_dataset
from bigbatch.train.data.text import load_text
from bigbatch.train.lm import CausalLM
from bigbatch.train.loop import TrainingRun

KJV = Path(__file__).resolve().parents[2] / "shared" / "data" / "kjv" / "kjv.txt.gz"


def _text(tmp_path: Path, body: str, gz: bool = False) -> Path:
    path = tmp_path / ("t.txt.gz" if gz else "t.txt")
    data = body.encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_text_is_split_by_position_and_indexed_by_its_alphabet(tmp_path: Path, gz: bool) -> None:
    body = "".join(chr(97 + (i * 7) % 26) for i in range(3000)) + "é∑"
    ds = load_text(_text(tmp_path, body, gz))
    assert ds.vocab == tuple(sorted(set(body)))
    decoded = "".join(ds.vocab[int(t)] for t in ds.tokens)
    assert decoded == body
    assert (ds.train_end, ds.val_end) == (int(len(body) * 0.9), int(len(body) * 0.95))
    parts = [ds.part(s) for s in ("train", "validation", "test")]
    assert torch.equal(torch.cat(parts), ds.tokens)
    assert ds.num_classes == len(set(body))


def test_bad_text_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope\.txt: no such text file"):
        load_text(tmp_path / "nope.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc" * 500 + b"\xff\xfe")
    with pytest.raises(DatasetError, match=r"bad\.txt: not UTF-8 text \(byte 1500"):
        load_text(bad)
    with pytest.raises(DatasetError, match="at least 1000"):
        load_text(_text(tmp_path, "short"))
    with pytest.raises(DatasetError, match="a directory"):
        load_text(tmp_path)
    with pytest.raises(DatasetError, match="needs data_dir"):
        load_dataset("text")
    truncated = tmp_path / "cut.txt.gz"
    truncated.write_bytes(gzip.compress(b"x" * 5000)[:-12])
    with pytest.raises(DatasetError, match=r"cut\.txt\.gz: cannot be read"):
        load_text(truncated)


def test_training_windows_come_from_the_training_part_only(tmp_path: Path) -> None:
    ds = load_text(_text(tmp_path, "".join(chr(33 + i % 90) for i in range(5000))))
    train, val, test = prepare_text(ds, 16, torch.device("cpu"))
    assert len(train) == ds.train_end - 16
    idx = torch.tensor([0, len(train) - 1, 123])
    x, y = train.take(idx)
    for row, start in enumerate(idx.tolist()):
        assert torch.equal(x[row], ds.tokens[start : start + 16])
        assert torch.equal(y[row], ds.tokens[start + 1 : start + 17])
    assert int(idx.max()) + 17 <= ds.train_end  # the last window ends inside the part
    # validation/test: the non-overlapping windows of their own parts
    part = ds.part("validation")
    assert torch.equal(val.x.reshape(-1), part[: val.x.numel()])
    assert torch.equal(val.y.reshape(-1), part[1 : val.x.numel() + 1])
    assert torch.equal(test.x[0], ds.part("test")[:16])
    with pytest.raises(ConfigError, match=r"data\.context"):
        prepare_text(ds, 400, torch.device("cpu"))


@pytest.mark.parametrize("attention", ["mha", "linear"])
def test_gpt_is_causal_and_fully_preconditioned(attention: str) -> None:
    torch.manual_seed(0)
    model = CausalLM(11, 8, width=16, depth=2, heads=2, attention=attention)
    idx = torch.randint(0, 11, (3, 8))
    out = model(idx)
    assert out.shape == (3, 8, 11)
    changed = idx.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 11
    with torch.no_grad():
        torch.testing.assert_close(model(changed)[:, :5], out[:, :5].detach())
        assert not torch.allclose(model(changed)[:, 5], out[:, 5])
    opt = SPNGD(model, lr=0.05, damping=1e-2)
    assert opt.fallback_parameters == []
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(idx[:, :-1]).reshape(-1, 11), idx[:, 1:].reshape(-1)).backward()
        opt.step()
    assert opt.engine.blocks["tok"].tied  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 9, dtype=torch.long))


def _lm_config(tmp_path: Path, optimizer: str, lr: float, **train: object) -> object:
    return config_from_mapping(
        {
            "data": {"name": "text", "data_dir": str(KJV), "context": 32},
            "model": {"name": "gpt", "width": 32, "depth": 1, "heads": 2},
            "optimizer": {"name": optimizer, "lr": lr, "weight_decay": 0.0},
            "schedule": {"kind": "constant", "warmup_epochs": 0.0},
            "train": {"epochs": 0.05, "batch_size": 64, "eval_every": 5, "progress": "never"}
            | train,
        }
    )


@pytest.fixture(scope="module")
def kjv() -> TextDataset:
    ds = load_dataset("text", KJV)
    assert isinstance(ds, TextDataset)
    assert ds.num_classes == 73  # the data README's figures
    assert ds.tokens.numel() == 4_298_239
    return ds


@pytest.mark.slow  # trains on the real text, twice per optimizer
@pytest.mark.parametrize(("optimizer", "lr"), [("adamw", 3e-3), ("spngd", 0.01)])
def test_training_on_kjv_lowers_the_validation_loss_and_resumes_exactly(
    kjv: TextDataset, tmp_path: Path, optimizer: str, lr: float
) -> None:
    cfg = _lm_config(tmp_path, optimizer, lr, epochs=20 * 64 * 32 / kjv.train_end)
    splits = prepare_text(kjv, 32, torch.device("cpu"))
    whole = TrainingRun(cfg, kjv, tmp_path / "whole", splits=splits).run()  # type: ignore[arg-type]
    assert whole.steps == 20
    val = [r["val_loss"] for r in whole.history]
    assert val[-1] < val[0] - 0.5  # from ~4.3 nats (uniform over 73) by a clear margin
    assert 0.0 < whole.last("test_acc") <= 1.0
    half = _lm_config(
        tmp_path, optimizer, lr, epochs=20 * 64 * 32 / kjv.train_end, checkpoint_every=10
    )
    first = TrainingRun(half, kjv, tmp_path / "resumed", splits=splits)  # type: ignore[arg-type]
    first.total_steps = 10
    first.run()
    resumed = TrainingRun(half, kjv, tmp_path / "resumed", splits=splits).run(resume=True)  # type: ignore[arg-type]
    assert resumed.last("val_loss") == whole.last("val_loss")


def test_image_only_settings_are_refused_for_text(kjv: TextDataset, tmp_path: Path) -> None:
    cfg = _lm_config(tmp_path, "adamw", 1e-3)
    with pytest.raises(ConfigError, match=r"recipe\.mixup_alpha applies to image datasets"):
        TrainingRun(
            cfg.model_copy(update={"recipe": cfg.recipe.model_copy(update={"mixup_alpha": 0.2})}),
            kjv,
            tmp_path / "a",
        )  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"the text dataset trains model\.name=gpt"):
        TrainingRun(
            cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": "cnn"})}),
            kjv,
            tmp_path / "b",
        )  # type: ignore[attr-defined]
