"""``benchmarks/convergence.py`` (B2/B3/B5) end to end at its tiny CPU budget: CIFAR-10
(JPEG) and ResNet-20 on a slice of the real data, so the GPU run (B3) is known to work
before a GPU is lent; and its learning-rate grid rule."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bigbatch.train.config import config_from_mapping
from bigbatch.train.results import RunResult

pytestmark = pytest.mark.slow  # multi-process or end to end: not in make test-fast

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data"
SCRIPT = ROOT / "benchmarks" / "convergence.py"


def test_tiny_cifar10_resnet20_run_writes_its_results(tmp_path: Path) -> None:
    assert (REAL / "cifar10-jpeg.tar.xz").is_file(), f"real data expected in {REAL}"
    contenders = ["momentum", "nlcg-kfac", "spngd-mc"]
    done = subprocess.run(
        [
            sys.executable, str(SCRIPT), "--task", "cifar10-resnet20", "--budget", "tiny",
            "--contenders", *contenders, "--data-dir", str(REAL), "--device", "cpu",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "runs"),
            "--results", str(tmp_path / "results"),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    stem = tmp_path / "results" / "convergence_cifar10-resnet20_tiny_subset"  # --contenders
    results = json.loads(stem.with_suffix(".json").read_text())
    assert results["context"]["dataset"] == "CIFAR-10 (JPEG)"
    assert results["context"]["train_images"] == 1024 - 256
    assert results["context"]["test_images"] == 256
    rows = results["results"]
    assert [r["contender"] for r in rows] == contenders
    for row in rows:
        assert row["batch_size"] == 256
        assert len(row["seeds"]) == 1
        (seed,) = row["seeds"]
        assert seed["steps"] == 3  # 768 training images // 256, one epoch
        assert 0.0 <= row["final_test_acc"]["mean"] <= 1.0
        assert math.isfinite(seed["final_val_acc"])
    table = stem.with_suffix(".md").read_text()
    assert "| nlcg-kfac |" in table
    assert "CIFAR-10 (JPEG)" in table
    for suffix in ("_accuracy.png", "_scaling.png"):
        assert (stem.parent / (stem.name + suffix)).stat().st_size > 1000


def test_study_quick_runs_the_whole_pipeline(tmp_path: Path) -> None:
    """Issue 14's study at its minutes budget on real Fashion-MNIST (a slice): the extending
    search, seeds, steps and seconds to target, critical batch sizes and every plot."""
    done = subprocess.run(
        [
            sys.executable, str(SCRIPT), "--task", "fashion-mnist-cnn", "--budget", "study-quick",
            "--contenders", "momentum", "spngd-emp", "--data-dir", str(REAL), "--device", "cpu",
            "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results"),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    stem = tmp_path / "results" / "convergence_fashion-mnist-cnn_study-quick_subset"
    results = json.loads(stem.with_suffix(".json").read_text())
    rows = results["results"]
    assert [(r["contender"], r["batch_size"]) for r in rows] == [
        ("momentum", 512), ("spngd-emp", 512), ("momentum", 2048), ("spngd-emp", 2048)
    ]  # fmt: skip
    for row in rows:
        assert 2 <= len(row["trials"]) <= 3  # the grid (2), extended once at most (bound 3)
        assert len(row["seeds"]) == 2
        assert row["seeds"][0]["lr"] == row["seeds"][1]["lr"] == row["chosen_lr"]
        best = max(row["trials"], key=lambda t: t["final_val_acc"])
        assert best["lr"] == row["chosen_lr"]  # chosen on validation
        assert (row["bound_hit"] is not None) == row["chosen_at_edge"]
        assert len(row["seconds_to_target"]) == len(row["step_ms"]) == 2
        assert all(ms > 0 for ms in row["step_ms"])
    assert set(results["critical_batch"]) == {"0.85", "0.8"}
    assert set(results["critical_batch"]["0.85"]) == {"momentum", "spngd-emp"}
    table = stem.with_suffix(".md").read_text()
    assert "Critical batch size" in table
    assert "ms/step" in table
    for suffix in ("_accuracy.png", "_scaling.png", "_sensitivity.png", "_time.png"):
        assert (stem.parent / (stem.name + suffix)).stat().st_size > 1000


@pytest.fixture(scope="module")
def lm_quick_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LM study at its minutes budget on the real KJV text, run once for this module;
    the folder holding its ``runs`` and ``results`` (tests copy what they change)."""
    kjv = REAL / "kjv" / "kjv.txt.gz"
    assert kjv.is_file(), f"real data expected at {kjv}"
    where = tmp_path_factory.mktemp("lm-quick")
    done = subprocess.run(
        [
            sys.executable, str(SCRIPT), "--task", "kjv-gpt", "--budget", "study-quick",
            "--data-dir", str(REAL), "--device", "cpu", "--out", str(where / "runs"),
            "--results", str(where / "results"),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return where


def test_lm_study_quick_runs_and_its_parts_merge_into_the_whole(
    lm_quick_study: Path, tmp_path: Path
) -> None:
    """Workload (b) of issue 14, the character-level transformer LM on the real KJV text, at
    its minutes budget; then the study's rows split into two part files and merged back
    (``--merge``) give the same rows and critical batch sizes as the whole, and the table
    says when the parts ran on different machines."""
    stem = lm_quick_study / "results" / "convergence_kjv-gpt_study-quick"
    whole = json.loads(stem.with_suffix(".json").read_text())
    assert whole["metric"] == "test token accuracy"
    assert whole["context"]["test_windows"] == 512  # the task keeps the first 512 windows
    assert whole["context"]["steps_per_epoch"] == {
        "16": whole["context"]["train_characters"] // (16 * 64),
        "64": whole["context"]["train_characters"] // (64 * 64),
    }
    rows = whole["results"]
    assert [(r["contender"], r["batch_size"]) for r in rows] == [
        ("adamw", 16), ("spngd-emp", 16), ("adamw", 64), ("spngd-emp", 64)
    ]  # fmt: skip
    for row in rows:
        assert row["reference_batch"] == 512
        assert 2 <= len(row["trials"]) <= 3
        assert [s["lr"] for s in row["seeds"]] == [row["chosen_lr"]] * 2
        if row["contender"] == "spngd-emp":  # the LM's options, not the CNN's
            assert row["options"] == {
                "fisher": "empirical", "weight_rescale": False, "damping": 1e-3
            }  # fmt: skip
        assert 0.0 < row["final_test_acc"]["mean"] < 1.0
    assert "test token accuracy" in stem.with_suffix(".md").read_text()

    parts = []
    for label in ("adamw", "spngd-emp"):
        part = dict(whole, results=[r for r in rows if r["contender"] == label])
        parts.append(tmp_path / f"part-{label}.json")
        parts[-1].write_text(json.dumps(part))
    conv = _grid_module()
    conv.merge_parts(parts, tmp_path / "merged" / "study")
    merged = json.loads((tmp_path / "merged" / "study.json").read_text())
    assert [{k: v for k, v in r.items() if k != "part"} for r in merged["results"]] == rows
    assert [r["part"] for r in merged["results"]] == [
        "part-adamw.json", "part-spngd-emp.json", "part-adamw.json", "part-spngd-emp.json"
    ]  # fmt: skip
    assert merged["critical_batch"] == whole["critical_batch"]
    assert [p["file"] for p in merged["context"]["parts"]] == [p.name for p in parts]
    assert [p["machine"] for p in merged["context"]["parts"]] == [whole["context"]["machine"]] * 2
    assert (tmp_path / "merged" / "study_sensitivity.png").stat().st_size > 1000
    table = (tmp_path / "merged" / "study.md").read_text()
    assert "one invocation each, on the same machine:" in table
    assert "machine A" not in table
    with pytest.raises(SystemExit, match="overlap"):
        conv.merge_parts([parts[0], parts[0]], tmp_path / "merged" / "again")

    # a part from another machine: each part's letter, and its seconds said not to compare
    other = json.loads(parts[1].read_text())
    other["context"]["machine"] = dict(other["context"]["machine"], cpu_model="Other CPU")
    parts[1].write_text(json.dumps(other))
    conv.merge_parts(parts, tmp_path / "mixed" / "study")
    table = (tmp_path / "mixed" / "study.md").read_text()
    assert "on 2 different machines" in table
    assert f"- machine A: {whole['context']['machine']['cpu_model']}, " in table
    assert "- machine B: Other CPU, " in table
    assert "| part-adamw.json |" in table
    assert "| A | `" in table
    assert "| B | `" in table
    time_rows = [line for line in table.splitlines() if "ms/step" in line]
    assert [line.startswith("| adamw |") for line in time_rows] == [True, False]
    assert time_rows[0].count("machine A") == 2
    assert time_rows[1].count("machine B") == 2


def _grid_module():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import convergence
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return convergence


@pytest.mark.parametrize(("batch", "scale"), [(8192, 1.0), (2048, 0.5), (32768, 2.0)])
def test_grid_is_three_points_factor_two_apart_scaled_by_sqrt_batch(
    batch: int, scale: float
) -> None:
    conv = _grid_module()
    for contender in conv.CONTENDERS.values():
        grid = conv.lr_grid(contender, batch, 3)
        centre = contender.centre * scale
        assert grid == pytest.approx((centre / 2, centre, centre * 2), rel=1e-3)


def _run(lr: float, status: str, accs: list[float], seed_steps: int = 10) -> RunResult:
    history = [{"step": seed_steps * i, "test_acc": a} for i, a in enumerate(accs)]
    return RunResult("r", "momentum", lr, 1024, seed_steps * len(accs), history, status)


def test_summary_keeps_finished_seeds_and_marks_diverged_ones() -> None:
    conv = _grid_module()
    contender = conv.CONTENDERS["momentum"]
    cfg = config_from_mapping({"train": {"target_accuracy": 0.8, "eval_every": 10}})
    grid = (0.1, 0.2, 0.4)
    runs = [
        _run(0.1, "finished", [0.5, 0.7]),
        _run(0.2, "finished", [0.5, 0.85, 0.9]),
        _run(0.4, "diverged", [0.5, 0.95]),  # crossed the target, then diverged
    ]
    seeds = [runs[1], _run(0.2, "diverged", [0.6, 0.82]), _run(0.2, "finished", [0.6, 0.7, 0.8])]
    row = conv.summarise(contender, 1024, grid, runs, runs[1], seeds, cfg, (0.7,))
    assert row["steps_to"] == {"0.8": [10, None, 20], "0.7": [10, None, 10]}
    assert conv.scaling_curves([row], "0.7") == {"momentum": [(1024, None)]}
    assert row["final_test_acc"] == pytest.approx({"mean": 0.85, "min": 0.8, "max": 0.9})
    assert row["steps_to_target"] == [10, None, 20]  # a diverged seed reaches nothing
    assert row["grid_diverged"] == 1
    assert row["seeds_diverged"] == 1
    assert row["chosen_at_edge"] is False
    cell = conv._accuracy_cell(row)
    assert cell.startswith("85.00 (80.00-90.00) lr 0.2")
    assert "1/3 lrs div" in cell
    assert "1/3 seeds div" in cell
    assert conv._steps_cell(row) == "10 / div / 20 (every 10)"
    curves = conv.scaling_curves([row])
    assert curves == {"momentum": [(1024, None)]}  # not every seed reached the target


def test_summary_when_every_lr_diverged() -> None:
    conv = _grid_module()
    cfg = config_from_mapping({"train": {"target_accuracy": 0.8, "eval_every": 5}})
    runs = [_run(lr, "diverged", [0.3]) for lr in (0.1, 0.2, 0.4)]
    row = conv.summarise(conv.CONTENDERS["lars"], 4096, (0.1, 0.2, 0.4), runs, None, [], cfg)
    assert row["chosen_lr"] is None
    assert row["final_test_acc"]["mean"] is None
    assert conv._accuracy_cell(row) == "all 3 lrs diverged"
    assert conv._steps_cell(row) == "diverged"
    assert conv.scaling_curves([row]) == {"lars": [(4096, None)]}


def test_retime_times_the_studys_own_runs_interleaved(lm_quick_study: Path, tmp_path: Path) -> None:
    """``benchmarks/retime.py`` on the quick LM study: the rows given steps to a target get
    the training seconds after exactly those steps of the study's own seed-0 configuration
    (same config as the study's run folder), rows that reached nothing get none, and the
    tables and time plot are redrawn."""
    study = json.loads(
        (lm_quick_study / "results" / "convergence_kjv-gpt_study-quick.json").read_text()
    )
    rows = study["results"]
    # the quick budget (8 steps at batch 16) reaches no target; give two rows steps to time
    for row in rows:
        row["steps_to"] = {k: [None] * len(v) for k, v in row["steps_to"].items()}
    rows[0]["steps_to"]["0.35"] = [3, None]  # adamw at 16: seed 0 in 3 steps, seed 1 missed
    rows[0]["steps_to"]["0.3"] = [2, 2]
    rows[3]["steps_to"]["0.4"] = [1, 1]  # spngd-emp at 64
    path = tmp_path / "convergence_kjv-gpt_study-quick.json"
    path.write_text(json.dumps(study))
    done = subprocess.run(
        [
            sys.executable, str(SCRIPT.parent / "retime.py"), "--task", "kjv-gpt",
            "--budget", "study-quick", "--study", str(path), "--data-dir", str(REAL),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(path.read_text())
    timed = [r.get("retimed") for r in out["results"]]
    assert [t is not None for t in timed] == [True, False, False, True]
    first, last = timed[0], timed[3]
    assert first["steps_timed"] == 3
    assert last["steps_timed"] == 1
    assert not first["diverged"]
    assert not last["diverged"]
    s35, s30 = first["seconds_to"]["0.35"], first["seconds_to"]["0.3"]
    assert s35[1] is None
    assert s30[0] == s30[1]
    assert 0 < s30[0] < s35[0]  # 2 steps take less than 3
    assert first["step_ms"] * 3 / 1e3 == pytest.approx(s35[0], abs=2e-4)  # both rounded
    assert first["seconds_to"]["0.4"] == [None, None]
    assert last["seconds_to"]["0.4"][0] == last["seconds_to"]["0.4"][1] > 0
    again = out["context"]["retimed"]
    assert again["command"].startswith("python benchmarks/retime.py --task kjv-gpt")
    assert again["rounds_per_batch"] == {"16": 3, "64": 1}
    assert again["machine"]["cpu_model"] == study["context"]["machine"]["cpu_model"]
    table = path.with_suffix(".md").read_text()
    assert table.count("re-timed in one invocation on one machine") == 3  # one per target
    assert (tmp_path / "convergence_kjv-gpt_study-quick_time.png").stat().st_size > 1000

    # the re-timed run is the study's seed-0 run: the same configuration as its folder's
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import convergence
        import retime
    finally:
        sys.path.remove(str(SCRIPT.parent))
    task, budget = convergence.TASKS["kjv-gpt"], convergence.TASKS["kjv-gpt"].budgets["study-quick"]
    args = retime.parse_args(
        ["--task", "kjv-gpt", "--budget", "study-quick", "--study", str(path),
         "--data-dir", str(REAL), "--device", "cpu"]
    )  # fmt: skip
    cfg = retime.cell_config(convergence.base_config(task, budget, args), rows[0])
    run_dir = (
        lm_quick_study / "runs" / "kjv-gpt-study-quick" / "adamw" / "b16" / "adamw"
        / f"lr{rows[0]['chosen_lr']:g}"
    )  # fmt: skip
    original = json.loads((run_dir / "config.json").read_text())
    mine = cfg.to_dict()
    for section in ("data", "model", "optimizer", "schedule", "recipe"):
        assert mine[section] == original[section], section
    for key in original["train"]:
        if key != "eval_every":  # evaluation is not timed
            assert mine["train"][key] == original["train"][key], key


def test_retime_refuses_a_missing_study_or_another_budget(tmp_path: Path) -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import retime
    finally:
        sys.path.remove(str(SCRIPT.parent))
    with pytest.raises(SystemExit):
        retime.parse_args(["--task", "kjv-gpt", "--budget", "study", "--study", "nope.json"])
    with pytest.raises(SystemExit):
        retime.parse_args(["--task", "kjv-gpt", "--budget", "no-such-budget"])
    path = tmp_path / "study.json"
    path.write_text(json.dumps({"context": {"budget": "study-quick"}, "results": []}))
    with pytest.raises(SystemExit, match="its budget is 'study-quick', not 'study'"):
        retime.main(["--task", "kjv-gpt", "--budget", "study", "--study", str(path)])
    path.write_text(json.dumps({"context": {"budget": "study", "epochs": 3}, "results": []}))
    with pytest.raises(SystemExit, match=r"run for 3 epochs, the study budget is now 0\.5"):
        retime.main(["--task", "kjv-gpt", "--budget", "study", "--study", str(path)])
