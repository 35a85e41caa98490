"""The sweep plot: a missed target is drawn above every reached point (not at "1 step"), in
the colour of its own optimizer's line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pytest

from bigbatch.train import plots


def test_missed_targets_sit_above_reached_points_in_their_own_colour(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    figures: list[Any] = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    curves = {"a": [(1024, 40), (4096, None)], "b": [(1024, 60), (4096, 30)], "c": [(1024, None)]}
    out = plots.plot_scaling(curves, tmp_path / "s.png", target=0.8, title="t")
    assert out.read_bytes()[:4] == b"\x89PNG"
    ax = figures[0].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    marks = {c.get_label(): c for c in ax.collections}
    assert set(marks) == {"a: not reached", "c: not reached"}
    for label, mark in marks.items():
        (y,) = {float(p[1]) for p in mark.get_offsets()}
        assert y > 60  # above every reached point
        name = label.split(":")[0]
        if name in lines:
            assert tuple(mark.get_facecolor()[0][:3]) == pytest.approx(
                plt.matplotlib.colors.to_rgb(lines[name].get_color())
            )
    colours = [tuple(m.get_facecolor()[0][:3]) for m in marks.values()]
    assert len(set(colours)) == 2  # never another optimizer's colour
