"""Kill and stop trials of ``bigbatch train --nproc 2``: does every way of ending a job end it,
with a message, leaving no process behind? (Issue 13's process-lifetime figures.)

Each trial starts a 2-process job (digits MLP, a checkpoint every 10 steps), waits until it
has logged twice, does one thing to one process, then watches. Kinds and what counts as a
clean end:

- ``term-launcher`` / ``int-launcher``: SIGTERM / SIGINT to the launcher's pid only: the
  launcher exits non-zero within 60 s, saying ``--resume``; no process is left 20 s later;
- ``kill-launcher``: SIGKILL to the launcher: no process is left within 40 s;
- ``kill-agent``: SIGKILL to the torchrun agent: the launcher exits non-zero within 60 s
  with a line naming the agent; no process is left 20 s later;
- ``kill-worker``: SIGKILL to rank 1: the launcher exits non-zero within 60 s with a line
  naming rank 1; no process is left 20 s later;
- ``stop-worker``: SIGSTOP to rank 1: the launcher exits within 75 s (the default stall
  limit, 60 s, plus a margin) with a line naming rank 1; no process is left 20 s later.

Whatever is still running when a trial is over is killed. Run from a checkout (``--src``
points at another checkout's ``src`` to measure an older version)::

    .venv/bin/python benchmarks/process_trials.py --trials 3
    .venv/bin/python benchmarks/process_trials.py --trials 3 --src /tmp/old/src \\
        --out benchmarks/results/process_trials_before.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import utc_iso, write_results

KINDS = (
    "term-launcher",
    "int-launcher",
    "kill-launcher",
    "kill-agent",
    "kill-worker",
    "stop-worker",
)
ROOT = Path(__file__).resolve().parents[1]


def _processes(marker: str) -> list[int]:
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


def _role(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    if b"torch.distributed.run" in cmdline:
        return "agent"
    if b"RANK=1" in environ and any(e.startswith(b"TORCHELASTIC_RUN_ID=") for e in environ):
        return "rank1"
    return "other"


def _gone(marker: str, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not _processes(marker):
            return True
        time.sleep(0.2)
    return False


def _trial(kind: str, src: Path, work: Path) -> dict[str, object]:
    out = work / f"{kind}-{time.monotonic_ns()}"
    marker = str(out)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(src),
        "PYTHONUNBUFFERED": "1",
    }
    args = [
        sys.executable, "-m", "bigbatch.train.cli", "train", "--dataset", "digits",
        "--model", "mlp", "--batch-size", "64", "--epochs", "400", "--no-progress",
        "--optimizer", "momentum", "--nproc", "2", "--set", "data.validation_size=200",
        "--set", "train.eval_every=10", "--set", "train.checkpoint_every=10",
        "--out", marker,
    ]  # fmt: skip
    launcher = subprocess.Popen(args, cwd=src.parent, env=env, text=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and launcher.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    if launcher.poll() is not None:
        return {"kind": kind, "clean": False, "why": "the job did not start",
                "stderr_tail": launcher.communicate()[1][-2000:]}  # fmt: skip
    roles = {pid: _role(pid) for pid in _processes(marker)}
    target = {
        "term-launcher": (launcher.pid, signal.SIGTERM),
        "int-launcher": (launcher.pid, signal.SIGINT),
        "kill-launcher": (launcher.pid, signal.SIGKILL),
        "kill-agent": (next(p for p, r in roles.items() if r == "agent"), signal.SIGKILL),
        "kill-worker": (next(p for p, r in roles.items() if r == "rank1"), signal.SIGKILL),
        "stop-worker": (next(p for p, r in roles.items() if r == "rank1"), signal.SIGSTOP),
    }[kind]
    started = time.monotonic()
    os.kill(*target)
    wait = 75.0 if kind == "stop-worker" else 60.0
    if kind == "kill-launcher":
        launcher.wait(timeout=10)
        stderr, code, exited = "", None, True
        clean_processes = _gone(marker, 40)
    else:
        try:
            stderr = launcher.communicate(timeout=wait)[1]
            code, exited = launcher.returncode, True
        except subprocess.TimeoutExpired:
            launcher.kill()
            stderr, code, exited = launcher.communicate()[1], None, False
        clean_processes = exited and _gone(marker, 20)
    ended_s = time.monotonic() - started
    left = _processes(marker)
    for pid in left:  # whatever is left goes, so that the next trial starts alone
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    said = {
        "term-launcher": "--resume" in stderr,
        "int-launcher": "--resume" in stderr,
        "kill-launcher": True,
        "kill-agent": "agent" in stderr.splitlines()[-1] if stderr.strip() else False,
        "kill-worker": bool(re.search(r"\brank 1\b", stderr.strip().splitlines()[-1]))
        if stderr.strip()
        else False,
        "stop-worker": bool(re.search(r"\brank 1\b", stderr)),
    }[kind]
    nonzero = kind == "kill-launcher" or (code is not None and code != 0)
    return {
        "kind": kind,
        "clean": bool(exited and clean_processes and said and nonzero),
        "launcher_exit": code,
        "exited_in_time": exited,
        "no_process_left": clean_processes,
        "message": said,
        "seconds_to_end": round(ended_s, 1),
        "left_running": len(left),
        "last_line": stderr.strip().splitlines()[-1][:300] if stderr.strip() else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3, help="trials per kind")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="the bigbatch to test")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/process_trials.json")
    args = parser.parse_args()
    src = args.src.resolve()
    revision = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"],
                              capture_output=True, text=True).stdout.strip()  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory(prefix="bigbatch-trials-") as work:
        for trial in range(args.trials):
            for kind in args.kinds:
                result = _trial(kind, src, Path(work))
                result["trial"] = trial
                print(json.dumps(result), flush=True)
                results.append(result)
    summary = {
        kind: f"{sum(r['clean'] for r in results if r['kind'] == kind)}"
        f"/{sum(r['kind'] == kind for r in results)}"
        for kind in args.kinds
    }
    report = {
        "benchmark": "process_trials",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date_utc": utc_iso(),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "bigbatch_revision": revision,
        "clean_ends": summary,
        "trials": results,
    }
    write_results(args.out, report, indent=1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
