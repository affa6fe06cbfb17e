"""`mvsdi testbed`: K-view methods at equal budget on the weights-free ground truth.

Every cell (guidance × method × scene × seed) is one distillation with the ideal-denoiser prior,
the same loop, samplers, field and renderer as `mvsdi generate`. Metrics against the truth are
taken at several fractions of the budget. The gradient-variance ratio of each method is measured
along a training run: at the parameters of the K=1 cell (first seed) when it has spent each of
``variance_fractions`` of its budget, with the schedules at that fraction. Outputs: results.jsonl
(one line per cell and fraction), variance.json, table.md / table.csv (mean and 95% interval per
metric, paired differences against K=1; variance ratios per fraction), plots (one colour per method
in all of them), turntable GIFs (each panel captioned with its method and final metrics), and, when
run by ``mvsdi testbed``, log.jsonl (the progress lines).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mvsdi.aggregation import AggregationConfig
from mvsdi.config import RunConfig, preset
from mvsdi.distill import Distiller, Model
from mvsdi.field import FieldConfig
from mvsdi.plotting import pyplot, save_figure
from mvsdi.priors.prompts import PromptConfig
from mvsdi.rundir import atomic_write_bytes, atomic_write_json, to_uint8
from mvsdi.schedules import LossWeights, Ramp, Schedules, ShadingSchedule
from mvsdi.statistics import mean_interval, paired_verdict
from mvsdi.testbed.metrics import evaluate_renders, render_views
from mvsdi.testbed.prior import TESTBED_CAMERAS, IdealDenoiserPrior
from mvsdi.testbed.scenes import ConstantBackground
from mvsdi.variance import MIN_BOOTSTRAP_REPEATS, compare_estimators

# view R-precision, aligned PSNR, 3D IoU (higher is better) and Janus score (lower is better)
METRICS = ("r_precision", "psnr", "iou", "janus")


@dataclass(frozen=True)
class Method:
    name: str
    views: int
    sampler: str
    aggregation: str = "mean"  # "consensus": CW-MV-SDI's weighting of the K views


# SDS guidance scale on the testbed. CFG 100 compensates for Stable Diffusion's weak text
# conditioning; the exact denoiser's conditional branch is already sharp, and at 100 a short SDS run
# on the mug ended with a lower 3D IoU than the initial blob (0.31 vs 0.48), at 7.5 a higher (0.54).
TESTBED_SDS_SCALE = 7.5

# Every method a study can run; the first (K=1) is the baseline of every paired difference.
METHODS = (Method("K1", 1, "random"), Method("K2-random", 2, "random"), Method("K2-antipodal", 2, "antipodal"),
           Method("K2-stratified", 2, "stratified"), Method("K4-antipodal", 4, "antipodal"),
           Method("K4-mixed", 4, "mixed"), Method("CW-K2", 2, "antipodal", "consensus"))
METHODS_BY_NAME = {m.name: m for m in METHODS}
# One colour per method, keyed by name, in every figure: by position in a plot the colours would
# shift between figures that leave K1 out (the variance ratios) and those that show it.
METHOD_COLOURS = dict(zip(METHODS_BY_NAME, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple",
                                            "tab:brown", "tab:pink")))
SMALL_METHODS = ("K1", "K2-random", "K2-antipodal", "K2-stratified", "K4-antipodal", "K4-mixed")
# the paper's rows: K=1, K=2 uniform (stratified azimuths), the antipodal pair, two pairs, and CW-MV-SDI
PAPER_METHODS = ("K1", "K2-stratified", "K2-antipodal", "K4-antipodal", "CW-K2")


@dataclass(frozen=True)
class StudySettings:
    scenes: tuple[str, ...]
    seeds: tuple[int, ...]
    guidances: tuple[str, ...] = ("sds", "sdi")
    budgets: tuple[int, ...] = (96,)  # guidance evaluations per cell, each a multiple of every method's K
    image_size: int = 32
    references: int = 256  # per scene; 64 left the truth's renders far from every reference (prior.TESTBED_CAMERAS)
    samples_per_ray: int = 32
    fractions: tuple[float, ...] = (0.25, 0.5, 1.0)  # where the metrics are taken
    variance_repeats: int = 8  # gradient draws per method and point of the run; 0: no variance measured
    variance_fractions: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)  # points of the K=1 run where it is measured
    field: FieldConfig = FieldConfig(n_levels=8, log2_table_size=16, base_resolution=8, per_level_scale=1.5)
    device: str = "cpu"
    methods: tuple[str, ...] = SMALL_METHODS  # names in METHODS_BY_NAME; the first is the baseline (K1)

    @property
    def budget(self) -> int:
        """The largest budget: the one whose runs give the turntables and the variance."""
        return max(self.budgets)

    @property
    def method_list(self) -> tuple[Method, ...]:
        return tuple(METHODS_BY_NAME[name] for name in self.methods)


# Variance in the small default: R = 16 draws at 3 points of the run cost 2 × 3 × 15 × 16 = 1,440
# guidance evaluations (≈ 2 min on 2 idle cores); the table states each ratio's 95% interval.
SMALL = StudySettings(scenes=("mug",), seeds=(0,), samples_per_ray=24, fractions=(0.5, 1.0), variance_repeats=16,
                      variance_fractions=(0.0, 0.5, 1.0))
# The study with power that a 2-core CPU affords in about an hour (docs/testbed.md): 4 scenes × 5
# seeds, the paper's five methods, both guidances, paired against K1 on each scene and seed. Its
# budget is set by that hour (docs/testbed.md gives the cost per evaluation and the budget curves
# that say what a larger one would change). The variance has its own benchmark
# (benchmarks/variance_along_run.py), so it is not measured here.
MEDIUM = StudySettings(scenes=("mug", "chair", "duck", "car"), seeds=(0, 1, 2, 3, 4), budgets=(320,),
                       samples_per_ray=24, fractions=(1.0,), variance_repeats=0, methods=PAPER_METHODS)
# Quality against budget for K = 1, 2, 4: does K > 1 lose at small budgets (fewer steps) and win at
# large ones (less noise)? Two scenes × two seeds at four budgets.
BUDGET_AXIS = StudySettings(scenes=("mug", "duck"), seeds=(0, 1), budgets=(100, 200, 400, 800), samples_per_ray=24,
                            fractions=(1.0,), variance_repeats=0, methods=("K1", "K2-antipodal", "K4-antipodal"))
FULL = StudySettings(scenes=("mug", "snowman", "chair", "house", "duck", "car", "lamp", "penguin"), seeds=(0, 1, 2),
                     budgets=(2000,), image_size=64, references=256, samples_per_ray=64,
                     fractions=(0.1, 0.25, 0.5, 0.75, 1.0), variance_repeats=32, field=FieldConfig(), device="cuda")
SETTINGS = {"small": SMALL, "medium": MEDIUM, "budgets": BUDGET_AXIS, "full": FULL}


def cell_config(settings: StudySettings, guidance: str, method: Method, scene: str, seed: int,
                budget: int | None = None) -> RunConfig:
    """The run of one cell: the generate presets with the prompt = scene and the prior swapped.

    Albedo shading only and no normal-based regulariser: the references are albedo renders, and
    normals triple the renderer's cost on CPU. SDS uses ``TESTBED_SDS_SCALE``. The training views
    are drawn from the references' camera distribution (``TESTBED_CAMERAS``: per-view distance and
    elevation as in the reference, fovy fixed, without threestudio's position, centre and up jitter):
    with jitter the prior was asked about off-centre views it had never seen, the truth was far
    from a fixed point of the distillation, and runs got worse with budget (issue 15).
    ``budget`` defaults to the study's largest. SDI with K >= 4 batches its views' inversions (one
    prior pass for the K views), SDS never: the extra no-graph renders cost SDS more than they save
    (benchmarks/testbed_cost.py, docs/testbed.md). At K = 2 batching measured from 12% faster to
    16% slower for SDI (two K = 2 methods, one run each), so it stays sequential, as in the studies
    recorded in docs/results/.
    """
    base = preset("sds" if guidance == "sds" else "sdi", scene)
    if guidance == "sds":
        base = dataclasses.replace(base, guidance=dataclasses.replace(base.guidance, guidance_scale=TESTBED_SDS_SCALE))
    weights = dataclasses.replace(LossWeights(), orientation=Ramp(0.0, 0.0), convexity=Ramp(0.0, 0.0))
    return dataclasses.replace(
        base, views=method.views, sampler=method.sampler, budget=budget or settings.budget, seed=seed,
        aggregation=AggregationConfig(kind=method.aggregation),
        view_batching="batched" if guidance == "sdi" and method.views >= 4 else "sequential",
        model=f"ideal:{settings.image_size}", device=settings.device, resolution=settings.image_size,
        eval_resolution=settings.image_size, samples_per_ray=settings.samples_per_ray, field=settings.field,
        cameras=TESTBED_CAMERAS, prompts=PromptConfig(view_dependent=False, perp_neg=False),
        schedules=Schedules(shading=ShadingSchedule(ambient_only_until=1.0), weights=weights))


@dataclass
class CellResult:
    rows: list[dict[str, Any]]  # metrics at each requested fraction
    frames: np.ndarray  # final turntable [V, H, W, 3] uint8
    snapshots: dict[float, dict[str, Any]]  # model state when each snapshot fraction was reached


def run_cell(prior: IdealDenoiserPrior, config: RunConfig, fractions: tuple[float, ...], device: torch.device,
             snapshot_at: tuple[float, ...] = ()) -> CellResult:
    """Train one cell; metrics at each of ``fractions``, model states at each of ``snapshot_at``
    (for the variance along the run); the final turntable frames.

    The initial field depends only on the seed, so its metrics are measured once per scene and
    seed by ``initial_metrics``, not here.
    """
    distiller = Distiller(config, prior, Model.create(config, device), device)
    rows, snapshots, renders = [], {}, None
    started, calls_before = time.perf_counter(), prior.counters.calls  # the prior is shared by all cells
    for fraction in sorted(set(fractions) | set(snapshot_at)):
        while distiller.counters.guidance_evaluations < round(fraction * config.budget):
            distiller.step()
        if fraction in snapshot_at:
            snapshots[fraction] = copy.deepcopy(distiller.model.state_dict())
        if fraction in fractions:
            row, renders = _measure(distiller, prior, config, fraction)
            rows.append(row | {"train_seconds": time.perf_counter() - started,
                               "unet_calls": prior.counters.calls - calls_before})
    while distiller.counters.guidance_evaluations < config.budget:
        distiller.step()
    if not rows or rows[-1]["guidance_evaluations"] < config.budget:  # the turntable shows the end of the run
        renders, _ = _renders(distiller, config)
    return CellResult(rows, np.stack([to_uint8(x.permute(1, 2, 0)) for x in renders]), snapshots)


def _renders(distiller: Distiller, config: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation views over the truth's grey, at the prior's size: what the metrics judge."""
    return render_views(distiller.model.field, ConstantBackground(), config.eval_views, distiller.prior.image_size,
                        config.samples_per_ray)


