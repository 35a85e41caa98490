"""The harness under real torchrun agents (gloo on 127.0.0.1): a worker killed mid-run is
restarted by torchrun (``--max-restarts``) and resumes from the last checkpoint to the same
result as an uninterrupted run; two agents started as two "nodes" rendezvous and train to
the same result as one agent with two processes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bigbatch.train.checkpoint import load_checkpoint
from bigbatch.train.metrics import read_metrics

pytestmark = pytest.mark.slow  # multi-process or end to end: not in make test-fast

ROOT = Path(__file__).resolve().parents[1]
#: digits: 1,233 training images (200 held out) // 64 = 19 steps per epoch
TRAIN = [
    "train", "--dataset", "digits", "--model", "mlp", "--batch-size", "64",
    "--no-progress", "--optimizer", "momentum", "--lr", "0.05",
    "--set", "data.validation_size=200", "--set", "model.width=32",
    "--set", "train.eval_every=10", "--set", "train.checkpoint_every=10",
]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "BIGBATCH_DIST_TIMEOUT": "30"}
CLI = [sys.executable, "-m", "bigbatch.train.cli"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc: Linux only, as torchrun's tests are)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _workers(launcher: int) -> list[int]:
    """The training processes: children of torchrun's agent, itself the launcher's child."""
    return [w for agent in _children(launcher) for w in _children(agent)]


def _final(out: Path) -> tuple[dict[str, torch.Tensor], list[dict[str, object]]]:
    state = load_checkpoint(out / "checkpoint.pt")
    metrics = [
        {k: v for k, v in r.items() if k != "wall_s"} for r in read_metrics(out / "metrics.jsonl")
    ]
    return state["model"], metrics


def _same(a: Path, b: Path) -> None:
    model_a, metrics_a = _final(a)
    model_b, metrics_b = _final(b)
    assert model_a.keys() == model_b.keys()
    for name in model_a:
        assert torch.equal(model_a[name], model_b[name]), name
    assert metrics_a == metrics_b


def test_killed_worker_is_restarted_and_resumes_to_the_same_result(tmp_path: Path) -> None:
    args = [*TRAIN, "--epochs", "40", "--nproc", "2", "--max-restarts", "1"]
    reference = tmp_path / "uninterrupted"
    done = subprocess.run(
        [*CLI, *args, "--out", str(reference)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "by torchrun: resuming" not in done.stdout

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [*CLI, *args, "--out", str(out)], cwd=ROOT, env=ENV, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                steps = [int(r["step"]) for r in read_metrics(out / "metrics.jsonl")]
            except json.JSONDecodeError:  # a line being written
                steps = []
            if steps and steps[-1] >= 25:  # a checkpoint at 20 exists, and steps after it
                break
            time.sleep(0.02)
        workers = _workers(proc.pid)
        assert len(workers) == 2, f"expected 2 running workers, found {workers}"
        os.kill(workers[-1], signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr
    resumed = re.search(r"restart 1 by torchrun: resuming from step (\d+) of", stdout)
    assert resumed is not None, stdout
    assert int(resumed[1]) >= 20  # not from scratch: from a checkpoint of this job
    assert int(resumed[1]) % 10 == 0
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 760
    _same(out, reference)


def test_two_agents_rendezvous_as_two_nodes(tmp_path: Path) -> None:
    """The multi-machine launch of the README, both "machines" on 127.0.0.1."""
    args = [*TRAIN, "--epochs", "2"]
    port = _free_port()
    out = tmp_path / "two-nodes"

    def agent(node: int) -> subprocess.Popen[str]:
        command = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes=2", "--nproc-per-node=1", f"--node-rank={node}",
            "--master-addr=127.0.0.1", f"--master-port={port}",
            "-m", "bigbatch.train.cli", *args, "--out", str(out),
        ]  # fmt: skip
        # files, not pipes: an agent blocked on a full pipe would stall the other's exit
        logs = [(tmp_path / f"node{node}.{kind}").open("w") for kind in ("out", "err")]
        return subprocess.Popen(
            command, cwd=ROOT, env=ENV, start_new_session=True, text=True,
            stdout=logs[0], stderr=logs[1],
        )  # fmt: skip

    agents = [agent(0), agent(1)]
    try:
        for a in agents:
            a.wait(timeout=240)
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)
    results = [
        ((tmp_path / f"node{n}.out").read_text(), (tmp_path / f"node{n}.err").read_text())
        for n in (0, 1)
    ]
    for a, (_, stderr) in zip(agents, results, strict=True):
        assert a.returncode == 0, stderr
    assert results[0][0].count("finished:") == 1  # global rank 0 (node 0) alone reports
    assert "finished:" not in results[1][0]

    one_agent = tmp_path / "one-agent"
    done = subprocess.run(
        [*CLI, *args, "--nproc", "2", "--out", str(one_agent)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    _same(out, one_agent)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-restarts", "-1"], "--max-restarts must be at least 0"),
        (["--max-restarts", "2"], "--max-restarts needs --nproc 2 or more"),
    ],
)
def test_refused_before_any_process_starts(extra: list[str], message: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [*CLI, *TRAIN, "--epochs", "1", *extra, "--out", str(tmp_path)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "torch.distributed" not in done.stderr  # refused before torchrun started


def test_a_restart_resumes_only_what_its_own_job_wrote(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older job's checkpoint or finished run in the same folder is not resumed."""
    from bigbatch.train.checkpoint import resumable_step, save_checkpoint
    from bigbatch.train.experiments import _finished

    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": 30, "launch_id": "old-job"}, path)
    assert resumable_step(path, "new-job") is None
    assert resumable_step(path, "old-job") == 30
    assert resumable_step(tmp_path / "missing.pt", "new-job") is None
    assert resumable_step(path, None) == 30  # --resume by hand: any checkpoint

    summary = {"optimizer": "momentum", "lr": 0.1, "batch_size": 64, "steps": 30}
    summary |= {"status": "finished", "wall_s": 1.0, "launch_id": "old-job"}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert _finished(tmp_path, "new-job") is None
    finished = _finished(tmp_path, None)
    assert finished is not None
    assert finished.steps == 30


@pytest.mark.parametrize("restarts", [0, 3])
def test_launch_command_passes_max_restarts(restarts: int) -> None:
    from bigbatch.train.cli import launch_command

    command = launch_command(
        2, ["train", "--nproc", "2", "--max-restarts", str(restarts)], restarts
    )
    assert f"--max-restarts={restarts}" in command
    assert command.index(f"--max-restarts={restarts}") < command.index("bigbatch.train.cli")
