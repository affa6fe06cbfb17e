"""`mvsdi testbed`: K-view methods at equal budget on the weights-free ground truth.

Every cell (guidance × method × scene × seed) is one distillation with the ideal-denoiser prior,
the same loop, samplers, field and renderer as `mvsdi generate`. Metrics against the truth are
taken at several fractions of the budget; the gradient-variance ratio of each method is measured
at the initial field. Outputs: results.jsonl (one line per cell and fraction), table.md / table.csv
(mean and 95% interval per metric, paired differences against K=1), plots, turntable GIFs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mvsdi.config import RunConfig, preset
from mvsdi.distill import Distiller, Model
from mvsdi.field import FieldConfig
from mvsdi.priors.prompts import PromptConfig
from mvsdi.rundir import atomic_write_bytes, atomic_write_json, to_uint8
from mvsdi.schedules import LossWeights, Ramp, Schedules, ShadingSchedule
from mvsdi.testbed.metrics import evaluate_field, render_views
from mvsdi.testbed.scenes import ConstantBackground
from mvsdi.testbed.prior import IdealDenoiserPrior
from mvsdi.variance import compare_estimators

# view R-precision, aligned PSNR, 3D IoU (higher is better) and Janus score (lower is better)
METRICS = ("r_precision", "psnr", "iou", "janus")


@dataclass(frozen=True)
class Method:
    name: str
    views: int
    sampler: str


# SDS guidance scale on the testbed. CFG 100 compensates for Stable Diffusion's weak text
# conditioning; the exact denoiser's conditional branch is already sharp, and at 100 a short SDS run
# on the mug ended with a lower 3D IoU than the initial blob (0.31 vs 0.48), at 7.5 a higher (0.54).
TESTBED_SDS_SCALE = 7.5

METHODS = (Method("K1", 1, "random"), Method("K2-random", 2, "random"), Method("K2-antipodal", 2, "antipodal"),
           Method("K2-stratified", 2, "stratified"), Method("K4-antipodal", 4, "antipodal"), Method("K4-mixed", 4, "mixed"))


@dataclass(frozen=True)
class StudySettings:
    scenes: tuple[str, ...]
    seeds: tuple[int, ...]
    guidances: tuple[str, ...] = ("sds", "sdi")
    budget: int = 96  # guidance evaluations per cell; a multiple of every method's K
    image_size: int = 32
    references: int = 64
    samples_per_ray: int = 32
    fractions: tuple[float, ...] = (0.25, 0.5, 1.0)
    variance_repeats: int = 8
    field: FieldConfig = FieldConfig(n_levels=8, log2_table_size=16, base_resolution=8, per_level_scale=1.5)
    device: str = "cpu"


SMALL = StudySettings(scenes=("mug",), seeds=(0,), samples_per_ray=24, fractions=(0.5, 1.0))
FULL = StudySettings(scenes=("mug", "snowman", "chair", "house", "duck", "car", "lamp", "penguin"), seeds=(0, 1, 2),
                     budget=2000, image_size=64, references=256, samples_per_ray=64,
                     fractions=(0.1, 0.25, 0.5, 0.75, 1.0), variance_repeats=32, field=FieldConfig(), device="cuda")


def cell_config(settings: StudySettings, guidance: str, method: Method, scene: str, seed: int) -> RunConfig:
    """The run of one cell: the generate presets with the prompt = scene and the prior swapped.

    Albedo shading only and no normal-based regulariser: the references are albedo renders, and
    normals triple the renderer's cost on CPU. SDS uses ``TESTBED_SDS_SCALE``.
    """
    base = preset("sds" if guidance == "sds" else "sdi", scene)
    if guidance == "sds":
        base = dataclasses.replace(base, guidance=dataclasses.replace(base.guidance, guidance_scale=TESTBED_SDS_SCALE))
    weights = dataclasses.replace(LossWeights(), orientation=Ramp(0.0, 0.0), convexity=Ramp(0.0, 0.0))
    return dataclasses.replace(
        base, views=method.views, sampler=method.sampler, budget=settings.budget, seed=seed,
        model=f"ideal:{settings.image_size}", device=settings.device, resolution=settings.image_size,
        eval_resolution=settings.image_size, samples_per_ray=settings.samples_per_ray, field=settings.field,
        prompts=PromptConfig(view_dependent=False, perp_neg=False),
        schedules=Schedules(shading=ShadingSchedule(ambient_only_until=1.0), weights=weights))


def run_cell(prior: IdealDenoiserPrior, config: RunConfig, fractions: tuple[float, ...],
             device: torch.device) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Train one cell; metrics at each fraction; the final turntable frames.

    The initial field depends only on the seed, so its metrics are measured once per scene and
    seed by ``initial_metrics``, not here.
    """
    distiller = Distiller(config, prior, Model.create(config, device), device)
    rows = []
    started, calls_before = time.perf_counter(), prior.counters.calls  # the prior is shared by all cells
    for fraction in fractions:
        while distiller.counters.guidance_evaluations < round(fraction * config.budget):
            distiller.step()
        rows.append(_measure(distiller, prior, config, fraction) | {"train_seconds": time.perf_counter() - started,
                                                                     "unet_calls": prior.counters.calls - calls_before})
    with torch.no_grad():
        renders, _ = render_views(distiller.model.field, ConstantBackground(), config.eval_views,
                                  config.eval_resolution, config.samples_per_ray)
    return rows, np.stack([to_uint8(x.permute(1, 2, 0)) for x in renders])