def _measure(distiller: Distiller, prior: IdealDenoiserPrior, config: RunConfig,
             fraction: float) -> tuple[dict[str, Any], torch.Tensor]:
    """(metrics row, the renders they were taken from)."""
    renders, opacity = _renders(distiller, config)
    metrics = evaluate_renders(renders, opacity, distiller.model.field, config.prompt, prior)
    return {"fraction": fraction, "guidance_evaluations": distiller.counters.guidance_evaluations, **metrics}, renders


def initial_metrics(settings: StudySettings, prior: IdealDenoiserPrior, scene: str, seed: int,
                    device: torch.device) -> dict[str, Any]:
    config = cell_config(settings, settings.guidances[0], METHODS[0], scene, seed)
    distiller = Distiller(config, prior, Model.create(config, device), device)
    return _measure(distiller, prior, config, 0.0)[0] | {"train_seconds": 0.0, "unet_calls": 0}


def variance_rows(settings: StudySettings, prior: IdealDenoiserPrior, guidance: str, scene: str, seed: int,
                  snapshots: dict[float, dict[str, Any]], device: torch.device,
                  methods: tuple[Method, ...] = SMALL.method_list) -> list[dict[str, Any]]:
    """Variance per guidance evaluation of each method, its ratio to the first (K=1) and the ratio's
    95% interval, at each snapshot of a training run (parameters and schedules at that fraction).
    The estimator measured is the plain mean of K views; a consensus-weighted method is refused."""
    if any(m.aggregation != "mean" for m in methods):
        raise ValueError("the variance meter measures the mean of K views; leave CW methods out")
    base = cell_config(settings, guidance, methods[0], scene, seed)
    rows = []
    for fraction, state in sorted(snapshots.items()):
        found = compare_estimators(base, prior, state, device, [(m.views, m.sampler) for m in methods], fraction,
                                   settings.variance_repeats, seed)
        rows += [{"guidance": guidance, "scene": scene, "seed": seed, "method": m.name, **r}
                 for m, r in zip(methods, found)]
    return rows


