"""The cells of a study: one distillation each, its metrics at fractions of its budget, the
gradient variance along the first-seed K1 runs, and the worker processes that run them."""

from __future__ import annotations

import copy
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from mvsdi.config import RunConfig
from mvsdi.distill import Distiller, Model, train
from mvsdi.images import to_uint8
from mvsdi.schedules import fraction_spent
from mvsdi.testbed.metrics import evaluate_renders, render_views
from mvsdi.testbed.prior import IdealDenoiserPrior
from mvsdi.testbed.scenes import ConstantBackground
from mvsdi.testbed.settings import BASELINE, METHODS, METRICS, SMALL, Method, StudySettings, cell_config
from mvsdi.variance import compare_estimators


@dataclass
class CellResult:
    rows: list[dict[str, Any]]  # metrics at each requested fraction
    frames: np.ndarray  # final turntable [V, H, W, 3] uint8
    snapshots: dict[float, dict[str, Any]]  # model state when each snapshot fraction was reached


def run_cell(prior: IdealDenoiserPrior, config: RunConfig, fractions: tuple[float, ...], device: torch.device,
             snapshot_at: tuple[float, ...] = ()) -> CellResult:
    """Train one cell; metrics at each of ``fractions``, model states at each of ``snapshot_at``
    (for the variance along the run); the final turntable frames.

    ``distill.train`` runs the steps, stopping at the step where each fraction of the budget is
    spent. A run that diverges (its rollbacks spent) stops there: the fractions it did not reach
    are measured at the state it stopped at and marked diverged. The initial field depends only on
    the seed, so its metrics are measured once per scene and seed by ``initial_metrics``, not here.
    """
    distiller = Distiller(config, prior, Model.create(config, device), device)
    rows, snapshots, renders, rendered_at = [], {}, None, None
    started, calls_before = time.perf_counter(), prior.counters.calls  # the prior is shared by all cells
    status = "completed"
    for fraction in (*sorted(set(fractions) | set(snapshot_at)), None):  # None: the end of the run
        target = config.steps if fraction is None else step_reached(fraction, config)
        if status != "diverged" and distiller.counters.steps < target:
            status = train(distiller, until_step=target).status
        if fraction in snapshot_at:
            snapshots[fraction] = copy.deepcopy(distiller.model.state_dict())
        if fraction in fractions:
            row, renders = measure(distiller, prior, config, fraction)
            rendered_at = distiller.counters.steps
            if status == "diverged":
                row |= {"diverged": True, "diverged_reason": f"training diverged: {config.max_rollbacks} rollbacks "
                        f"spent, stopped at step {rendered_at} of {config.steps}"}
            rows.append(row | {"train_seconds": time.perf_counter() - started,
                               "unet_calls": prior.counters.calls - calls_before})
    if rendered_at != distiller.counters.steps:  # the turntable shows the end of the run
        renders, _ = metric_renders(distiller, config)
    return CellResult(rows, np.stack([to_uint8(x.permute(1, 2, 0)) for x in renders]), snapshots)


def step_reached(fraction: float, config: RunConfig) -> int:
    """The first optimiser step at which ``fraction`` of the cell's budget has been spent."""
    return next(step for step in range(config.steps + 1)
                if fraction_spent(step, config.views, config.budget) >= fraction)


def metric_renders(distiller: Distiller, config: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation views over the truth's grey, at the prior's size: what the metrics judge."""
    return render_views(distiller.model.field, ConstantBackground(), config.eval_views, distiller.prior.image_size,
                        config.samples_per_ray)


def measure(distiller: Distiller, prior: IdealDenoiserPrior, config: RunConfig,
             fraction: float) -> tuple[dict[str, Any], torch.Tensor]:
    """(metrics row, the renders they were taken from)."""
    renders, opacity = metric_renders(distiller, config)
    metrics = evaluate_renders(renders, opacity, distiller.model.field, config.prompt, prior)
    return {"fraction": fraction, "guidance_evaluations": distiller.counters.guidance_evaluations, **metrics}, renders


def initial_metrics(settings: StudySettings, prior: IdealDenoiserPrior, scene: str, seed: int,
                    device: torch.device) -> dict[str, Any]:
    config = cell_config(settings, settings.guidances[0], METHODS[0], scene, seed)
    distiller = Distiller(config, prior, Model.create(config, device), device)
    return measure(distiller, prior, config, 0.0)[0] | {"train_seconds": 0.0, "unet_calls": 0}


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


def run_tasks(tasks: list[CellTask], settings: StudySettings, prior: IdealDenoiserPrior, device: torch.device,
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