def _measure(distiller: Distiller, prior: IdealDenoiserPrior, config: RunConfig, fraction: float) -> dict[str, Any]:
    metrics = evaluate_field(distiller.model.field, distiller.model.background, config.prompt, prior,
                             n_samples=config.samples_per_ray)
    return {"fraction": fraction, "guidance_evaluations": distiller.counters.guidance_evaluations, **metrics}


def initial_metrics(settings: StudySettings, prior: IdealDenoiserPrior, scene: str, seed: int,
                    device: torch.device) -> dict[str, Any]:
    config = cell_config(settings, settings.guidances[0], METHODS[0], scene, seed)
    distiller = Distiller(config, prior, Model.create(config, device), device)
    return _measure(distiller, prior, config, 0.0) | {"train_seconds": 0.0, "unet_calls": 0}


def variance_rows(settings: StudySettings, prior: IdealDenoiserPrior, guidance: str, scene: str,
                  device: torch.device) -> list[dict[str, Any]]:
    """Variance per guidance evaluation of every method at the initial field, ratio to K=1."""
    base = cell_config(settings, guidance, METHODS[0], scene, 0)
    state = Model.create(base, device).state_dict()
    rows = compare_estimators(base, prior, state, device, [(m.views, m.sampler) for m in METHODS], 0.5,
                              settings.variance_repeats)
    return [{"guidance": guidance, "scene": scene, "method": m.name, **r} for m, r in zip(METHODS, rows)]


# ---------------------------------------------------------------------------------------------
# statistics

_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}


def t_quantile_95(dof: int) -> float:
    """Two-sided 95% Student-t quantile (table; conservative between entries, 1.96 beyond 30)."""
    if dof > 30:
        return 1.96
    return _T95[min(k for k in _T95 if k >= dof)]