# ---------------------------------------------------------------------------------------------
# statistics

# which way each metric improves (the verdicts' direction)
HIGHER_IS_BETTER = {"r_precision": True, "psnr": True, "iou": True, "janus": False}
BASELINE = METHODS[0].name


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
    their verdicts (better / worse / n.d. = not distinguishable at 95%)."""
    head = ["guidance", "budget", "method", "steps", "cells", "diverged", *METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        steps = row["budget"] // METHODS_BY_NAME[row["method"]].views
        lines.append("| " + " | ".join([row["guidance"], str(row["budget"]), row["method"], str(steps),
                                         str(row["cells"]), str(row["diverged"]),
                                         *(_fmt(row[m]) for m in METRICS)]) + " |")
    head = ["guidance", "budget", "method", "pairs", *(f"Δ{m} vs K1" for m in METRICS)]
    lines += ["", "Paired differences against K1 (same guidance, budget, scene and seed), mean ± 95% t-interval "
              "over the pairs, and the verdict (Janus: lower is better):", "",
              "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += _difference_rows([r for r in table if r["method"] != BASELINE], "budget")
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
                   equal_steps: list[dict[str, Any]] = ()) -> str:
    text = table_markdown(table) + ("\n" + equal_steps_markdown(equal_steps) if equal_steps else "")
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


# ---------------------------------------------------------------------------------------------
# plots and turntables


def _present(rows: list[dict[str, Any]]) -> list[Method]:
    """The methods that appear in ``rows``, in METHODS order."""
    names = {r["method"] for r in rows}
    return [m for m in METHODS if m.name in names]


def plot_metric_vs_budget(results: list[dict[str, Any]], out: Path) -> Path:
    """Each metric along the runs of the study's largest budget (mean over scenes and seeds)."""
    plt = pyplot()
    largest = max(r["budget"] for r in results)
    results = [r for r in results if r["budget"] == largest]
    guidances = list(dict.fromkeys(r["guidance"] for r in results))
    fig, axes = plt.subplots(len(guidances), len(METRICS), figsize=(4 * len(METRICS), 3.2 * len(guidances)),
                             squeeze=False)
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
    plt = pyplot()
    guidances = list(dict.fromkeys(r["guidance"] for r in table))
    fig, axes = plt.subplots(2 * len(guidances), len(METRICS), figsize=(4 * len(METRICS), 2.8 * 2 * len(guidances)),
                             squeeze=False)
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
    plt = pyplot()
    summary = variance_summary(variance)
    guidances = list(dict.fromkeys(v["guidance"] for v in variance))
    fig, axes = plt.subplots(1, len(guidances), figsize=(5 * len(guidances), 3.6), squeeze=False)
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
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1)
    except TypeError:  # older Pillow: its one bitmap font
        return ImageFont.load_default()


