"""``bigbatch train --nproc 2`` owns its processes: SIGTERM or SIGINT to the launcher's pid
stops the workers after their step with a checkpoint and a message; SIGKILL of the launcher
or of the torchrun agent leaves no worker training on (Linux: /proc is read to find them)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bigbatch.train.checkpoint import load_checkpoint
from bigbatch.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "BIGBATCH_DIST_TIMEOUT": "30"}

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")


def _running_with(marker: str) -> list[int]:
    """Processes whose command line mentions ``marker`` (this test's --out folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def _start(out: Path) -> subprocess.Popen[str]:
    args = [
        "train", "--dataset", "digits", "--model", "mlp", "--batch-size", "64",
        "--epochs", "200", "--no-progress", "--optimizer", "momentum", "--nproc", "2",
        "--set", "data.validation_size=200", "--set", "train.eval_every=10",
        "--set", "train.checkpoint_every=10", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "bigbatch.train.cli", *args],
        cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while len(read_metrics(out / "metrics.jsonl")) < 2 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.05)
    assert len(_running_with(str(out))) >= 4  # launcher, agent, two workers
    return proc


def _gone(out: Path, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not _running_with(str(out)):
            return True
        time.sleep(0.2)
    for pid in _running_with(str(out)):  # clean up whatever is left, then fail
        os.kill(pid, signal.SIGKILL)
    return False


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_to_the_launcher_stops_every_worker_with_a_checkpoint(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    out = tmp_path / "run"
    proc = _start(out)
    os.kill(proc.pid, sig)  # the launcher's pid alone, not its process group
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode == code, stderr
    assert "--resume" in stderr
    assert _gone(out, 20)
    assert load_checkpoint(out / "checkpoint.pt")["step"] >= 10


def test_a_killed_launcher_takes_the_job_down(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start(out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert _gone(out, 40)  # torchrun gets SIGTERM from the kernel and ends its workers


def test_a_killed_agent_is_reported_and_its_workers_stop(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start(out)
    agents = [
        pid
        for pid in _running_with(str(out))
        if pid != proc.pid and "torch.distributed.run" in Path(f"/proc/{pid}/cmdline").read_text()
    ]
    assert len(agents) == 1
    os.kill(agents[0], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "the torchrun agent was killed by SIGKILL" in stderr
    assert _gone(out, 20)  # each worker sees its agent gone and stops itself


def test_a_user_error_after_launch_is_one_line_and_status_2(tmp_path: Path) -> None:
    """Found by the workers (the text dataset without its file): rank 0 says it once; the
    ranks' copies and torchrun's traceback of the failed workers are not shown."""
    done = subprocess.run(
        [sys.executable, "-m", "bigbatch.train.cli", "train", "--nproc", "2",
         "--dataset", "text", "--model", "gpt", "--out", str(tmp_path / "run")],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [line for line in lines if line.startswith("bigbatch: error:")]
    assert len(lines) == 1
    assert "needs data_dir" in lines[0]
