"""The cells of a study: one distillation each, its metrics at fractions of its budget, the
gradient variance along the first-seed K1 runs, and the worker processes that run them."""

from __future__ import annotations

import copy
import multiprocessing
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mvsdi.config import RunConfig
from mvsdi.distill import Distiller, Model, train
from mvsdi.images import to_uint8
from mvsdi.memory import available_bytes, estimate_view_memory
from mvsdi.schedules import step_reaching
from mvsdi.testbed.metrics import evaluate_renders, render_views
from mvsdi.testbed.prior import CHUNK_BYTES, IdealDenoiserPrior
from mvsdi.testbed.scenes import ConstantBackground
from mvsdi.testbed.settings import BASELINE, METHODS, SMALL, Method, StudySettings, cell_config
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
        target = config.steps if fraction is None else step_reaching(fraction, config.views, config.budget)
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


def study_blocks(settings: StudySettings) -> list[tuple[str, int]]:
    """The study's blocks, (scene, seed), in the order they run: every scene of the first seed,
    then every scene of the next, so that a study cut by its time limit still covers the scenes.
    A block holds every guidance, budget and method of its scene and seed (and its initial field):
    each paired comparison against K1 lies within one block."""
    return [(scene, seed) for seed in settings.seeds for scene in settings.scenes]


def expected_cost(task: CellTask, settings: StudySettings) -> float:
    """A relative cost in guidance evaluations (SDI's inversion ≈ 2 SDS evaluations; the variance
    meter's draws counted), to start the longest cells first and to scale the measured cost of
    finished cells to cells not yet run. The initial field (one metric pass) counts as nothing."""
    if task.method is None:
        return 0.0
    meter = (len(settings.variance_fractions) * settings.variance_repeats
             * sum(m.views for m in settings.method_list if m.aggregation == "mean")) if task.measures_variance else 0
    return (task.budget + meter) * (2.0 if task.guidance == "sdi" else 1.0)


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


# Concurrent cells on one GPU. Each is small (a 64² field, one view at a time), so several
# processes share the device: while one runs Python between kernels, another's kernels run.
# How many is bounded by the CPU cores (each worker's Python is one core's work) and by memory: a
# worker holds its own CUDA context (GPU_CONTEXT_BYTES, a stated allowance: about 0.5 GiB is
# typical), its copy of the prior and a chunk of its working memory (prior.CHUNK_BYTES), and
# the cell's training view (mvsdi.memory's measured estimate). No speed is claimed for any count:
# benchmarks/testbed_cost.py --device cuda --workers N measures it.
GPU_CONTEXT_BYTES = 2**30
MAX_GPU_WORKERS = 16


def default_workers(device: torch.device, settings: StudySettings | None = None,
                    prior: IdealDenoiserPrior | None = None) -> int:
    """One worker per CPU core the process may use on the CPU. On a GPU: as many as fit its free
    memory (``gpu_workers``, given the settings and prior to probe a cell), at most one per core
    and ``MAX_GPU_WORKERS``; one without them."""
    cores = _cores()
    if device.type == "cpu":
        return cores
    if settings is None or prior is None or device.type != "cuda":
        return 1
    return gpu_workers(available_bytes(device), worker_gpu_bytes(settings, prior, device), cores)


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def gpu_workers(free_bytes: int | None, per_worker_bytes: int, cores: int) -> int:
    """Workers that share one GPU: what its free memory holds, one per CPU core at most (the
    study's own process waits on them), and at most ``MAX_GPU_WORKERS``; at least one."""
    fit = MAX_GPU_WORKERS if free_bytes is None else free_bytes // max(per_worker_bytes, 1)
    return int(max(1, min(fit, cores, MAX_GPU_WORKERS)))


def worker_gpu_bytes(settings: StudySettings, prior: IdealDenoiserPrior, device: torch.device) -> int:
    """A worker's GPU memory: ``GPU_CONTEXT_BYTES``, the prior's tensors, one chunk of its working
    memory, and the largest peak of a training view over the study's methods (mvsdi.memory)."""
    prior_bytes = sum(t.nbytes for t in vars(prior).values() if isinstance(t, torch.Tensor))
    views = []
    for method in settings.method_list:
        config = cell_config(settings, settings.guidances[0], method, settings.scenes[0], settings.seeds[0])
        views.append(estimate_view_memory(Distiller(config, prior, Model.create(config, device), device)).peak_bytes)
    return GPU_CONTEXT_BYTES + prior_bytes + CHUNK_BYTES + max(views)