def caption_strips(captions: list[list[str]], width: int) -> list[np.ndarray]:
    """One uint8 strip [h, width, 3] per caption (white lines on dark grey), all of one height and
    font size: the largest size at which the longest line of any caption fits in ``width``."""
    from PIL import Image, ImageDraw

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
    import imageio.v3 as iio

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


# ---------------------------------------------------------------------------------------------


def check_settings(settings: StudySettings) -> None:
    """Every bad setting is a ValueError here, before any work is done or any folder made."""
    from mvsdi.testbed.scenes import get_scene

    for scene in settings.scenes:
        get_scene(scene)
    if not settings.seeds or len(set(settings.seeds)) != len(settings.seeds):
        raise ValueError(f"the study's seeds must be distinct and at least one, got {list(settings.seeds)}")
    unknown = [m for m in settings.methods if m not in METHODS_BY_NAME]
    repeated = len(set(settings.methods)) != len(settings.methods)
    if unknown or repeated or not settings.methods or settings.methods[0] != BASELINE:
        raise ValueError(f"the study's methods must be distinct names from {', '.join(METHODS_BY_NAME)}, "
                         f"{BASELINE} first (the baseline); got {', '.join(settings.methods) or 'none'}")
    if not settings.budgets or len(set(settings.budgets)) != len(settings.budgets):
        raise ValueError(f"the study's budgets must be distinct and at least one, got {list(settings.budgets)}")
    for budget in settings.budgets:
        for m in settings.method_list:
            if budget < m.views or budget % m.views:
                raise ValueError(f"study budget {budget} must be a positive multiple of every method's K "
                                 f"(here {m.name}'s {m.views})")
    if not all(0.0 <= f <= 1.0 for f in (*settings.fractions, *settings.variance_fractions)):
        raise ValueError("metric and variance fractions must lie in [0, 1] (fractions of the budget spent)")
    if settings.variance_repeats == 1 or settings.variance_repeats < 0:
        raise ValueError("variance repeats must be 0 (no variance) or >= 2 (a variance needs two draws)")


