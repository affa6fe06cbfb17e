"""What a testbed study runs: its methods, settings and presets, and the run of each cell.

A study crosses guidance × method × scene × seed × budget; every cell is one distillation with the
ideal-denoiser prior (``cell_config``), its metrics taken at fractions of its budget.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from mvsdi.aggregation import AggregationConfig
from mvsdi.config import RunConfig, preset
from mvsdi.field import FieldConfig
from mvsdi.priors.prompts import PromptConfig
from mvsdi.schedules import LossWeights, Ramp, Schedules, ShadingSchedule, steps_for_budget
from mvsdi.testbed.prior import TESTBED_CAMERAS
from mvsdi.testbed.scenes import get_scene

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
    time_limit_minutes: float | None = None  # wall-clock limit of the whole study (study.run_study); None: none

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
                     fractions=(0.1, 0.25, 0.5, 0.75, 1.0), variance_repeats=32, field=FieldConfig(), device="cuda",
                     time_limit_minutes=8.0)
SETTINGS = {"small": SMALL, "medium": MEDIUM, "budgets": BUDGET_AXIS, "full": FULL}

# the method every paired difference is taken against
BASELINE = METHODS[0].name


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
    recorded in docs/results/. A cell writes no checkpoint: ``distill.train``'s snapshots (a copy of
    the field and Adam, what a rollback returns to) are taken only where ``run_cell`` stops it and
    at the end, so ``checkpoint_every`` is the run's length.
    """
    budget = budget or settings.budget
    base = preset("sds" if guidance == "sds" else "sdi", scene)
    if guidance == "sds":
        base = dataclasses.replace(base, guidance=dataclasses.replace(base.guidance, guidance_scale=TESTBED_SDS_SCALE))
    weights = dataclasses.replace(LossWeights(), orientation=Ramp(0.0, 0.0), convexity=Ramp(0.0, 0.0))
    return dataclasses.replace(
        base, views=method.views, sampler=method.sampler, budget=budget, seed=seed,
        checkpoint_every=steps_for_budget(budget, method.views),
        aggregation=AggregationConfig(kind=method.aggregation),
        view_batching="batched" if guidance == "sdi" and method.views >= 4 else "sequential",
        model=f"ideal:{settings.image_size}", device=settings.device, resolution=settings.image_size,
        eval_resolution=settings.image_size, samples_per_ray=settings.samples_per_ray, field=settings.field,
        cameras=TESTBED_CAMERAS, prompts=PromptConfig(view_dependent=False, perp_neg=False),
        schedules=Schedules(shading=ShadingSchedule(ambient_only_until=1.0), weights=weights))


# The reserve kept after the last block for what a study writes once its cells are done (truth
# renders, tables, plots, turntables: run_study's "output_seconds"). Measured for the full setting
# (16 turntables of 7 panels, 3,456 result rows) on the 2-core development VM, shared with other
# jobs, one thread, 2026-12-07: 55.9 s = truth renders 4.0 + tables and plots 1.9 + turntables
# 50.0 (GIF encoding). The reserve is 1.5 × a fixed part plus a part per turntable fitted to that.
OUTPUT_SECONDS_FIXED = 2.0
OUTPUT_SECONDS_PER_TURNTABLE = 3.5
RESERVE_FACTOR = 1.5


def output_reserve_seconds(settings: StudySettings) -> float:
    """Seconds a time-limited study keeps for its outputs after the last block."""
    turntables = len(settings.guidances) * len(settings.scenes)
    return RESERVE_FACTOR * (OUTPUT_SECONDS_FIXED + OUTPUT_SECONDS_PER_TURNTABLE * turntables)


def check_settings(settings: StudySettings) -> None:
    """Every bad setting is a ValueError here, before any work is done or any folder made."""
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
    limit = settings.time_limit_minutes
    if limit is not None and not (math.isfinite(limit) and 60.0 * limit >= output_reserve_seconds(settings)):
        raise ValueError(f"time limit {limit:g} min: give at least {output_reserve_seconds(settings) / 60:.2f} min, "
                         f"the {output_reserve_seconds(settings):.0f} s this study keeps for its tables, plots and "
                         "turntables (or 0 for no limit)")

