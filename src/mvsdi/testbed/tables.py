"""A study's results as tables: per method, each metric's mean and 95% interval, the paired
differences against K1 with their verdicts, and the gradient-variance ratios (markdown and CSV)."""

from __future__ import annotations

import math
from typing import Any

from mvsdi.statistics import mean_interval, paired_verdict
from mvsdi.testbed.settings import BASELINE, METHODS, METHODS_BY_NAME, METRICS, StudySettings
from mvsdi.variance import MIN_BOOTSTRAP_REPEATS

# which way each metric improves (the verdicts' direction)
HIGHER_IS_BETTER = {"r_precision": True, "psnr": True, "iou": True, "janus": False}


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (guidance, budget, method) at the end of the budget: each metric's mean ± 95% interval,
    the mean paired difference against K1 on the same scene and seed (± 95% t-interval over the
    pairs), and its verdict (``statistics.paired_verdict``)."""
    final = [r for r in results if r["fraction"] == 1.0]
    key = lambda r: (r["guidance"], r["budget"], r["scene"], r["seed"])  # noqa: E731
    baseline = {key(r): r for r in final if r["method"] == BASELINE}
    table = []
    for guidance in dict.fromkeys(r["guidance"] for r in final):
        for budget in sorted({r["budget"] for r in final}):
            for method in METHODS_BY_NAME:
                cells = [r for r in final if (r["guidance"], r["budget"], r["method"]) == (guidance, budget, method)]
                if not cells:
                    continue
                paired = [r for r in cells if key(r) in baseline]
                row: dict[str, Any] = {"guidance": guidance, "budget": budget, "method": method, "cells": len(cells),
                                       "pairs": len(paired), "diverged": sum(bool(r["diverged"]) for r in cells)}
                for metric in METRICS:
                    row[metric] = mean_interval([r[metric] for r in cells])
                    row[f"{metric}_vs_K1"] = mean_interval([r[metric] - baseline[key(r)][metric] for r in paired])
                    row[f"{metric}_verdict"] = ("baseline" if method == BASELINE else
                                                paired_verdict(row[f"{metric}_vs_K1"], HIGHER_IS_BETTER[metric]))
                table.append(row)
    return table


def summarise_equal_steps(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """K-view runs against K1 runs of as many optimiser steps (K1 at budget B/K, same guidance, scene
    and seed), where the study has such budgets: at equal steps a K-view step averages K views, so
    this isolates what the views buy from what the steps cost. Same fields as ``summarise``, with
    "steps" instead of "budget"."""
    final = [r for r in results if r["fraction"] == 1.0]
    k1 = {(r["guidance"], r["budget"], r["scene"], r["seed"]): r for r in final if r["method"] == BASELINE}
    table = []
    for guidance in dict.fromkeys(r["guidance"] for r in final):
        for method in [m for m in METHODS if m.views > 1]:
            by_steps: dict[int, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
            for r in final:
                if (r["guidance"], r["method"]) != (guidance, method.name) or r["budget"] % method.views:
                    continue
                steps = r["budget"] // method.views
                if (baseline := k1.get((guidance, steps, r["scene"], r["seed"]))) is not None:
                    by_steps.setdefault(steps, []).append((r, baseline))
            for steps, pairs in sorted(by_steps.items()):
                row: dict[str, Any] = {"guidance": guidance, "steps": steps, "method": method.name, "pairs": len(pairs)}
                for metric in METRICS:
                    row[f"{metric}_vs_K1"] = mean_interval([r[metric] - b[metric] for r, b in pairs])
                    row[f"{metric}_verdict"] = paired_verdict(row[f"{metric}_vs_K1"], HIGHER_IS_BETTER[metric])
                table.append(row)
    return table


def _fmt(pair: tuple[float, float], signed: bool = False) -> str:
    mean, half = pair
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return text if math.isnan(half) else f"{text} ± {half:.3f}"


def table_markdown(table: list[dict[str, Any]]) -> str:
    """Two tables: each metric's mean ± 95% interval; then the paired differences against K1 with
    their verdicts (better / worse / n.d. = not distinguishable at 95%), unless K1 is the only method."""
    head = ["guidance", "budget", "method", "steps", "cells", "diverged", *METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        steps = row["budget"] // METHODS_BY_NAME[row["method"]].views
        lines.append("| " + " | ".join([row["guidance"], str(row["budget"]), row["method"], str(steps),
                                         str(row["cells"]), str(row["diverged"]),
                                         *(_fmt(row[m]) for m in METRICS)]) + " |")
    others = [r for r in table if r["method"] != BASELINE]
    if not others:  # K1 alone: nothing to pair
        return "\n".join(lines) + "\n"
    head = ["guidance", "budget", "method", "pairs", *(f"Δ{m} vs K1" for m in METRICS)]
    lines += ["", "Paired differences against K1 (same guidance, budget, scene and seed), mean ± 95% t-interval "
              "over the pairs, and the verdict (Janus: lower is better):", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += _difference_rows(others, "budget")
    return "\n".join(lines) + "\n"


def equal_steps_markdown(table: list[dict[str, Any]]) -> str:
    """``summarise_equal_steps`` as a table ('' when the study's budgets give no such pairs)."""
    if not table:
        return ""
    head = ["guidance", "steps", "method", "pairs", *(f"Δ{m} vs K1" for m in METRICS)]
    lines = ["At equal optimiser steps: each K-view run against the K1 run of budget / K (same guidance, scene and "
             "seed), mean ± 95% t-interval and verdict:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + _difference_rows(table, "steps")) + "\n"


def _difference_rows(table: list[dict[str, Any]], axis: str) -> list[str]:
    short = {"not distinguishable": "n.d."}
    return ["| " + " | ".join([row["guidance"], str(row[axis]), row["method"], str(row["pairs"]),
                               *(f"{_fmt(row[f'{m}_vs_K1'], signed=True)} "
                                 f"**{short.get(row[f'{m}_verdict'], row[f'{m}_verdict'])}**" for m in METRICS)]) + " |"
            for row in table]


def variance_summary(variance: list[dict[str, Any]]) -> dict[tuple[str, str, float], tuple[float, float, float]]:
    """(guidance, method, fraction) → (ratio, 95% low, 95% high) over the measured scenes.

    The ratio is the geometric mean over scenes; its interval is exp(mean log ± 1.96·SE) with SE
    from each scene's paired-bootstrap standard error of the log ratio (repeat noise only, so
    it says how well these scenes were measured, not how other scenes would behave)."""
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for v in variance:
        groups.setdefault((v["guidance"], v["method"], v["fraction"]), []).append(v)
    summary = {}
    for key, rows in groups.items():
        logs = [math.log(r["ratio"]) if r["ratio"] > 0 else float("nan") for r in rows]
        centre = sum(logs) / len(logs)
        half = 1.96 * math.sqrt(sum(r["log_ratio_se"] ** 2 for r in rows)) / len(rows)
        summary[key] = (math.exp(centre), math.exp(centre - half), math.exp(centre + half))
    return summary


def _interval_text(low: float, high: float, repeats: int | None) -> str:
    """'[low, high]', or why there is none (instead of '[nan, nan]')."""
    if math.isfinite(low) and math.isfinite(high):
        return f"[{low:.2f}, {high:.2f}]"
    if repeats is not None and repeats < MIN_BOOTSTRAP_REPEATS:
        return f"[n/a: R={repeats} < {MIN_BOOTSTRAP_REPEATS}]"
    return "[n/a: a zero-variance draw set]"


def variance_markdown(variance: list[dict[str, Any]]) -> str:
    """Variance per evaluation / K1's, one column per point of the K=1 run, '[95% interval]'."""
    summary = variance_summary(variance)
    repeats = min((v["repeats"] for v in variance if "repeats" in v), default=None)
    fractions = sorted({key[2] for key in summary})
    head = ["guidance", "method", *(f"at {f:g} of the run" for f in fractions)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for guidance in dict.fromkeys(v["guidance"] for v in variance):
        for method in [m.name for m in METHODS]:
            cells = [summary.get((guidance, method, f)) for f in fractions]
            if not any(cells):
                continue
            text = ["" if c is None else f"{c[0]:.2f}" if method == METHODS[0].name  # K1/K1 is 1 exactly
                    else f"{c[0]:.2f} {_interval_text(c[1], c[2], repeats)}" for c in cells]
            lines.append("| " + " | ".join([guidance, method, *text]) + " |")
    return "\n".join(lines) + "\n"


def study_markdown(table: list[dict[str, Any]], variance: list[dict[str, Any]], settings: StudySettings,
                   equal_steps: list[dict[str, Any]] = (), coverage: str | None = None) -> str:
    """The tables; ``coverage`` (a study with a time limit: how many blocks ran, why it stopped) first."""
    text = table_markdown(table) + ("\n" + equal_steps_markdown(equal_steps) if equal_steps else "")
    if coverage:
        text = (f"Blocks that ran: {coverage}. Every table and verdict below is over the complete blocks "
                "only.\n\n" + text)
    if not variance:
        return text
    scenes = ", ".join(sorted({v["scene"] for v in variance}))
    return (text + "\nGradient variance per guidance evaluation / K=1's, at the parameters of the "
            f"K=1 run (seed {settings.seeds[0]}; {scenes}) after each fraction of its budget, R = "
            f"{settings.variance_repeats} draws per method; [95% interval, paired bootstrap over draws]:\n\n"
            + variance_markdown(variance))


def table_csv(table: list[dict[str, Any]]) -> str:
    cols = ["guidance", "budget", "method", "cells", "pairs", "diverged"]
    for m in METRICS:
        cols += [f"{m}_mean", f"{m}_ci95", f"{m}_vs_K1_mean", f"{m}_vs_K1_ci95", f"{m}_verdict"]
    lines = [",".join(cols)]
    for row in table:
        values = [row["guidance"], str(row["budget"]), row["method"], str(row["cells"]), str(row["pairs"]),
                  str(row["diverged"])]
        for m in METRICS:
            values += [f"{row[m][0]:.6g}", f"{row[m][1]:.6g}", f"{row[m + '_vs_K1'][0]:.6g}",
                       f"{row[m + '_vs_K1'][1]:.6g}", row[m + "_verdict"]]
        lines.append(",".join(values))
    return "\n".join(lines) + "\n"