@dataclass(frozen=True)
class CellTask:
    """One cell of the study, or (``method`` None) the initial field of a scene and seed."""
    guidance: str
    scene: str
    seed: int
    method: Method | None
    budget: int
    measures_variance: bool = False  # along this (first-seed K=1) run
    keeps_frames: bool = False  # its turntable goes into the GIFs

    def label(self) -> str:
        if self.method is None:
            return f"initial field, {self.scene} seed {self.seed}"
        return f"{self.guidance} {self.scene} seed {self.seed} {self.method.name}, budget {self.budget}"


def study_tasks(settings: StudySettings) -> list[CellTask]:
    """The initial fields, then every cell, in the order of the results."""
    tasks = [CellTask(settings.guidances[0], scene, seed, None, 0)
             for scene in settings.scenes for seed in settings.seeds]
    for guidance in settings.guidances:
        for scene in settings.scenes:
            for seed in settings.seeds:
                for budget in settings.budgets:
                    for method in settings.method_list:
                        first = seed == settings.seeds[0] and budget == settings.budget
                        tasks.append(CellTask(guidance, scene, seed, method, budget,
                                              measures_variance=first and method.name == BASELINE
                                              and settings.variance_repeats > 0,
                                              keeps_frames=first))
    return tasks


def _expected_cost(task: CellTask) -> float:
    """A rough relative cost, to start the longest cells first (SDI's inversion ≈ 2 SDS evaluations)."""
    if task.method is None:
        return 0.0
    return task.budget * (2.0 if task.guidance == "sdi" else 1.0) * (10.0 if task.measures_variance else 1.0)


# the state of a worker process (or of the study's own process when it runs the cells itself)
_WORKER: dict[str, Any] = {}


def _start_worker(settings: StudySettings, prior: IdealDenoiserPrior | dict[str, torch.Tensor],
                  device: torch.device) -> None:
    """Per worker: one CPU thread (the study's results do not depend on how many workers ran it,
    and two workers on two cores beat one with two threads: the cells' tensors are small), and the
    prior: shared with the parent after a fork, or rebuilt from its reference images after a spawn."""
    if device.type == "cpu":
        torch.set_num_threads(1)
    if not isinstance(prior, IdealDenoiserPrior):
        prior = IdealDenoiserPrior.from_images(prior, device)
    _WORKER.update(settings=settings, prior=prior, device=device)


