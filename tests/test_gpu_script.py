"""benchmarks/gpu/run.py's CPU dry run (issue 16): every step runs and writes its file, so
the prepared GPU script cannot rot between GPU runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # about a minute, end to end

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_writes_every_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), "--dry-run", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    expected = ["b1_gpu.json", "b3.json", "b3.md", "cuda_tests.json", "env.json", "run.log"]
    assert names == [*expected, "summary.json"]
    assert len(names) <= 8  # what the device tool brings back
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert {k: v["status"] for k, v in summary["steps"].items()} == {
        "env": "ok", "cuda_tests": "ok", "b1": "ok", "b3": "ok"
    }  # fmt: skip
    tests = json.loads((out / "cuda_tests.json").read_text())
    assert int(tests["tests"]) >= 7
    assert int(tests["skipped"]) == int(tests["tests"])  # no CUDA here: all skip, saying why
    assert all("needs a CUDA device" in c["outcome"] for c in tests["cases"])
    b1 = json.loads((out / "b1_gpu.json").read_text())
    rows = b1["results"][0]["contenders"]
    for name in ("sgd", "adamw", "spngd-stale", "spngd-every", "nlcg-bfgs", "nlcg-kfac"):
        assert rows[name]["mean_ms"] > 0, (name, rows[name])
    assert "spngd_stale_mean_vs_sgd_resnet20_b8" in b1["measured"]
    b3 = json.loads((out / "b3.json").read_text())
    assert [r["contender"] for r in b3["results"]] == ["momentum"]
    env = json.loads((out / "env.json").read_text())
    assert env["cuda_available"] is False
