"""What the benchmarks share: load average, peak memory, step-time summaries, dates, the
machine description and writing a results file.

The machine description is the package's one (:func:`bigbatch.train.machine.machine_info`),
imported on first use so that a script which only writes results (``process_trials.py``)
does not import torch.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = [
    "MIB",
    "load_average",
    "machine",
    "peak_rss_mib",
    "summary_ms",
    "utc_iso",
    "utc_now",
    "write_results",
]

MIB = 1024.0 * 1024.0


def load_average() -> float | None:
    """1-minute load average (includes this process); ``None`` where unsupported."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB."""
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MIB


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    """Median, min, max, mean and standard deviation of ``seconds``, in milliseconds."""
    ms = [1e3 * s for s in seconds]
    return {
        "median": statistics.median(ms),
        "min": min(ms),
        "max": max(ms),
        "mean": statistics.fmean(ms),
        "stdev": statistics.stdev(ms) if len(ms) > 1 else 0.0,
    }


def utc_now() -> str:
    """The date and minute in UTC, e.g. ``2026-12-02 03:12 UTC`` (a results file's ``date``)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def utc_iso() -> str:
    """The time in UTC, ISO 8601 to the second (a results file's ``date_utc``)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def machine(threads: int, versions: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    """:func:`bigbatch.train.machine.machine_info`: CPU, cores, versions, git revision."""
    from bigbatch.train.machine import machine_info

    return machine_info(threads, versions=versions)


def write_results(path: Path, report: Mapping[str, Any], indent: int | None = 2) -> None:
    """Write ``report`` as JSON to ``path`` (parent folders created), ending in a newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=indent) + "\n")
