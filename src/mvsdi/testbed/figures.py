"""A study's figures: the metrics along the runs and against budget, the variance ratios, and the
turntable GIFs with each panel captioned by its method and final metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mvsdi.plotting import save_figure, subplots
from mvsdi.statistics import mean_interval
from mvsdi.testbed.settings import BASELINE, METHODS, METHODS_BY_NAME, METRICS, Method
from mvsdi.testbed.tables import variance_summary

# One colour per method, keyed by name, in every figure: by position in a plot the colours would
# shift between figures that leave K1 out (the variance ratios) and those that show it.
METHOD_COLOURS = dict(zip(METHODS_BY_NAME, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple",
                                            "tab:brown", "tab:pink")))


def _present(rows: list[dict[str, Any]]) -> list[Method]:
    """The methods that appear in ``rows``, in METHODS order."""
    names = {r["method"] for r in rows}
    return [m for m in METHODS if m.name in names]


def plot_metric_vs_budget(results: list[dict[str, Any]], out: Path) -> Path:
    """Each metric along the runs of the study's largest budget (mean over scenes and seeds)."""
    largest = max(r["budget"] for r in results)
    results = [r for r in results if r["budget"] == largest]
    guidances = list(dict.fromkeys(r["guidance"] for r in results))
    fig, axes = subplots(len(guidances), len(METRICS), figsize=(4 * len(METRICS), 3.2 * len(guidances)))
    for gi, guidance in enumerate(guidances):
        for mi, metric in enumerate(METRICS):
            ax = axes[gi][mi]
            for method in _present(results):
                cells = [r for r in results if r["guidance"] == guidance and r["method"] == method.name]
                fractions = sorted({r["fraction"] for r in cells})
                means = [mean_interval([r[metric] for r in cells if r["fraction"] == f])[0] for f in fractions]
                ax.plot(fractions, means, marker="o", label=method.name, color=METHOD_COLOURS[method.name])
            ax.set_title(f"{guidance}: {metric}")
            ax.set_xlabel(f"fraction spent of {largest} evaluations")
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, out / "metrics_vs_budget.png", dpi=110)


def plot_budget_axis(table: list[dict[str, Any]], out: Path) -> Path:
    """Top row per guidance: K1's metric at the end of runs of each budget (mean ± 95% interval over
    scenes and seeds); the rows below: each method's paired difference against K1 at that budget
    (± 95% interval), zero marked: where K > 1 loses for lack of steps and where it wins by less
    noise, if anywhere. Paired, because the scenes' own levels differ far more than the methods."""
    guidances = list(dict.fromkeys(r["guidance"] for r in table))
    fig, axes = subplots(2 * len(guidances), len(METRICS),
                         figsize=(4 * len(METRICS), 2.8 * 2 * len(guidances)))
    budgets = sorted({r["budget"] for r in table})
    for gi, guidance in enumerate(guidances):
        for mi, metric in enumerate(METRICS):
            level, difference = axes[2 * gi][mi], axes[2 * gi + 1][mi]
            for slot, method in enumerate(_present(table)):
                rows = sorted((r for r in table if r["guidance"] == guidance and r["method"] == method.name),
                              key=lambda r: r["budget"])
                x = np.array([r["budget"] for r in rows]) * (1.0 + 0.03 * (slot - 1))  # side by side
                ax, key = (level, metric) if method.name == BASELINE else (difference, f"{metric}_vs_K1")
                means, halves = (np.array([r[key][i] for r in rows]) for i in range(2))
                ax.errorbar(x, means, yerr=np.nan_to_num(halves), marker="o", capsize=3, label=method.name,
                            color=METHOD_COLOURS[method.name])
            difference.axhline(0.0, color="k", lw=0.8)
            level.set_title(f"{guidance}: {metric}, K1")
            difference.set_title(f"{guidance}: Δ{metric} vs K1 (paired)")
            for ax in (level, difference):
                ax.set_xscale("log")
                ax.set_xticks(budgets, [str(b) for b in budgets])
                ax.minorticks_off()
            difference.set_xlabel("budget (guidance evaluations)")
    axes[1][0].legend(fontsize=7)
    return save_figure(fig, out / "metrics_vs_budget_axis.png", dpi=110)


