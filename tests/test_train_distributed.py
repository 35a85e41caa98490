"""Data-parallel training under torchrun's environment (gloo on 127.0.0.1, 2 processes):
the update equals the single-process full-batch update (SGD momentum, NLCG and SP-NGD in its
hybrid and simple modes, with and without accumulation), resume after Ctrl-C equals an
uninterrupted run, rank 0 alone writes, a failing rank stops every rank, ``--nproc``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from bigbatch.train import interrupt as interrupt_module
from bigbatch.train import loop as loop_module
from bigbatch.train.checkpoint import load_checkpoint
from bigbatch.train.config import Config, ConfigError, load_config
from bigbatch.train.dist_env import DistContext, check_distributed, shutdown
from bigbatch.train.interrupt import TrainingInterrupted
from bigbatch.train.loop import TrainingRun
from bigbatch.train.metrics import read_metrics
from tests.harness_data import synthetic_dataset

pytestmark = pytest.mark.slow  # multi-process or end to end: not in make test-fast

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
BASE = [
    "data.validation_size=128",
    "model.name=mlp",
    "model.width=32",
    "train.batch_size=128",
    "train.epochs=3",
    "train.progress=never",
    "train.checkpoint_every=5",
    "schedule.kind=cosine",
    "schedule.warmup_epochs=1",
]
#: name -> extra config; every case runs 15 steps (640 training images, batch 128).
CASES: dict[str, list[str]] = {
    "momentum": ["optimizer.name=momentum", "optimizer.lr=0.05"],
    "momentum-micro": ["optimizer.name=momentum", "optimizer.lr=0.05", "train.micro_batch_size=32"],
    "nlcg": ["optimizer.name=nlcg", "optimizer.lr=0.05"],
    "nlcg-micro": ["optimizer.name=nlcg", "optimizer.lr=0.05", "train.micro_batch_size=16"],
    # NLCG with K-FAC: statistics all-reduced, gradients averaged by NLCG itself
    "nlcg-kfac": [
        "optimizer.name=nlcg",
        "optimizer.lr=0.05",
        "optimizer.options.preconditioner=kfac",
    ],
    # SP-NGD in its own distributed modes (hybrid by default)
    "spngd": ["optimizer.name=spngd", "optimizer.lr=0.05"],
    "spngd-simple-micro": [
        "optimizer.name=spngd",
        "optimizer.lr=0.05",
        "optimizer.options.distributed=simple",
        "train.micro_batch_size=32",
    ],
}


WORKER = "import sys; from tests.test_train_distributed import _worker; _worker(*sys.argv[1:])"


def config(*extra: str) -> Config:
    return load_config(None, [*BASE, *extra])


def without_time(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in records]


# ---------------------------------------------------------------- the processes
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(job: str, out: Path, *, timeout: float = 120.0) -> list[tuple[int, str, str]]:
    """Run ``_worker(job, out)`` on WORLD ranks as torchrun would; (rc, stdout, stderr).

    The output goes to files (a full pipe would block a rank and so the collectives); a
    start that lost its free port to another process is retried.
    """
    for _ in range(3):
        results = _launch_once(job, out, timeout)
        if not any("ddress already in use" in err for _, _, err in results):
            break
    return results


def _launch_once(job: str, out: Path, timeout: float) -> list[tuple[int, str, str]]:
    port = _free_port()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(WORLD):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(WORLD),
            "LOCAL_WORLD_SIZE": str(WORLD),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "BIGBATCH_DIST_TIMEOUT": "30",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        if Path("/sys/class/net/lo").exists():
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        with (logs / f"{rank}.out").open("w") as stdout, (logs / f"{rank}.err").open("w") as err:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", WORKER, job, str(out)],
                    cwd=ROOT,
                    env=env,
                    stdout=stdout,
                    stderr=err,
                )
            )
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
            proc.wait()
        pytest.fail(f"the {WORLD} ranks of {job!r} did not finish within {timeout} s (hang)")
    return [
        (
            int(proc.returncode),
            (logs / f"{rank}.out").read_text(),
            (logs / f"{rank}.err").read_text(),
        )
        for rank, proc in enumerate(procs)
    ]


def _worker(job: str, out: str) -> None:
    """One rank (run in a subprocess with torchrun's environment variables)."""
    ok = False
    try:
        _job(job, Path(out))
        ok = True
    finally:  # leave the process group before exit (gloo may abort at interpreter exit)
        shutdown(together=ok)


def _job(job: str, root: Path) -> None:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    if job == "equal":
        for name, extra in CASES.items():
            (root / name).mkdir(parents=True, exist_ok=True)
            run = TrainingRun(config(*extra), synthetic_dataset(), root / name / f"rank{rank}")
            result = run.run()
            torch.save(
                {"params": [p.detach().clone() for p in run.model.parameters()],
                 "steps": result.steps, "history": result.history,
                 "sync": type(getattr(getattr(run.optimizer, "engine", None)
                              or getattr(getattr(run.optimizer, "preconditioner", None),
                                         "engine", None), "strategy", None))
                 .__name__ == "DistributedCurvature"},
                root / name / f"params{rank}.pt",
            )  # fmt: skip
        return
    if job in ("raise", "exit"):
        batch = loop_module.TrainingRun._batch

        def bad(self: TrainingRun, step: int) -> Any:
            if rank == 1 and step == 3:
                if job == "exit":
                    os._exit(3)  # a crash: no Python clean-up, the sockets just close
                raise ValueError("bad data on rank 1")
            return batch(self, step)

        loop_module.TrainingRun._batch = bad  # type: ignore[method-assign]
        TrainingRun(config(*CASES["momentum"]), synthetic_dataset(), root / "run").run()
        return
    if job.startswith("resume-"):
        _resume_worker(rank, root, job.removeprefix("resume-"))
        return
    raise ValueError(job)


RESUME = [
    "model.name=cnn",  # BatchNorm: its running statistics are averaged across the ranks
    "model.width=4",
    "optimizer.lr=0.05",
    "recipe.mixup_alpha=0.4",
    "recipe.running_mixup=true",  # per-rank state, gathered into the checkpoint
    "recipe.ema_decay=0.9",
    "train.eval_every=2",
]


def _resume_worker(rank: int, root: Path, optimizer: str) -> None:
    data = synthetic_dataset()
    opts = [*RESUME, f"optimizer.name={optimizer}"]
    whole = TrainingRun(config(*opts), data, root / f"rank{rank}" / "whole")
    expected = whole.run()

    class StopAfterSeven(loop_module.GracefulInterrupt):  # Ctrl-C seen by rank 1 only
        checks = 0

        @property  # type: ignore[override]
        def requested(self) -> bool:
            StopAfterSeven.checks += 1
            return rank == 1 and StopAfterSeven.checks == 7

        @requested.setter
        def requested(self, value: bool) -> None:
            pass

    original = loop_module.GracefulInterrupt
    loop_module.GracefulInterrupt = StopAfterSeven  # type: ignore[misc]
    first = TrainingRun(config(*opts), data, root / f"rank{rank}" / "split")
    stopped_at = None
    try:
        first.run()
    except TrainingInterrupted:
        stopped_at = first.step
    finally:
        loop_module.GracefulInterrupt = original  # type: ignore[misc]
    second = TrainingRun(config(*opts), data, root / f"rank{rank}" / "split")
    resumed = second.run(resume=True)  # rank 1 has no checkpoint: rank 0 broadcasts its own
    torch.save(
        {
            "stopped_at": stopped_at,
            "expected": [p.detach().clone() for p in whole.model.parameters()],
            "resumed": [p.detach().clone() for p in second.model.parameters()],
            "history": (expected.history, resumed.history),
        },
        root / f"resume{rank}.pt",
    )


# ---------------------------------------------------------------- equality with one process
@pytest.fixture(scope="module")
def parallel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("parallel")
    results = launch("equal", out, timeout=240)
    for rank, (rc, _, stderr) in enumerate(results):
        assert rc == 0, f"rank {rank} failed:\n{stderr}"
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one(case: str, parallel: Path, tmp_path: Path) -> None:
    single = TrainingRun(config(*CASES[case]), synthetic_dataset(), tmp_path / "single")
    reference = single.run()
    ranks = [torch.load(parallel / case / f"params{r}.pt") for r in range(WORLD)]
    assert ranks[0]["steps"] == reference.steps == 15
    # SP-NGD and NLCG's K-FAC preconditioner ran their distributed strategies
    assert ranks[0]["sync"] == case.startswith(("spngd", "nlcg-kfac"))
    # every rank holds the same weights, bit for bit
    for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        assert torch.equal(a, b)
    # ... which equal the single-process ones up to the order of the float sums (SP-NGD's
    # inverses amplify that a little, as in test_train_loop)
    rtol, atol = (2e-3, 1e-4) if case.startswith(("spngd", "nlcg-kfac")) else (2e-4, 2e-5)
    for got, want in zip(ranks[0]["params"], single.model.parameters(), strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=rtol, atol=atol)
    moved = sum(
        float((a - b).detach().abs().sum())
        for a, b in zip(
            single.model.parameters(),
            TrainingRun(
                config(*CASES[case]), synthetic_dataset(), tmp_path / "fresh"
            ).model.parameters(),
            strict=True,
        )
    )
    assert moved > 1e-2  # the runs trained (the comparison would pass trivially otherwise)
    # the sharded evaluation equals the whole one (losses up to float order)
    records = ranks[0]["history"]
    assert [r["step"] for r in records] == [r["step"] for r in reference.history]
    for got, want in zip(records, reference.history, strict=True):
        assert got["test_acc"] == pytest.approx(want["test_acc"], abs=1.5 / 256)
        assert got["test_loss"] == pytest.approx(want["test_loss"], rel=1e-3)
        if want["train_loss"] is None:
            assert got["train_loss"] is None
        else:
            assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-3)
    assert ranks[1]["history"] == records  # every rank returns rank 0's history


