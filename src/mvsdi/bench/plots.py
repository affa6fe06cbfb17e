"""The bench's figures: per-metric bars with 95% intervals, per-prompt scatter against the baseline,
and the convergence curves with their 95% bands; one colour per preset in all of them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from mvsdi.plotting import save_figure, subplots

Bounds = tuple[Optional[float], Optional[float]]  # a metric's possible values; None: unbounded that way

# Where each metric's values can lie (a mean ± t-interval over few cells can run past them).
# ``clip_iqa`` stands for its parts ``clip_iqa_*``; a metric not listed is unbounded.
TESTBED_RANGES: dict[str, Bounds] = {"psnr": (0.0, None), "iou": (0.0, 1.0), "r_precision": (0.0, 1.0),
                                     "janus": (0.0, 1.0)}  # psnr >= 0: images in [0, 1]; janus: a share of views
CLIP_RANGES: dict[str, Bounds] = {"clip_score": (-1.0, 1.0), "r_precision": (0.0, 1.0), "clip_iqa": (0.0, 1.0),
                                  "janus": (-1.0, 1.0)}  # clip_score and janus: cosines; clip_iqa: probabilities


def metric_range(metric: str, ideal: bool) -> Bounds:
    table = TESTBED_RANGES if ideal else CLIP_RANGES
    return next((r for name, r in table.items() if metric == name or metric.startswith(name + "_")), (None, None))


def clipped_error_bars(means: Sequence[float], halves: Sequence[float], bounds: Bounds) -> np.ndarray:
    """[2, N] (below, above) lengths of the bars mean ± half, cut at the metric's bounds (0 for a nan half)."""
    mean = np.asarray(means, dtype=float)
    half = np.nan_to_num(np.asarray(halves, dtype=float))
    low, high = bounds
    lower = mean - half if low is None else np.maximum(mean - half, low)
    upper = mean + half if high is None else np.minimum(mean + half, high)
    return np.stack([np.maximum(mean - lower, 0.0), np.maximum(upper - mean, 0.0)])


def _range_text(bounds: Bounds) -> str:
    low, high = ("-∞" if bounds[0] is None else f"{bounds[0]:g}"), ("∞" if bounds[1] is None else f"{bounds[1]:g}")
    return f"[{low}, {high}]"


def preset_colours(presets: Sequence[str]) -> dict[str, str]:
    """One colour per preset, the same in every bench figure."""
    return {name: f"C{i % 10}" for i, name in enumerate(presets)}


def plot_bars(summary: Sequence[dict[str, Any]], metrics: Sequence[str], out: Path,
              ranges: dict[str, Bounds] | None = None) -> Path | None:
    """One panel per metric, one bar per preset (mean over "ok" cells), error bars the 95% interval
    drawn only within the metric's range (``ranges``; the caption says so)."""
    if not metrics:
        return None
    fig, axes = subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6))
    names = [e["preset"] for e in summary]
    colours = preset_colours(names)
    for ax, metric in zip(axes[0], metrics):
        bounds = (ranges or {}).get(metric, (None, None))
        means = [e[metric][0] for e in summary]
        bars = clipped_error_bars(means, [e[metric][1] for e in summary], bounds)
        ax.bar(range(len(names)), means, yerr=bars, capsize=4, color=[colours[n] for n in names])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(metric if bounds == (None, None) else f"{metric} in {_range_text(bounds)}")
    fig.suptitle("mean over ok cells; bars: 95% interval (Student t), cut at the metric's range", fontsize=9)
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
    colours = preset_colours(presets)
    fig, axes = subplots(len(metrics), len(others), figsize=(3.2 * len(others), 3.2 * len(metrics)))
    for i, metric in enumerate(metrics):
        base = per_prompt_means(rows, baseline, metric)
        for j, name in enumerate(others):
            other = per_prompt_means(rows, name, metric)
            shared = [p for p in base if p in other]
            ax = axes[i][j]
            xs, ys = [base[p] for p in shared], [other[p] for p in shared]
            ax.scatter(xs, ys, s=14, color=colours[name])
            if xs:
                low, high = min(xs + ys), max(xs + ys)
                ax.plot([low, high], [low, high], color="grey", lw=0.8)  # above the line: better than the baseline
            ax.set_xlabel(f"{baseline}")
            ax.set_ylabel(f"{name}")
            ax.set_title(metric, fontsize=9)
    return save_figure(fig, out)


CONVERGENCE_AXES = {"guidance_evaluations": "guidance evaluations spent",
                    "unet_forward_passes": "UNet forward passes spent (batch elements)"}


def interval_band(means: Sequence[float], halves: Sequence[float], bounds: Bounds) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) edges of mean ± half, cut at the metric's bounds; no band (the mean) where half is nan."""
    mean = np.asarray(means, dtype=float)
    below, above = clipped_error_bars(means, halves, bounds)
    return mean - below, mean + above


def plot_convergence(curves: Sequence[dict[str, Any]], presets: Sequence[str], out: Path) -> Path | None:
    """Two panels, the front view's CLIP score against guidance evaluations and against UNet forward
    passes: per preset its mean over "ok" cells, shaded its 95% interval (cut at [-1, 1])."""
    if not curves:
        return None
    colours = preset_colours(presets)
    fig, axes = subplots(1, 2, figsize=(9, 3.6))
    for ax, (key, label) in zip(axes[0], CONVERGENCE_AXES.items()):
        for name in presets:
            mine = [c for c in curves if c["preset"] == name]
            if not mine:
                continue
            xs = [c[key] for c in mine]
            means, halves = [c["clip_score"][0] for c in mine], [c["clip_score"][1] for c in mine]
            low, high = interval_band(means, halves, CLIP_RANGES["clip_score"])
            ax.plot(xs, means, marker="o", ms=3, color=colours[name], label=name)
            ax.fill_between(xs, low, high, color=colours[name], alpha=0.2, lw=0)
        ax.set_xlabel(label)
        ax.set_ylabel("CLIP score, front view")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("mean over ok cells; band: 95% interval (Student t), cut at [-1, 1]", fontsize=9)
    return save_figure(fig, out)