def _run_task(task: CellTask) -> dict[str, Any]:
    settings, prior, device = _WORKER["settings"], _WORKER["prior"], _WORKER["device"]
    started = time.perf_counter()
    if task.method is None:
        return {"rows": [initial_metrics(settings, prior, task.scene, task.seed, device)], "seconds": 0.0}
    config = cell_config(settings, task.guidance, task.method, task.scene, task.seed, task.budget)
    cell = run_cell(prior, config, settings.fractions, device,
                    settings.variance_fractions if task.measures_variance else ())
    methods = tuple(m for m in settings.method_list if m.aggregation == "mean")
    variance = (variance_rows(settings, prior, task.guidance, task.scene, task.seed, cell.snapshots, device, methods)
                if task.measures_variance else [])
    return {"rows": cell.rows, "frames": cell.frames if task.keeps_frames else None, "variance": variance,
            "seconds": time.perf_counter() - started}


def default_workers(device: torch.device) -> int:
    """One worker per CPU core the process may use on the CPU; one on a GPU unless asked."""
    if device.type != "cpu":
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _run_tasks(tasks: list[CellTask], settings: StudySettings, prior: IdealDenoiserPrior, device: torch.device,
               workers: int, say: Callable[[str], None], start_method: str | None = None) -> list[dict[str, Any]]:
    """Every task's result, in the order of ``tasks``: in this process, or in ``workers`` processes,
    started by ``start_method``: by default forked on the CPU, where they share the prior's memory,
    and spawned on a GPU, where a forked CUDA context is unusable (spawned workers get the prior's
    images, and know only the scenes registered when mvsdi.testbed.scenes is imported)."""
    order = sorted(range(len(tasks)), key=lambda i: -_expected_cost(tasks[i]))
    results: list[dict[str, Any] | None] = [None] * len(tasks)
    done = 0

    def finished(i: int, result: dict[str, Any]) -> None:
        nonlocal done
        results[i], done = result, done + 1
        last = result["rows"][-1]
        say(f"[{done}/{len(tasks)}] {tasks[i].label()}: " + ", ".join(f"{m} {last[m]:.3f}" for m in METRICS)
            + (f" ({result['seconds']:.0f} s)" if tasks[i].method else ""))

    if workers <= 1:
        threads = torch.get_num_threads()
        try:
            _start_worker(settings, prior, device)
            for i in order:
                finished(i, _run_task(tasks[i]))
        finally:
            torch.set_num_threads(threads)
            _WORKER.clear()
        return results
    start_method = start_method or ("fork" if device.type == "cpu" else "spawn")
    shared = prior if start_method == "fork" else {n: prior.references(n).cpu() for n in prior.scene_names}
    context = multiprocessing.get_context(start_method)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                             initargs=(settings, shared, device)) as pool:
        futures = {pool.submit(_run_task, tasks[i]): i for i in order}
        try:
            for future in as_completed(futures):
                finished(futures[future], future.result())
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return results


def _reporter(progress: bool, log: Callable[[dict[str, Any]], None] | None) -> Callable[[str], None]:
    """Progress text to stdout (if ``progress``) and to ``log`` (a record per message, if given)."""
    started = time.perf_counter()

    def say(text: str) -> None:
        if progress:
            print(text, flush=True)
        if log is not None:
            log({"seconds": round(time.perf_counter() - started, 3), "message": text})

    return say


def write_summaries(results: list[dict[str, Any]], variance: list[dict[str, Any]], settings: StudySettings,
                    out: Path) -> list[dict[str, Any]]:
    """table.md, table.csv and the plots from a study's results and variance rows (also for a study
    written by earlier code: benchmarks/testbed_tables.py); returns the summary table."""
    table = summarise(results)
    text = study_markdown(table, variance, settings, summarise_equal_steps(results))
    atomic_write_bytes(out / "table.md", text.encode())
    atomic_write_bytes(out / "table.csv", table_csv(table).encode())
    plot_metric_vs_budget(results, out)
    if len({r["budget"] for r in results}) > 1:
        plot_budget_axis(table, out)
    if variance:
        plot_variance(variance, out)
    return table


