"""Where a result was measured: CPU model, cores, versions and git revision.

One description for the benchmarks' results files and the harness's reports.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import bigbatch

__all__ = ["available_cpus", "cpu_model", "git_revision", "machine_info"]


def machine_info(
    torch_threads: int, versions: Mapping[str, str | None] | None = None
) -> dict[str, Any]:
    """CPU, cores available, platform, versions and git revision, for a results file.

    ``versions``: more packages' versions (e.g. a peer implementation a benchmark compares
    against), listed after bigbatch's.
    """
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": available_cpus(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch_threads,
        "torch_interop_threads": torch.get_num_interop_threads(),
        "bigbatch": bigbatch.__version__,
        **(versions or {}),
        "git_revision": git_revision(),
    }


def available_cpus() -> int | None:
    """The CPUs this process may run on (its affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_revision(root: Path | None = None) -> str | None:
    """The checkout's commit (``-dirty`` with uncommitted changes), None outside git."""
    root = root if root is not None else Path.cwd()
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("-dirty" if dirty else "")