class CellPool:
    """Runs ``CellTask``s, submitted in batches, and hands back each result as it finishes: in
    this process (``workers`` <= 1, longest queued task first), or in ``workers`` processes started
    by ``start_method``: by default forked on the CPU, where they share the prior's memory, and
    spawned on a GPU, where a forked CUDA context is unusable (spawned workers get the prior's
    images, and know only the scenes registered when mvsdi.testbed.scenes is imported). Each
    batch is submitted longest first (``expected_cost``)."""

    def __init__(self, settings: StudySettings, prior: IdealDenoiserPrior, device: torch.device, workers: int,
                 start_method: str | None = None):
        self.settings, self.prior, self.device, self.workers = settings, prior, device, workers
        self.start_method = start_method or ("fork" if device.type == "cpu" else "spawn")
        self._queued: list[tuple[int, CellTask]] = []  # in-process
        self._futures: dict[Future, int] = {}  # in worker processes
        self._pool: ProcessPoolExecutor | None = None
        self._threads = torch.get_num_threads()

    def __enter__(self) -> CellPool:
        if self.workers <= 1:
            _start_worker(self.settings, self.prior, self.device)
            return self
        shared = (self.prior if self.start_method == "fork"
                  else {n: self.prior.references(n).cpu() for n in self.prior.scene_names})
        self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(self.start_method),
                                         initializer=_start_worker, initargs=(self.settings, shared, self.device))
        return self

    def __exit__(self, kind, error, trace) -> None:
        if self._pool is None:
            torch.set_num_threads(self._threads)
            _WORKER.clear()
            return
        if error is not None:  # Ctrl-C or a failure: no running cell's result is wanted any more
            _stop_workers(self._pool)
        self._pool.shutdown(wait=error is None, cancel_futures=True)

    @property
    def outstanding(self) -> int:
        """Tasks submitted and not yet handed back."""
        return len(self._queued) + len(self._futures)

    def submit(self, tasks: list[tuple[int, CellTask]]) -> None:
        """Queue ``(key, task)`` pairs."""
        batch = sorted(tasks, key=lambda item: -expected_cost(item[1], self.settings))
        if self._pool is None:
            self._queued = sorted(self._queued + batch, key=lambda item: -expected_cost(item[1], self.settings))
            return
        self._futures |= {self._pool.submit(_run_task, task): key for key, task in batch}

    def next_finished(self) -> tuple[int, dict[str, Any]]:
        """(key, result) of a task that finished (in this process: run the longest queued one now)."""
        if self._pool is None:
            key, task = self._queued.pop(0)
            return key, _run_task(task)
        future = next(iter(wait(self._futures, return_when=FIRST_COMPLETED).done))
        return self._futures.pop(future), future.result()


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate the pool's worker processes. Without this a Ctrl-C left each worker running the
    cell it had queued next (a worker survives the KeyboardInterrupt of its current call), and the
    interpreter's exit waited for those cells: minutes in the medium study, an hour on the CPU at
    the full size."""
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):  # the same, before 3.14
        process.terminate()


@dataclass
class Deadline:
    """Whether another block of cells fits before ``end`` (a ``time.perf_counter`` time: the time
    limit less the reserve for the tables, plots and turntables), predicted from what the finished
    cells cost: seconds per unit of ``expected_cost``, measured in the workers (so under the same
    sharing of the cores or GPU as the cells to come)."""
    end: float
    workers: int
    seconds: float = 0.0  # of the finished cells
    cost: float = 0.0  # their expected cost

    def record(self, cost: float, seconds: float) -> None:
        if cost > 0:
            self.seconds, self.cost = self.seconds + seconds, self.cost + cost

    def fits(self, now: float, outstanding: list[float], block: list[float]) -> bool:
        """Whether ``block``'s cells (expected costs), queued behind the ``outstanding`` ones, end by
        ``end``. Their span is bounded as a list schedule on ``workers`` machines is (Graham):
        total / workers + (1 − 1/workers) · longest; the outstanding cells count whole (some have
        run a while: the bound errs late). Before any cell has finished nothing is measured: no."""
        if self.cost == 0:
            return False
        work = [c * self.seconds / self.cost for c in (*outstanding, *block)]
        span = sum(work) / self.workers + (1 - 1 / self.workers) * max(work)
        return now + span <= self.end