def run_study(settings: StudySettings, out: Path, progress: bool = True,
              log: Callable[[dict[str, Any]], None] | None = None, workers: int | None = None,
              start_method: str | None = None) -> dict[str, Any]:
    """Run the study into the folder ``out`` (made if missing); progress lines go to stdout and ``log``.

    ``workers`` processes run the cells (default ``default_workers``); each cell runs on one CPU
    thread, so the results are the same for any number of workers. ``start_method``: see ``_run_tasks``.
    """
    from mvsdi.cameras import evaluation_cameras
    from mvsdi.priors.loading import resolve_device
    from mvsdi.testbed.prior import default_cache_dir
    from mvsdi.testbed.scenes import SCENES, get_scene, render_truth

    check_settings(settings)
    device = resolve_device(settings.device)
    out.mkdir(parents=True, exist_ok=True)
    say = _reporter(progress, log)
    started = time.perf_counter()
    tasks = study_tasks(settings)
    cells = [t for t in tasks if t.method is not None]
    workers = min(workers or default_workers(device), len(tasks))
    say(f"testbed study: {len(cells)} cells ({len(settings.guidances)} guidance × {len(settings.scenes)} scene × "
        f"{len(settings.seeds)} seed × {len(settings.budgets)} budget × {len(settings.methods)} methods), "
        f"{'/'.join(map(str, settings.budgets))} guidance evaluations each, {settings.image_size}² renders, on "
        f"{device}, {workers} worker{'s' * (workers > 1)}")
    # the prior covers every registered scene: their union is the unconditional branch of guidance
    say(f"building the ideal-denoiser prior: {settings.references} reference views of each of the {len(SCENES)} "
        f"scenes at {settings.image_size}² (rendered once, then cached in {default_cache_dir()}) ...")
    prior = IdealDenoiserPrior(n_references=settings.references, image_size=settings.image_size, device=device)
    say(f"prior ready ({time.perf_counter() - started:.0f} s); running the cells"
        + (f" (the first-seed K1 runs also measure the gradient variance of the methods at "
           f"{', '.join(f'{f:g}' for f in settings.variance_fractions)} of the run, "
           f"{settings.variance_repeats} draws each: the longest cells)" if settings.variance_repeats else "") + " ...")
    found = _run_tasks(tasks, settings, prior, device, workers, say, start_method)
    initial = {(t.scene, t.seed): r["rows"][0] | {"train_seconds": 0.0, "unet_calls": 0}
               for t, r in zip(tasks, found) if t.method is None}
    results, variance = [], []
    frames: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    captions: dict[tuple[str, str], dict[str, list[str]]] = {}
    for task, cell in zip(tasks, found):
        if task.method is None:
            continue
        rows = [dict(initial[(task.scene, task.seed)]), *cell["rows"]]
        results += [{"guidance": task.guidance, "scene": task.scene, "seed": task.seed, "method": task.method.name,
                     "budget": task.budget, **r} for r in rows]
        variance += cell["variance"]
        if task.keeps_frames:
            key = (task.guidance, task.scene)
            if key not in frames:
                truth = render_truth(get_scene(task.scene), evaluation_cameras(), settings.image_size)
                frames[key] = {"truth": np.stack([to_uint8(x.permute(1, 2, 0)) for x in truth])}
                captions[key] = {"truth": ["truth", task.scene, f"{task.guidance}, seed {task.seed}"]}
            frames[key][task.method.name] = cell["frames"]
            captions[key][task.method.name] = method_caption(task.method.name, rows[-1])
    say("writing tables, plots and turntables ...")
    atomic_write_bytes(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in results).encode())
    atomic_write_json(out / "variance.json", variance)
    table = write_summaries(results, variance, settings, out)
    write_turntables(frames, out, captions)
    meta = {"settings": dataclasses.asdict(settings), "seconds": time.perf_counter() - started,
            "workers": workers, "machine": platform.platform(),
            "device": str(device), "date": time.strftime("%Y-%m-%d", time.gmtime())}
    atomic_write_json(out / "study.json", meta)
    return {"table": table, "variance": variance, **meta}
