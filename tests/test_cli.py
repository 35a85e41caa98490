"""The ``bigbatch`` command end to end: compare and sweep on a small budget, resume through
the CLI equals an uninterrupted run, bad input exits 2 with a message naming the key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bigbatch.train import cli
from bigbatch.train.metrics import read_metrics

SMALL = [
    "--dataset", "digits",
    "--model", "mlp",
    "--batch-size", "256",
    "--epochs", "4",
    "--no-progress",
    "--set", "data.validation_size=200",
    "--set", "model.width=32",
    "--set", "train.target_accuracy=0.8",
]  # fmt: skip


def test_compare_writes_table_plot_and_picks_by_validation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    args = [
        "compare",
        *SMALL,
        "--out",
        str(out),
        "--optimizers",
        "momentum,nlcg",
        "--set",
        "compare.lrs.momentum=[0.05, 0.2]",
        "--set",
        "compare.lrs.nlcg=[0.1, 0.4]",
    ]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "| SGD momentum 0.9 |" in printed
    assert "| NLCG (FR, BFGS) |" in printed
    assert f"table: {out / 'results.md'}" in printed
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    for entry in results["optimizers"]:
        runs = entry["runs"]
        assert len(runs) == 2
        best = max(runs, key=lambda r: r["final_val_acc"])
        assert entry["chosen"]["lr"] == best["lr"]
        assert entry["chosen"]["final_test_acc"] > 0.5  # it learned something
    md = (out / "results.md").read_text()
    assert "validation accuracy" in md
    assert "digits" in md


def test_compare_extends_the_search_past_an_edge_and_repeats_seeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A grid far below momentum's best rate: the search climbs to its bound, still at the
    high edge, and the table says so; the chosen rate runs with two more seeds."""
    out = tmp_path / "cmp"
    args = [
        "compare",
        *SMALL,
        "--out",
        str(out),
        "--optimizers",
        "momentum",
        "--set",
        "compare.lrs.momentum=[0.001, 0.002]",
        "--set",
        "compare.max_trials=5",
        "--set",
        "compare.seeds=[1, 2]",
    ]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    (entry,) = json.loads((out / "results.json").read_text())["optimizers"]
    lrs = [r["lr"] for r in entry["runs"]]
    assert lrs == pytest.approx([0.001, 0.002, 0.004, 0.008, 0.016])  # climbed to the bound
    vals = [r["final_val_acc"] for r in entry["runs"]]
    assert vals == sorted(vals)  # still improving at the bound (0.095 ... 0.355 measured)
    assert entry["chosen"]["lr"] == pytest.approx(0.016)
    assert entry["bound_hit"] == "high"
    assert "search bound hit at the high edge" in printed
    assert [r["lr"] for r in entry["seed_runs"]] == [entry["chosen"]["lr"]] * 2
    seeds = entry["final_test_acc_over_seeds"]
    assert seeds["n"] == 3
    accs = [entry["chosen"]["final_test_acc"]] + [r["final_test_acc"] for r in entry["seed_runs"]]
    assert seeds["mean"] == pytest.approx(sum(accs) / 3)
    assert len(set(accs)) > 1  # the seeds really differ
    assert "seeds:" in printed


@pytest.mark.slow  # a real SIGINT to a subprocess
def test_interrupted_subprocess_then_resume(tmp_path: Path) -> None:
    """A real Ctrl-C (SIGINT) to the ``bigbatch`` process, then ``--resume``: the metrics
    equal those of an uninterrupted run."""
    out = tmp_path / "run"
    code = (
        "import os, signal, sys\n"
        "from bigbatch.train import cli, loop\n"
        "step = loop.TrainingRun._train_step\n"
        "def wrapped(self):\n"
        "    value = step(self)\n"
        "    if self.step == 4:\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return value\n"
        "loop.TrainingRun._train_step = wrapped\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    args = ["train", *SMALL, "--optimizer", "momentum", "--set", "train.eval_every=1"]
    done = subprocess.run(
        [sys.executable, "-c", code, *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 130, done.stderr
    assert "--resume" in done.stderr
    assert max(r["step"] for r in read_metrics(out / "metrics.jsonl")) == 5
    assert cli.main([*args, "--out", str(out), "--resume"]) == 0
    assert cli.main([*args, "--out", str(tmp_path / "whole")]) == 0
    strip = [
        [{k: v for k, v in r.items() if k != "wall_s"} for r in read_metrics(d / "metrics.jsonl")]
        for d in (out, tmp_path / "whole")
    ]
    assert strip[0] == strip[1]


def test_sweep_writes_the_scaling_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    args = [
        "sweep",
        *SMALL,
        "--out",
        str(out),
        "--optimizers",
        "momentum",
        "--batch-sizes",
        "128,256",
        "--set",
        "compare.lrs.momentum=[0.1]",
        "--set",
        "sweep.lr_scaling=linear",
    ]
    assert cli.main(args) == 0
    assert "| b=128 | b=256 |" in capsys.readouterr().out
    assert (out / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    runs = sorted(p.parent.name for p in out.glob("b*/momentum/*/summary.json"))
    assert runs == ["lr0.05", "lr0.1"]  # lr 0.1 at batch 256, scaled linearly to 128


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optimizers", "momentum,adamx"], "compare.optimizers: unknown optimizer 'adamx'"),
        (["--batch-size", "-8"], "train.batch_size"),
        (["--set", "train.micro_batch_size=7"], "must divide train.batch_size"),
        (["--set", "train.colour=red"], "train.colour: unknown key"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--model", "vgg"], "model.name"),
    ],
)
def test_bad_input_exits_2_naming_the_problem(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [
        "compare",
        "--dataset",
        "digits",
        "--no-progress",
        "--epochs",
        "1",
        "--batch-size",
        "256",
        "--out",
        str(tmp_path),
    ]
    assert cli.main([*base, *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_data_names_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("BIGBATCH_DATA_DIR", raising=False)
    code = cli.main(
        [
            "compare",
            "--dataset",
            "mnist",
            "--data-dir",
            str(tmp_path / "none"),
            "--set",
            f"data.cache_dir={tmp_path / 'cache'}",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "--download" in err or "download" in err
    assert "digits" in err


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["--help"], ["train", "--help"], ["compare", "--help"], ["sweep", "--help"]):
        with pytest.raises(SystemExit) as done:
            cli.main(command)
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: bigbatch")
        if len(command) > 1:
            assert f"usage: bigbatch {command[0]}" in out  # the subcommand's own usage


def test_malloc_tuning_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from bigbatch.train.malloc_tuning import tune_malloc

    monkeypatch.setenv("BIGBATCH_MALLOC_TUNING", "0")
    assert tune_malloc() is False
    monkeypatch.delenv("BIGBATCH_MALLOC_TUNING")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert tune_malloc() is False  # the user's own setting wins
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert tune_malloc() is sys.platform.startswith("linux")  # glibc here: applied