def mean_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval (nan half-width for a single value)."""
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size == 1:
        return float(x[0]), float("nan")
    return float(x.mean()), t_quantile_95(x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)


def summarise(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (guidance, method) at the end of the budget: each metric's mean ± 95% interval, and the
    mean paired difference against K1 on the same scene and seed (± 95% interval)."""
    final = [r for r in results if r["fraction"] == 1.0]
    key = lambda r: (r["guidance"], r["scene"], r["seed"])  # noqa: E731
    baseline = {key(r): r for r in final if r["method"] == METHODS[0].name}
    table = []
    for guidance in dict.fromkeys(r["guidance"] for r in final):
        for method in [m.name for m in METHODS]:
            cells = [r for r in final if r["guidance"] == guidance and r["method"] == method]
            if not cells:
                continue
            row: dict[str, Any] = {"guidance": guidance, "method": method, "cells": len(cells),
                                   "diverged": sum(bool(r["diverged"]) for r in cells)}
            for metric in METRICS:
                row[metric] = mean_interval([r[metric] for r in cells])
                row[f"{metric}_vs_K1"] = mean_interval([r[metric] - baseline[key(r)][metric]
                                                        for r in cells if key(r) in baseline])
            table.append(row)
    return table


def _fmt(pair: tuple[float, float], signed: bool = False) -> str:
    mean, half = pair
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return text if math.isnan(half) else f"{text} ± {half:.3f}"


