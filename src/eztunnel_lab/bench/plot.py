"""PNG charts of a benchmark run (matplotlib, no display needed).

<section>.png: per metric, baseline vs plugin medians with the min..max spread of
the rounds and every sample as a dot. ratios.png: plugin/baseline per metric with
its target, green when met, red when not, grey without a target.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display, works without a terminal

import matplotlib.pyplot as plt

from eztunnel_lab.bench.metric import Metric

COLORS = {"baseline": "#8c8c8c", "plugin": "#2a7ab0"}


def section_chart(name: str, metrics: list[Metric], path: Path) -> None:
    cols = 4
    rows = max(1, math.ceil(len(metrics) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, m in zip(axes.flat, metrics, strict=False):
        sides = [(s, v) for s, v in (("baseline", m.baseline), ("plugin", m.plugin)) if v]
        for i, (side, values) in enumerate(sides):
            med = statistics.median(values)
            err = [[med - min(values)], [max(values) - med]]
            ax.bar(i, med, color=COLORS[side], yerr=err, capsize=4, width=0.6)
            ax.plot([i] * len(values), values, "o", color="black", markersize=3)
        if m.failures:
            ax.text(
                0.5,
                0.5,
                f"{len(m.failures)} run(s) FAILED\n(recorded as 0)",
                transform=ax.transAxes,
                ha="center",
                color="#c83c3c",
                fontsize=9,
            )
        ax.set_xticks(range(len(sides)), [s for s, _ in sides])
        ax.set_ylabel(m.unit)
        title = m.name.removeprefix(f"{name}_").replace("_", " ")
        if m.ratio is not None:
            title += f"\n{m.ratio:.2f}x"
        if m.target:
            title += f" (target {m.target}: {'met' if m.met else 'NOT met'})"
        ax.set_title(title, fontsize=9)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.suptitle(f"{name}: baseline vs plugin (median, min..max of rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ratios_chart(metrics: list[Metric], path: Path) -> None:
    rel = [m for m in metrics if m.ratio is not None]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rel) + 1.5))
    for i, m in enumerate(rel):
        color = {None: "#b0b0b0", True: "#3a9a3a", False: "#c83c3c"}[m.met]
        ax.barh(i, m.ratio or 0.0, color=color)
        if m.target:
            limit = float(m.target.split()[1])
            ax.plot([limit, limit], [i - 0.4, i + 0.4], color="black", linewidth=2)
        note = f" ({len(m.failures)} failed runs)" if m.failures else ""
        ax.text((m.ratio or 0.0) + 0.02, i, f"{m.ratio:.2f}x{note}", va="center", fontsize=8)
    ax.set_yticks(range(len(rel)), [m.name for m in rel], fontsize=8)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.invert_yaxis()
    ax.set_xlabel("plugin / baseline (black tick: target)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_all(sections: dict[str, list[Metric]], out: Path) -> list[str]:
    names = []
    for name, metrics in sections.items():
        if metrics:
            section_chart(name, metrics, out / f"{name}.png")
            names.append(f"{name}.png")
    every = [m for ms in sections.values() for m in ms]
    if any(m.ratio is not None for m in every):
        ratios_chart(every, out / "ratios.png")
        names.append("ratios.png")
    return names