def test_rank_zero_alone_writes(parallel: Path) -> None:
    for case in CASES:
        main, other = parallel / case / "rank0", parallel / case / "rank1"
        for name in ("metrics.jsonl", "checkpoint.pt", "summary.json", "config.json"):
            assert (main / name).is_file(), name
        assert not other.exists()  # rank 1 got its own folder and wrote nothing there
        assert len(read_metrics(main / "metrics.jsonl")) == 4  # step 0 and each epoch
        assert json.loads((main / "summary.json").read_text())["steps"] == 15


@pytest.mark.parametrize("optimizer", ["nlcg", "spngd"])
def test_ctrl_c_on_one_rank_then_resume_equals_uninterrupted(
    optimizer: str, tmp_path: Path
) -> None:
    job = f"resume-{optimizer}"
    for rank, (rc, _, stderr) in enumerate(launch(job, tmp_path, timeout=240)):
        assert rc == 0, f"rank {rank} failed:\n{stderr}"
    ranks = [torch.load(tmp_path / f"resume{r}.pt") for r in range(WORLD)]
    state = load_checkpoint(tmp_path / "rank0" / "split" / "checkpoint.pt")
    assert state["step"] == 15
    assert len(state["mixup"]) == WORLD  # one running-mixup state per rank
    for saved in ranks:
        assert saved["stopped_at"] == 7  # every rank stopped after the same step
        expected, resumed = saved["history"]
        assert without_time(resumed) == without_time(expected)
        for a, b in zip(saved["expected"], saved["resumed"], strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
        for a, b in zip(saved["resumed"], ranks[0]["resumed"], strict=True):
            assert torch.equal(a, b)


# ---------------------------------------------------------------- failures stop every rank
def test_a_rank_that_raises_stops_every_rank(tmp_path: Path) -> None:
    started = time.monotonic()
    (rc0, _, err0), (rc1, _, err1) = launch("raise", tmp_path)
    assert rc1 != 0
    assert "ValueError: bad data on rank 1" in err1
    assert rc0 != 0
    assert "PeerRankError: rank 1 failed at step 3: ValueError: bad data on rank 1" in err0
    assert time.monotonic() - started < 60  # at once, not after the collective timeout


def test_a_rank_that_dies_stops_every_rank(tmp_path: Path) -> None:
    (rc0, _, err0), (rc1, _, _) = launch("exit", tmp_path, timeout=90)
    assert rc1 == 3
    assert rc0 != 0
    assert "Error" in err0  # gloo noticed the closed connection (or timed out)


# ---------------------------------------------------------------- configuration errors
def test_batch_must_split_into_whole_micro_batches() -> None:
    check_distributed(2, batch_sizes=[128], micro_batch_size=32, optimizers=["nlcg"])
    with pytest.raises(ConfigError, match=r"train\.batch_size \(96\).*train\.micro_batch_size"):
        check_distributed(2, batch_sizes=[96], micro_batch_size=32, optimizers=["momentum"])
    with pytest.raises(ConfigError, match=r"train\.batch_size \(129\).*processes \(2\)"):
        check_distributed(2, batch_sizes=[129], micro_batch_size=0, optimizers=["momentum"])
    check_distributed(1, batch_sizes=[129], micro_batch_size=0, optimizers=["spngd"])


def test_unknown_optimizer_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown optimizer 'sgdd'"):
        check_distributed(2, batch_sizes=[128], micro_batch_size=0, optimizers=["sgdd"])


def test_shards_cover_the_batch() -> None:
    shards = [DistContext(rank=r, world_size=3).shard(12) for r in range(3)]
    assert shards == [(0, 4), (4, 8), (8, 12)]


# ---------------------------------------------------------------- the command
def test_cli_nproc_launches_two_processes(tmp_path: Path) -> None:
    args = [
        "train", "--dataset", "digits", "--model", "mlp", "--batch-size", "256",
        "--epochs", "2", "--no-progress", "--optimizer", "momentum", "--lr", "0.1",
        "--set", "data.validation_size=200", "--set", "model.width=32",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BIGBATCH_DIST_TIMEOUT": "30"}
    command = [sys.executable, "-m", "bigbatch.train.cli"]
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        done = subprocess.run(
            [*command, *args, "--nproc", str(nproc), "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=240,
            env=env,
            cwd=ROOT,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("finished:") == 1  # rank 0 alone reports
        runs[nproc] = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in runs[1]] == [r["step"] for r in runs[2]]
    for one, two in zip(runs[1], runs[2], strict=True):
        assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-3)


def test_cli_nproc_ctrl_c_saves_then_resume_finishes(tmp_path: Path) -> None:
    """A real Ctrl-C (SIGINT to the launcher's process group, as a terminal sends it):
    every rank stops after the same step, rank 0 writes the checkpoint, exit status 130;
    ``--resume`` then finishes the run."""
    out = tmp_path / "run"
    args = [
        "train", "--dataset", "digits", "--model", "mlp", "--batch-size", "64",
        "--epochs", "10", "--no-progress", "--optimizer", "momentum", "--nproc", "2",
        "--set", "data.validation_size=200", "--set", "train.eval_every=10",
        "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BIGBATCH_DIST_TIMEOUT": "30"}
    command = [sys.executable, "-m", "bigbatch.train.cli", *args]
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, start_new_session=True, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while len(read_metrics(metrics)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the ranks did not stop after Ctrl-C")
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr
    stopped = load_checkpoint(out / "checkpoint.pt")["step"]
    assert 10 <= stopped < 190  # 1233 training images // 64 = 19 steps/epoch, 10 epochs
    done = subprocess.run(
        [*command, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    steps = [r["step"] for r in read_metrics(metrics)]
    total = load_checkpoint(out / "checkpoint.pt")["step"]
    assert steps == sorted(set(steps))
    assert steps[0] == 0
    assert steps[-1] == total == 190


def test_cli_nproc_compare_then_resume(tmp_path: Path) -> None:
    """``compare`` under --nproc: rank 0 alone prints and reports; with --resume the
    finished runs are read back (rank 0 decides) instead of trained again."""
    out = tmp_path / "cmp"
    args = [
        "compare", "--dataset", "digits", "--model", "mlp", "--batch-size", "256",
        "--epochs", "2", "--no-progress", "--optimizers", "momentum,nlcg", "--nproc", "2",
        "--set", "data.validation_size=200", "--set", "model.width=32",
        "--set", "compare.lrs.momentum=[0.05, 0.2]", "--set", "compare.lrs.nlcg=[0.1]",
        "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BIGBATCH_DIST_TIMEOUT": "30"}
    command = [sys.executable, "-m", "bigbatch.train.cli", *args]
    printed = []
    for extra in ([], ["--resume"]):
        done = subprocess.run(
            [*command, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("| SGD momentum 0.9 |") == 1  # one table, from rank 0
        printed.append(json.loads((out / "results.json").read_text()))
        if extra:  # nothing was trained again: the summaries are the first run's
            assert "(0 s)" in done.stdout
    chosen = [
        [{k: v for k, v in e["chosen"].items() if k != "name"} for e in p["optimizers"]]
        for p in printed
    ]
    assert chosen[0] == chosen[1]


def test_one_ctrl_c_delivered_twice_counts_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    clock = iter([10.0, 10.5, 13.0])
    monkeypatch.setattr(interrupt_module.time, "monotonic", lambda: next(clock))
    handle = interrupt_module.once_per_ctrl_c(lambda signum, frame: calls.append(signum))
    for _ in range(3):
        handle(signal.SIGINT, None)
    assert calls == [signal.SIGINT, signal.SIGINT]  # the repeat 0.5 s later was dropped


def test_cli_nproc_rejects_an_uneven_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bigbatch.train import cli

    args = ["train", "--dataset", "digits", "--batch-size", "255", "--nproc", "2"]
    assert cli.main([*args, "--out", str(tmp_path)]) == 2
    assert "train.batch_size (255) must be divisible" in capsys.readouterr().err


def test_launch_command_drops_nproc() -> None:
    from bigbatch.train.cli import launch_command

    command = launch_command(2, ["train", "--nproc", "2", "--npro=2", "--lr", "0.1"])
    assert command[1:] == [
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "--max-restarts=0", "-m", "bigbatch.train.cli", "train", "--lr", "0.1",
    ]  # fmt: skip
