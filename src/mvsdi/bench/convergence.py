"""Per-preset convergence curves of a bench, from the cells' ``convergence.json`` (``mvsdi eval``'s).

At each validation point (a fraction of the run's steps: every preset's cells share them), the
mean CLIP score of the fixed front view over the preset's "ok" cells (prompts × seeds) with its
two-sided Student-t 95% interval, and the mean guidance evaluations and UNet forward passes spent
by then. Written to ``OUT/convergence.csv`` and ``OUT/plots/convergence.png``. Testbed cells
(``--model ideal``) have no CLIP score and no curve: ``mvsdi testbed`` measures the truth metrics
along the budget (its ``metrics_vs_budget.png``).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Sequence

from mvsdi.atomic_files import atomic_write_bytes
from mvsdi.bench.aggregate import collect
from mvsdi.bench.matrix import read_spec
from mvsdi.bench.plots import plot_convergence
from mvsdi.evaluate.convergence import CONVERGENCE_FILE
from mvsdi.statistics import mean_interval

CURVES_CSV = "convergence.csv"
CURVES_PLOT = Path("plots") / "convergence.png"
NEEDED = ("fraction", "guidance_evaluations", "unet_forward_passes", "clip_score")  # of each point
COLUMNS = ("preset", "fraction", "cells", "guidance_evaluations", "unet_forward_passes", "clip_score_mean",
           "clip_score_ci95")


def run_points(run: Path) -> list[dict[str, Any]]:
    """A run's points by fraction, the last one of each (a rollback repeats steps: the redone one counts)."""
    try:
        points = json.loads((run / CONVERGENCE_FILE).read_text())["points"]
        return list({round(p["fraction"], 9): {k: float(p[k]) for k in NEEDED} for p in points}.values())
    except (OSError, ValueError, KeyError, TypeError):
        return []  # no curve (e.g. a testbed cell) or an unreadable one: the cell adds no points


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def preset_curve(preset: str, runs: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per fraction reached by any of the preset's runs (each run's points as ``run_points``)."""
    by_fraction: dict[float, list[dict[str, Any]]] = {}
    for points in runs:
        for p in points:
            by_fraction.setdefault(round(p["fraction"], 9), []).append(p)
    return [{"preset": preset, "fraction": fraction, "cells": len(ps),
             "guidance_evaluations": _mean([p["guidance_evaluations"] for p in ps]),
             "unet_forward_passes": _mean([p["unet_forward_passes"] for p in ps]),
             "clip_score": mean_interval([p["clip_score"] for p in ps])}
            for fraction, ps in sorted(by_fraction.items())]


def curves(rows: Sequence[dict[str, Any]], presets: Sequence[str], out: Path) -> list[dict[str, Any]]:
    """Every preset's curve over its "ok" cells (``rows`` as ``aggregate.collect``: diverged cells are out)."""
    table = []
    for name in presets:
        runs = [run_points(out / r["path"]) for r in rows if r["preset"] == name and r["status"] == "ok"]
        table += preset_curve(name, [points for points in runs if points])
    return table


def curves_csv(table: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for e in table:
        mean, half = e["clip_score"]
        writer.writerow([e["preset"], f"{e['fraction']:.6g}", e["cells"], f"{e['guidance_evaluations']:.6g}",
                         f"{e['unet_forward_passes']:.6g}", f"{mean:.6g}", f"{half:.6g}"])
    return buffer.getvalue()


def write_convergence(out: Path) -> list[dict[str, Any]]:
    """OUT/convergence.csv and OUT/plots/convergence.png of the bench at ``out``; nothing when no cell has a curve."""
    spec = read_spec(out)
    table = curves(collect(spec, out), spec.presets, Path(out))
    if table:
        atomic_write_bytes(Path(out) / CURVES_CSV, curves_csv(table).encode())
        plot_convergence(table, spec.presets, Path(out) / CURVES_PLOT)
    return table
