"""PNG plots of runs: test accuracy against steps, and steps to target against batch size.

matplotlib with the non-interactive Agg backend (no display needed). Not here: choosing
which runs to plot (``experiments.py``, ``report.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bigbatch.train.results import RunResult

__all__ = ["plot_accuracy", "plot_scaling"]


def plot_accuracy(
    runs: Mapping[str, RunResult], path: str | Path, *, target: float | None, title: str
) -> Path:
    """Test accuracy against optimizer steps, one line per labelled run."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, run in runs.items():
        points = [(r["step"], r["test_acc"]) for r in run.history if r.get("test_acc") is not None]
        if points:
            steps, accs = zip(*points, strict=True)
            ax.plot(steps, accs, marker="o", markersize=3, label=label)
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
    accs_all = [
        r["test_acc"] for run in runs.values() for r in run.history if r.get("test_acc") is not None
    ]
    if accs_all:
        top = max(accs_all)
        ax.set_ylim(max(0.0, min(top - 0.25, (target or top) - 0.05)), min(1.0, top + 0.02))
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_scaling(
    curves: Mapping[str, Sequence[tuple[int, int | None]]],
    path: str | Path,
    *,
    target: float,
    title: str,
) -> Path:
    """Steps to ``target`` against batch size (log-log), with perfect linear scaling."""
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    reference: tuple[int, int] | None = None
    misses: list[tuple[str, list[int], Any]] = []
    # one colour and line style per optimizer (the cycle's), reached or not
    styles = [dict(s) for s in plt.rcParams["axes.prop_cycle"]]
    for k, (label, points) in enumerate(curves.items()):
        reached = [(b, s) for b, s in points if s is not None]
        style = styles[k % len(styles)]
        color = style.get("color", f"C{k % 10}")
        if reached:
            xs, ys = zip(*reached, strict=True)
            ax.plot(xs, ys, marker="o", label=label, color=color, ls=style.get("linestyle", "-"))
            if reference is None or reached[0][0] < reference[0]:
                reference = reached[0]
        else:
            ax.plot([], [], marker="x", ls="none", color=color, label=f"{label} (never)")
        missed = [b for b, s in points if s is None]
        if missed:
            misses.append((label, missed, color))
    # a missed target is drawn above every reached point, in its optimizer's own colour
    ceiling = 2 * max((s for pts in curves.values() for _, s in pts if s is not None), default=1)
    for label, missed, color in misses:
        ax.scatter(
            missed, [ceiling] * len(missed), marker="x", color=color, label=f"{label}: not reached"
        )
    if misses:
        ax.axhline(ceiling, color="gray", lw=0.5, ls="--")
        ax.annotate("x: target not reached", (0.01, ceiling), xycoords=("axes fraction", "data"),
                    fontsize=7, va="bottom", color="gray")  # fmt: skip
    if reference is not None:
        b0, s0 = reference
        batches = sorted({b for pts in curves.values() for b, _ in pts if b >= b0})
        ax.plot(batches, [s0 * b0 / b for b in batches], "k:", label="perfect scaling")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"steps to test accuracy {target:g}")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    # the lines only: an optimizer once, its misses shown by the x marks in its colour
    handles = [h for h in ax.get_lines() if not str(h.get_label()).startswith("_")]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
