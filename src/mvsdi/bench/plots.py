"""The bench's figures: per-metric bars with 95% intervals, and per-prompt scatter against the baseline."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from mvsdi.plotting import pyplot, save_figure


def plot_bars(summary: Sequence[dict[str, Any]], metrics: Sequence[str], out: Path) -> Path | None:
    """One panel per metric, one bar per preset (mean over "ok" cells), error bars the 95% interval."""
    if not metrics:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), squeeze=False)
    names = [e["preset"] for e in summary]
    for ax, metric in zip(axes[0], metrics):
        means = [e[metric][0] for e in summary]
        halves = [e[metric][1] if math.isfinite(e[metric][1]) else 0.0 for e in summary]
        ax.bar(range(len(names)), means, yerr=halves, capsize=4, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(metric)
    return save_figure(fig, out)


def per_prompt_means(rows: Sequence[dict[str, Any]], preset: str, metric: str) -> dict[str, float]:
    """Prompt → the metric's mean over that preset's "ok" seeds."""
    values: dict[str, list[float]] = {}
    for r in rows:
        value = r["metrics"].get(metric)
        if r["preset"] == preset and r["status"] == "ok" and isinstance(value, (int, float)) and math.isfinite(value):
            values.setdefault(r["prompt"], []).append(float(value))
    return {p: sum(v) / len(v) for p, v in values.items()}


def plot_scatter(rows: Sequence[dict[str, Any]], baseline: str, presets: Sequence[str], metrics: Sequence[str],
                 out: Path) -> Path | None:
    """Rows: metrics; columns: presets other than the baseline; a point per prompt (baseline, other)."""
    others = [p for p in presets if p != baseline]
    if not metrics or not others:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(metrics), len(others), figsize=(3.2 * len(others), 3.2 * len(metrics)), squeeze=False)
    for i, metric in enumerate(metrics):
        base = per_prompt_means(rows, baseline, metric)
        for j, name in enumerate(others):
            other = per_prompt_means(rows, name, metric)
            shared = [p for p in base if p in other]
            ax = axes[i][j]
            xs, ys = [base[p] for p in shared], [other[p] for p in shared]
            ax.scatter(xs, ys, s=14)
            if xs:
                low, high = min(xs + ys), max(xs + ys)
                ax.plot([low, high], [low, high], color="grey", lw=0.8)  # above the line: better than the baseline
            ax.set_xlabel(f"{baseline}")
            ax.set_ylabel(f"{name}")
            ax.set_title(metric, fontsize=9)
    return save_figure(fig, out)
