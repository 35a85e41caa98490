"""``bigbatch train --nproc 2`` owns its processes: SIGTERM or SIGINT to the launcher's pid
stops the workers after their step with a checkpoint and a message; SIGKILL of the launcher
or of the torchrun agent leaves no worker training on; a stopped (SIGSTOP) or killed rank is
named in one line (Linux: /proc is read to find them)."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bigbatch.train.checkpoint import load_checkpoint
from bigbatch.train.metrics import read_metrics
from bigbatch.train.rank_watch import RankWatch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "BIGBATCH_DIST_TIMEOUT": "30"}

pytestmark = [
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc"),
    pytest.mark.slow,  # subprocesses under torchrun: not in make test-fast
]


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


def _start(out: Path, *extra: str) -> subprocess.Popen[str]:
    args = [
        "train", *extra, "--dataset", "digits", "--model", "mlp", "--batch-size", "64",
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


def _worker(out: Path, rank: int) -> int:
    """The pid of the worker process with this ``RANK``."""
    for pid in _running_with(str(out)):
        with contextlib.suppress(OSError):
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b" ".join(environ):
                return pid
    raise AssertionError(f"no worker with RANK={rank}")


def test_a_stopped_rank_is_named_and_the_job_ends_within_the_stall_limit(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start(out, "--stall-limit", "3")
    pid = _worker(out, 1)
    stopped = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    _, stderr = proc.communicate(timeout=90)
    took = time.monotonic() - stopped
    assert proc.returncode == 1, stderr
    named = [line for line in stderr.splitlines() if f"rank 1 (pid {pid}) was stopped" in line]
    assert len(named) == 1, stderr
    assert "--resume" in named[0]
    assert "Traceback" not in stderr  # torchrun's report of the killed rank is held back
    assert took < 3 + 30, took  # the limit, a poll, then the teardown (measured: a few s)
    assert _gone(out, 20)
    assert load_checkpoint(out / "checkpoint.pt")["step"] >= 10


def test_a_killed_rank_is_named_when_the_job_fails(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _start(out)
    pid = _worker(out, 1)
    os.kill(pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=90)
    assert proc.returncode != 0
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"bigbatch: error: rank 1 (pid {pid}, killed by SIGKILL) failed first")
    assert _gone(out, 20)


def test_a_bad_stall_limit_is_refused_before_launch(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bigbatch.train.cli", "train", "--dataset", "digits",
         "--nproc", "2", "--stall-limit", "-1", "--out", str(tmp_path / "run")],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "bigbatch: error: --stall-limit / BIGBATCH_STALL_LIMIT='-1.0' must be > 0 seconds"
    ]


@pytest.mark.parametrize("limit", [0.5, math.inf])
def test_the_rank_watch_ends_a_stopped_process_only_past_its_limit(
    tmp_path: Path, limit: float
) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "rank3").write_text(f"{sleeper.pid}\n")
        watch = RankWatch(tmp_path, limit)
        assert watch.check(now=0.0) is None  # running: nothing to say
        os.kill(sleeper.pid, signal.SIGSTOP)
        time.sleep(0.2)
        assert watch.check(now=10.0) is None  # stopped from now on
        said = watch.check(now=10.4)
        assert said is None
        said = watch.check(now=10.6)
        if limit == math.inf:
            assert said is None
            assert sleeper.poll() is None
        else:
            assert said is not None
            assert f"rank 3 (pid {sleeper.pid}) was stopped" in said
            assert sleeper.wait(timeout=5) == -signal.SIGKILL
    finally:
        sleeper.kill()
        sleeper.wait()