def table_markdown(table: list[dict[str, Any]], variance: list[dict[str, Any]]) -> str:
    ratios: dict[tuple[str, str], list[float]] = {}
    for v in variance:
        ratios.setdefault((v["guidance"], v["method"]), []).append(v["ratio"])
    head = ["guidance", "method", "cells", "diverged", *METRICS, *(f"Δ{m} vs K1" for m in METRICS), "variance/eval vs K1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        ratio = mean_interval(ratios.get((row["guidance"], row["method"]), []))
        lines.append("| " + " | ".join([row["guidance"], row["method"], str(row["cells"]), str(row["diverged"]),
                                         *(_fmt(row[m]) for m in METRICS),
                                         *(_fmt(row[f"{m}_vs_K1"], signed=True) for m in METRICS),
                                         _fmt(ratio)]) + " |")
    return "\n".join(lines) + "\n"


def table_csv(table: list[dict[str, Any]]) -> str:
    cols = ["guidance", "method", "cells", "diverged"]
    for m in METRICS:
        cols += [f"{m}_mean", f"{m}_ci95", f"{m}_vs_K1_mean", f"{m}_vs_K1_ci95"]
    lines = [",".join(cols)]
    for row in table:
        values = [row["guidance"], row["method"], str(row["cells"]), str(row["diverged"])]
        for m in METRICS:
            values += [f"{row[m][0]:.6g}", f"{row[m][1]:.6g}", f"{row[m + '_vs_K1'][0]:.6g}", f"{row[m + '_vs_K1'][1]:.6g}"]
        lines.append(",".join(values))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# plots and turntables


def plot_metric_vs_budget(results: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    guidances = list(dict.fromkeys(r["guidance"] for r in results))
    fig, axes = plt.subplots(len(guidances), len(METRICS), figsize=(4 * len(METRICS), 3.2 * len(guidances)),
                             squeeze=False)
    for gi, guidance in enumerate(guidances):
        for mi, metric in enumerate(METRICS):
            ax = axes[gi][mi]
            for method in METHODS:
                cells = [r for r in results if r["guidance"] == guidance and r["method"] == method.name]
                fractions = sorted({r["fraction"] for r in cells})
                means = [mean_interval([r[metric] for r in cells if r["fraction"] == f])[0] for f in fractions]
                ax.plot(fractions, means, marker="o", label=method.name)
            ax.set_title(f"{guidance}: {metric}")
            ax.set_xlabel("budget fraction spent")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "metrics_vs_budget.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_variance(variance: list[dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    guidances = list(dict.fromkeys(v["guidance"] for v in variance))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(len(guidances), 1)
    for gi, guidance in enumerate(guidances):
        stats = [mean_interval([v["ratio"] for v in variance if v["guidance"] == guidance and v["method"] == m.name])
                 for m in METHODS]
        xs = np.arange(len(METHODS)) + gi * width
        ax.bar(xs, [s[0] for s in stats], width, yerr=[0 if math.isnan(s[1]) else s[1] for s in stats],
               label=guidance, capsize=3)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(np.arange(len(METHODS)) + width * (len(guidances) - 1) / 2, [m.name for m in METHODS], fontsize=8)
    ax.set_ylabel("gradient variance per evaluation / K1")
    ax.legend()
    fig.tight_layout()
    path = out / "variance_ratio.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_turntables(frames: dict[tuple[str, str], dict[str, np.ndarray]], out: Path, min_side: int = 128) -> list[Path]:
    """One GIF per (guidance, scene): the methods side by side, truth first, enlarged (nearest
    neighbour) to at least ``min_side`` pixels so small renders can be inspected."""
    import imageio.v3 as iio

    paths = []
    for (guidance, scene), by_method in frames.items():
        strips = np.concatenate(list(by_method.values()), axis=2)  # [V, H, W·methods, 3]
        scale = max(1, -(-min_side // strips.shape[1]))
        strips = strips.repeat(scale, axis=1).repeat(scale, axis=2)
        path = out / f"turntable_{guidance}_{scene}.gif"
        iio.imwrite(path, strips, duration=80, loop=0)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------


def run_study(settings: StudySettings, out: Path, progress: bool = True) -> dict[str, Any]:
    from mvsdi.priors.loading import resolve_device
    from mvsdi.testbed.scenes import get_scene, render_truth
    from mvsdi.cameras import evaluation_cameras

    for scene in settings.scenes:
        get_scene(scene)  # unknown scene → error before any work
    for m in METHODS:
        if settings.budget % m.views:
            raise ValueError(f"study budget {settings.budget} must be a multiple of every method's K (here {m.views})")
    device = resolve_device(settings.device)
    out.mkdir(parents=True, exist_ok=True)
    prior = IdealDenoiserPrior(n_references=settings.references, image_size=settings.image_size, device=device)
    results, variance = [], []
    frames: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    started = time.perf_counter()
    cells = [(g, s, seed, m) for g in settings.guidances for s in settings.scenes for seed in settings.seeds for m in METHODS]
    initial = {(scene, seed): initial_metrics(settings, prior, scene, seed, device)
               for scene in settings.scenes for seed in settings.seeds}
    for i, (guidance, scene, seed, method) in enumerate(cells):
        config = cell_config(settings, guidance, method, scene, seed)
        rows, final = run_cell(prior, config, settings.fractions, device)
        rows = [dict(initial[(scene, seed)]), *rows]
        results += [{"guidance": guidance, "scene": scene, "seed": seed, "method": method.name, **r} for r in rows]
        if seed == settings.seeds[0]:
            truth = render_truth(get_scene(scene), evaluation_cameras(), settings.image_size)
            frames.setdefault((guidance, scene), {"truth": np.stack([to_uint8(x.permute(1, 2, 0)) for x in truth])})
            frames[(guidance, scene)][method.name] = final
        if progress:
            last = rows[-1]
            print(f"[{i + 1}/{len(cells)}] {guidance} {scene} seed {seed} {method.name}: "
                  + ", ".join(f"{m} {last[m]:.3f}" for m in METRICS) + f" ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    for guidance in settings.guidances:
        for scene in settings.scenes:
            variance += variance_rows(settings, prior, guidance, scene, device)
    table = summarise(results)
    atomic_write_bytes(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in results).encode())
    atomic_write_json(out / "variance.json", variance)
    atomic_write_bytes(out / "table.md", table_markdown(table, variance).encode())
    atomic_write_bytes(out / "table.csv", table_csv(table).encode())
    plot_metric_vs_budget(results, out)
    plot_variance(variance, out)
    write_turntables(frames, out)
    meta = {"settings": dataclasses.asdict(settings), "seconds": time.perf_counter() - started,
            "machine": platform.platform(), "device": str(device),
            "date": time.strftime("%Y-%m-%d", time.gmtime())}
    atomic_write_json(out / "study.json", meta)
    return {"table": table, "variance": variance, **meta}
