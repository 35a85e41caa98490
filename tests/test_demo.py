"""The README's main job (examples/fashion_mnist_demo.py) runs end to end on real data."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # multi-process or end to end: not in make test-fast

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "fashion-mnist"


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / "fashion_mnist_demo.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_demo_trains_both_optimizers_on_fashion_mnist() -> None:
    assert DATA.is_dir(), f"the real data is expected at {DATA} (shared/ beside the repo)"
    out = run_demo(
        "--data-dir",
        str(DATA),
        "--epochs",
        "2",
        "--batch-size",
        "4096",
        "--sgd-lrs",
        "0.2",
        "--nlcg-lrs",
        "0.4",
    )
    assert out.returncode == 0, out.stderr
    accs = {
        name: float(acc)
        for name, acc in re.findall(
            r"best (SGD|NLCG)[^:]*: lr=[\d.]+, final test accuracy "
            r"([\d.]+)%",
            out.stdout,
        )
    }
    assert set(accs) == {"SGD", "NLCG"}, out.stdout
    # two epochs of a real model at batch 4096 (26 steps): far above chance (10%)
    assert all(acc > 70.0 for acc in accs.values()), accs


def test_demo_without_data_says_what_to_do(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "fashion_mnist_demo.py"),
            "--data-dir",
            str(tmp_path),
            "--epochs",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    if Path("/usr/share/datasets/fashion-mnist").is_dir():  # Debian's package is found
        assert out.returncode == 0, out.stderr
        assert "Fashion-MNIST from" in out.stdout
        return
    assert out.returncode == 2
    assert "error: Fashion-MNIST not found" in out.stderr
    assert "train-images-idx3-ubyte.gz" in out.stderr
    assert f"{tmp_path}  (no such directory)" not in out.stderr  # tmp_path exists, empty
    assert "pass --download" in out.stderr
    assert "--data-dir DIR" in out.stderr