def plot_variance(variance: list[dict[str, Any]], out: Path) -> Path:
    """Variance ratio to K=1 against the fraction of the K=1 run where it was measured (log scale,
    95% intervals as error bars), one panel per guidance."""
    summary = variance_summary(variance)
    guidances = list(dict.fromkeys(v["guidance"] for v in variance))
    fig, axes = subplots(1, len(guidances), figsize=(5 * len(guidances), 3.6))
    for ax, guidance in zip(axes[0], guidances):
        for slot, method in enumerate(_present(variance)[1:]):
            points = sorted((f, r) for (g, m, f), r in summary.items() if g == guidance and m == method.name)
            fractions = np.array([f for f, _ in points]) + 0.01 * (slot - 2)  # side by side, so the bars stay apart
            ratio, low, high = (np.array([r[i] for _, r in points]) for i in range(3))
            ax.errorbar(fractions, ratio, yerr=np.nan_to_num([ratio - low, high - ratio]), marker="o", capsize=3,
                        label=method.name, color=METHOD_COLOURS[method.name])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{guidance}: variance per evaluation / K1")
        ax.set_xlabel("fraction of the K=1 run")
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, out / "variance_ratio.png", dpi=110)


# the metrics in the turntables' captions: label and number format
CAPTION_METRICS = (("psnr", "PSNR", ".1f"), ("iou", "IoU", ".2f"), ("r_precision", "R-prec", ".2f"),
                   ("janus", "Janus", ".2f"))


def method_caption(method: str, row: dict[str, Any]) -> list[str]:
    """Three caption lines for a method's turntable panel: its name and the metrics of ``row``."""
    parts = [f"{label} {row[key]:{fmt}}" for key, label, fmt in CAPTION_METRICS]
    name = method + (" (diverged)" if row.get("diverged") else "")
    if row.get("fraction", 1.0) != 1.0:  # the panel shows the end of the run, the metrics an earlier point
        name += f", metrics at {row['fraction']:g}"
    return [name, "  ".join(parts[:2]), "  ".join(parts[2:])]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1)
    except TypeError:  # older Pillow: its one bitmap font
        return ImageFont.load_default()


def caption_strips(captions: list[list[str]], width: int) -> list[np.ndarray]:
    """One uint8 strip [h, width, 3] per caption (white lines on dark grey), all of one height and
    font size: the largest size at which the longest line of any caption fits in ``width``."""
    lines = max(len(c) for c in captions)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    size = next((n for n in range(12, 5, -1)
                 if max(measure.textlength(t, font=_font(n)) for c in captions for t in c) <= width - 4), 6)
    font, step = _font(size), size + 3
    strips = []
    for caption in captions:
        image = Image.new("RGB", (width, step * lines + 4), (32, 32, 32))
        draw = ImageDraw.Draw(image)
        for i, text in enumerate(caption):
            draw.text((2, 2 + i * step), text, fill=(255, 255, 255), font=font)
        strips.append(np.asarray(image))
    return strips


def write_turntables(frames: dict[tuple[str, str], dict[str, np.ndarray]], out: Path,
                     captions: dict[tuple[str, str], dict[str, list[str]]] | None = None,
                     min_side: int = 128) -> list[Path]:
    """One GIF per (guidance, scene): the methods side by side, truth first, enlarged (nearest
    neighbour) to at least ``min_side`` pixels so small renders can be inspected, each panel under
    its caption (default: the panel's name)."""
    paths = []
    for key, by_method in frames.items():
        (guidance, scene), names = key, list(by_method)
        panels = [by_method[n] for n in names]
        scale = max(1, -(-min_side // panels[0].shape[1]))
        panels = [p.repeat(scale, axis=1).repeat(scale, axis=2) for p in panels]
        texts = [(captions or {}).get(key, {}).get(n, [n]) for n in names]
        strips = caption_strips(texts, panels[0].shape[2])
        labelled = [np.concatenate([np.broadcast_to(s, (len(p), *s.shape)), p], axis=1) for s, p in zip(strips, panels)]
        path = out / f"turntable_{guidance}_{scene}.gif"
        iio.imwrite(path, np.concatenate(labelled, axis=2), duration=80, loop=0)  # [V, h + H, W·methods, 3]
        paths.append(path)
    return paths


