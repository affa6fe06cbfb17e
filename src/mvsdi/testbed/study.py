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
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mvsdi.config import RunConfig, preset
from mvsdi.distill import Distiller, Model
from mvsdi.field import FieldConfig
from mvsdi.plotting import pyplot, save_figure
from mvsdi.priors.prompts import PromptConfig
from mvsdi.rundir import atomic_write_bytes, atomic_write_json, to_uint8
from mvsdi.schedules import LossWeights, Ramp, Schedules, ShadingSchedule
from mvsdi.testbed.metrics import evaluate_renders, render_views
from mvsdi.testbed.scenes import ConstantBackground
from mvsdi.testbed.prior import TESTBED_CAMERAS, IdealDenoiserPrior
from mvsdi.variance import MIN_BOOTSTRAP_REPEATS, compare_estimators

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
# One colour per method, keyed by name, in every figure: by position in a plot the colours would
# shift between figures that leave K1 out (the variance ratios) and those that show it.
METHOD_COLOURS = dict(zip((m.name for m in METHODS),
                          ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")))


@dataclass(frozen=True)
class StudySettings:
    scenes: tuple[str, ...]
    seeds: tuple[int, ...]
    guidances: tuple[str, ...] = ("sds", "sdi")
    budget: int = 96  # guidance evaluations per cell; a multiple of every method's K
    image_size: int = 32
    references: int = 256  # per scene; 64 left the truth's renders far from every reference (prior.TESTBED_CAMERAS)
    samples_per_ray: int = 32
    fractions: tuple[float, ...] = (0.25, 0.5, 1.0)  # where the metrics are taken
    variance_repeats: int = 8  # gradient draws per method and point of the run
    variance_fractions: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)  # points of the K=1 run where it is measured
    field: FieldConfig = FieldConfig(n_levels=8, log2_table_size=16, base_resolution=8, per_level_scale=1.5)
    device: str = "cpu"


# Variance in the small default: R = 16 draws at 3 points of the run cost 2 × 3 × 15 × 16 = 1,440
# guidance evaluations (≈ 2 min on 2 idle cores); the table states each ratio's 95% interval.
SMALL = StudySettings(scenes=("mug",), seeds=(0,), samples_per_ray=24, fractions=(0.5, 1.0), variance_repeats=16,
                      variance_fractions=(0.0, 0.5, 1.0))
FULL = StudySettings(scenes=("mug", "snowman", "chair", "house", "duck", "car", "lamp", "penguin"), seeds=(0, 1, 2),
                     budget=2000, image_size=64, references=256, samples_per_ray=64,
                     fractions=(0.1, 0.25, 0.5, 0.75, 1.0), variance_repeats=32, field=FieldConfig(), device="cuda")


def cell_config(settings: StudySettings, guidance: str, method: Method, scene: str, seed: int) -> RunConfig:
    """The run of one cell: the generate presets with the prompt = scene and the prior swapped.

    Albedo shading only and no normal-based regulariser: the references are albedo renders, and
    normals triple the renderer's cost on CPU. SDS uses ``TESTBED_SDS_SCALE``. The training views
    are drawn from the references' camera distribution (``TESTBED_CAMERAS``: per-view distance and
    elevation as in the reference, fovy fixed, without threestudio's position, centre and up jitter):
    with jitter the prior was asked about off-centre views it had never seen, the truth was far
    from a fixed point of the distillation, and runs got worse with budget (issue 15).
    """
    base = preset("sds" if guidance == "sds" else "sdi", scene)
    if guidance == "sds":
        base = dataclasses.replace(base, guidance=dataclasses.replace(base.guidance, guidance_scale=TESTBED_SDS_SCALE))
    weights = dataclasses.replace(LossWeights(), orientation=Ramp(0.0, 0.0), convexity=Ramp(0.0, 0.0))
    return dataclasses.replace(
        base, views=method.views, sampler=method.sampler, budget=settings.budget, seed=seed,
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
                  methods: tuple[Method, ...] = METHODS) -> list[dict[str, Any]]:
    """Variance per guidance evaluation of each method, its ratio to the first (K=1) and the ratio's
    95% interval, at each snapshot of a training run (parameters and schedules at that fraction)."""
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


def table_markdown(table: list[dict[str, Any]]) -> str:
    head = ["guidance", "method", "cells", "diverged", *METRICS, *(f"Δ{m} vs K1" for m in METRICS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        lines.append("| " + " | ".join([row["guidance"], row["method"], str(row["cells"]), str(row["diverged"]),
                                         *(_fmt(row[m]) for m in METRICS),
                                         *(_fmt(row[f"{m}_vs_K1"], signed=True) for m in METRICS)]) + " |")
    return "\n".join(lines) + "\n"


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


def study_markdown(table: list[dict[str, Any]], variance: list[dict[str, Any]], settings: StudySettings) -> str:
    scenes = ", ".join(sorted({v["scene"] for v in variance}))
    return (table_markdown(table) + "\nGradient variance per guidance evaluation / K=1's, at the parameters of the "
            f"K=1 run (seed {settings.seeds[0]}; {scenes}) after each fraction of its budget, R = "
            f"{settings.variance_repeats} draws per method; [95% interval, paired bootstrap over draws]:\n\n"
            + variance_markdown(variance))


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
    plt = pyplot()
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
                ax.plot(fractions, means, marker="o", label=method.name, color=METHOD_COLOURS[method.name])
            ax.set_title(f"{guidance}: {metric}")
            ax.set_xlabel("budget fraction spent")
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, out / "metrics_vs_budget.png", dpi=110)


def plot_variance(variance: list[dict[str, Any]], out: Path) -> Path:
    """Variance ratio to K=1 against the fraction of the K=1 run where it was measured (log scale,
    95% intervals as error bars), one panel per guidance."""
    plt = pyplot()
    summary = variance_summary(variance)
    guidances = list(dict.fromkeys(v["guidance"] for v in variance))
    fig, axes = plt.subplots(1, len(guidances), figsize=(5 * len(guidances), 3.6), squeeze=False)
    for ax, guidance in zip(axes[0], guidances):
        for slot, method in enumerate(METHODS[1:]):
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
    for m in METHODS:
        if settings.budget % m.views:
            raise ValueError(f"study budget {settings.budget} must be a multiple of every method's K (here {m.views})")
    if not all(0.0 <= f <= 1.0 for f in (*settings.fractions, *settings.variance_fractions)):
        raise ValueError("metric and variance fractions must lie in [0, 1] (fractions of the budget spent)")


def _reporter(progress: bool, log: Callable[[dict[str, Any]], None] | None) -> Callable[[str], None]:
    """Progress text to stdout (if ``progress``) and to ``log`` (a record per message, if given)."""
    started = time.perf_counter()

    def say(text: str) -> None:
        if progress:
            print(text, flush=True)
        if log is not None:
            log({"seconds": round(time.perf_counter() - started, 3), "message": text})

    return say


def run_study(settings: StudySettings, out: Path, progress: bool = True,
              log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the study into the folder ``out`` (made if missing); progress lines go to stdout and ``log``."""
    from mvsdi.cameras import evaluation_cameras
    from mvsdi.priors.loading import resolve_device
    from mvsdi.testbed.prior import default_cache_dir
    from mvsdi.testbed.scenes import SCENES, get_scene, render_truth

    check_settings(settings)
    device = resolve_device(settings.device)
    out.mkdir(parents=True, exist_ok=True)
    say = _reporter(progress, log)
    started = time.perf_counter()
    cells = [(g, s, seed, m) for g in settings.guidances for s in settings.scenes for seed in settings.seeds for m in METHODS]
    say(f"testbed study: {len(cells)} cells ({len(settings.guidances)} guidance × {len(settings.scenes)} scene × "
        f"{len(settings.seeds)} seed × {len(METHODS)} methods), {settings.budget} guidance evaluations each, "
        f"{settings.image_size}² renders, on {device}")
    # the prior covers every registered scene: their union is the unconditional branch of guidance
    say(f"building the ideal-denoiser prior: {settings.references} reference views of each of the {len(SCENES)} "
        f"scenes at {settings.image_size}² (rendered once, then cached in {default_cache_dir()}) ...")
    prior = IdealDenoiserPrior(n_references=settings.references, image_size=settings.image_size, device=device)
    say(f"prior ready ({time.perf_counter() - started:.0f} s); measuring the initial field ...")
    results, variance = [], []
    frames: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    captions: dict[tuple[str, str], dict[str, list[str]]] = {}
    initial = {(scene, seed): initial_metrics(settings, prior, scene, seed, device)
               for scene in settings.scenes for seed in settings.seeds}
    for i, (guidance, scene, seed, method) in enumerate(cells):
        config = cell_config(settings, guidance, method, scene, seed)
        measures_variance = method == METHODS[0] and seed == settings.seeds[0]  # along the first K=1 run
        if measures_variance:
            say(f"[{i + 1}/{len(cells)}] {guidance} {scene} seed {seed} K1: training, and measuring the gradient "
                f"variance of {len(METHODS)} methods at {', '.join(f'{f:g}' for f in settings.variance_fractions)} "
                f"of the run ({settings.variance_repeats} draws each; the longest cell) ...")
        cell = run_cell(prior, config, settings.fractions, device,
                        settings.variance_fractions if measures_variance else ())
        rows = [dict(initial[(scene, seed)]), *cell.rows]
        results += [{"guidance": guidance, "scene": scene, "seed": seed, "method": method.name, **r} for r in rows]
        if seed == settings.seeds[0]:
            truth = render_truth(get_scene(scene), evaluation_cameras(), settings.image_size)
            frames.setdefault((guidance, scene), {"truth": np.stack([to_uint8(x.permute(1, 2, 0)) for x in truth])})
            frames[(guidance, scene)][method.name] = cell.frames
            captions.setdefault((guidance, scene), {"truth": ["truth", scene, f"{guidance}, seed {seed}"]})
            captions[(guidance, scene)][method.name] = method_caption(method.name, rows[-1])
        if measures_variance:
            variance += variance_rows(settings, prior, guidance, scene, seed, cell.snapshots, device)
        last = rows[-1]
        say(f"[{i + 1}/{len(cells)}] {guidance} {scene} seed {seed} {method.name}: "
            + ", ".join(f"{m} {last[m]:.3f}" for m in METRICS) + f" ({time.perf_counter() - started:.0f} s)")
    say("writing tables, plots and turntables ...")
    table = summarise(results)
    atomic_write_bytes(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in results).encode())
    atomic_write_json(out / "variance.json", variance)
    atomic_write_bytes(out / "table.md", study_markdown(table, variance, settings).encode())
    atomic_write_bytes(out / "table.csv", table_csv(table).encode())
    plot_metric_vs_budget(results, out)
    plot_variance(variance, out)
    write_turntables(frames, out, captions)
    meta = {"settings": dataclasses.asdict(settings), "seconds": time.perf_counter() - started,
            "machine": platform.platform(), "device": str(device),
            "date": time.strftime("%Y-%m-%d", time.gmtime())}
    atomic_write_json(out / "study.json", meta)
    return {"table": table, "variance": variance, **meta}
