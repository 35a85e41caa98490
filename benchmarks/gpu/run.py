"""The prepared GPU run (issue 16): prove the CUDA path and measure it, in one go.

On a machine with CUDA, within about 8 minutes, each step bounded by its own timeout and
recorded even when it fails (a failing step never hides the others):

1. ``env``: GPU, driver, CUDA, torch, Python, the bigbatch revision -> ``env.json``;
2. ``cuda_tests``: ``pytest -m cuda tests/test_cuda.py`` (CUDA equals CPU in float64 for
   SPNGD, NLCG, NLCG-K-FAC; bf16 autocast; NCCL world of one through the hybrid path and
   DDP; torch.compile on CUDA; no host sync in a steady-state step) -> ``cuda_tests.json``;
3. ``b1``: ``step_cost.py``, step time and peak memory per optimizer on ResNet-20 (batch 256
   and 1024) and the char-LM transformer, with the issue's targets -> ``b1_gpu.json``;
4. ``b3``: CIFAR-10 (JPEG) ResNet-20 at batch 8K, 10 epochs, momentum / LAMB / SP-NGD /
   NLCG-K-FAC at the learning rates of the CPU study's centres, one seed (``convergence.py
   --budget gpu-short``) -> ``b3.json`` and ``b3.md``;

and ``summary.json`` (each step's status, seconds and output tail) plus ``run.log``: seven
files, inside what the device tool brings back. torch is the machine's own CUDA build (this
workplace's GPU image has one and cannot download; its version is recorded); the
pure-Python packages it lacks travel as wheels (``fetch_wheels.sh``, installed by
``run.sh``). ``--dry-run`` runs the same steps on the CPU at tiny sizes in about a minute
(the CUDA tests skip, saying why; B3 runs the ``tiny`` budget), tested in CI so the
script cannot rot between GPU runs. Its figures are no figures.

    bash benchmarks/gpu/run.sh --out "$OUT" --data-dir gpu_data     # on the GPU machine
    bash benchmarks/gpu/run.sh --dry-run --out /tmp/gpu              # here
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
#: seconds per step on the GPU (about 8 minutes in all) and in a dry run
TIMEOUTS = {"cuda_tests": 150, "b1": 150, "b3": 180}
DRY_TIMEOUTS = {"cuda_tests": 60, "b1": 120, "b3": 120}


def _run(cmd: list[str], timeout: float, log: Path) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        done = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=os.environ
        )
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        status = f"timed out after {timeout:.0f} s"
        output = (
            (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        )
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n{output}\n[{status}]\n")
    return {
        "command": " ".join(cmd),
        "status": status,
        "seconds": round(time.perf_counter() - started, 1),
        "output_tail": output[-1500:],
    }


def environment() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        }
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        info["nvidia_smi"] = smi.stdout.strip()
    rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    info["bigbatch_revision"] = rev.stdout.strip() or "unknown (no git here)"
    return info


def _junit_summary(path: Path) -> dict[str, Any]:
    """Counts and the names of failed or skipped tests from pytest's JUnit XML."""
    import xml.etree.ElementTree as ET

    if not path.is_file():
        return {"junit": "missing"}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None
    cases = []
    for case in suite.iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = f"{tag}: {(node.get('message') or '')[:300]}"
        cases.append({"test": case.get("name"), "seconds": case.get("time"), "outcome": outcome})
    return {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped", "time")} | {
        "cases": cases
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="where the files go ($OUT)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, about a minute")
    p.add_argument("--data-dir", default=None, help="holds cifar10-jpeg.tar.xz")
    args = p.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"bigbatch-gpu-{os.getpid()}"
    log = out / "run.log"
    log.write_text("")
    data_dir = args.data_dir or next(
        (str(d) for d in (ROOT.parent / "shared" / "data", ROOT / "gpu_data") if d.is_dir()), None
    )
    timeouts = DRY_TIMEOUTS if args.dry_run else TIMEOUTS
    py = sys.executable
    summary: dict[str, Any] = {"dry_run": args.dry_run, "steps": {}}

    env = environment()
    (out / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    summary["steps"]["env"] = {"status": "ok"}
    if not args.dry_run and not env["cuda_available"]:
        summary["steps"]["env"] = {"status": "no CUDA device: nothing to measure (--dry-run?)"}
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print("no CUDA device here; run with --dry-run on a CPU")
        return 2

    junit = work / "cuda_tests.xml"
    work.mkdir(parents=True, exist_ok=True)
    step = _run(
        [py, "-m", "pytest", "-q", "-rs", "-m", "cuda", "tests/test_cuda.py",
         f"--junitxml={junit}", "-p", "no:cacheprovider"],
        timeouts["cuda_tests"], log,
    )  # fmt: skip
    if "exit 5" in step["status"]:
        step["status"] = "failed: no test collected"
    (out / "cuda_tests.json").write_text(json.dumps(_junit_summary(junit), indent=1) + "\n")
    summary["steps"]["cuda_tests"] = step

    b1 = [py, str(HERE / "step_cost.py"), "--out", str(out / "b1_gpu.json")]
    summary["steps"]["b1"] = _run(b1 + (["--dry-run"] if args.dry_run else []), timeouts["b1"], log)

    b3_results = work / "b3"
    b3 = [py, str(ROOT / "benchmarks" / "convergence.py"), "--task", "cifar10-resnet20",
          "--out", str(work / "b3_runs"), "--results", str(b3_results), "--tag", "gpu",
          "--cache-dir", str(work / "cache")]  # fmt: skip
    if data_dir is not None:
        b3 += ["--data-dir", data_dir]
    b3 += (
        ["--budget", "tiny", "--device", "cpu", "--contenders", "momentum"]
        if args.dry_run
        else ["--budget", "gpu-short", "--device", "cuda"]
    )
    summary["steps"]["b3"] = _run(b3, timeouts["b3"], log)
    for produced, name in ((".json", "b3.json"), (".md", "b3.md")):
        found = sorted(b3_results.glob(f"*_gpu{produced}"))
        if found:
            shutil.copy(found[0], out / name)

    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for name, s in summary["steps"].items():
        print(f"{name:>10}: {s['status']}" + (f" ({s['seconds']} s)" if "seconds" in s else ""))
    return 0 if all(s["status"] == "ok" for s in summary["steps"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
