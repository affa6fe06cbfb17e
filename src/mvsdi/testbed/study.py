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

The parts: ``settings`` (methods, presets, a cell's run), ``cells`` (training and measuring the
cells, in worker processes), ``tables`` and ``figures``; this module runs them in order.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mvsdi.atomic_files import atomic_write_bytes, atomic_write_json
from mvsdi.cameras import evaluation_cameras
from mvsdi.images import to_uint8
from mvsdi.priors.loading import resolve_device
from mvsdi.testbed.cells import default_workers, run_tasks, study_tasks
from mvsdi.testbed.figures import (method_caption, plot_budget_axis, plot_metric_vs_budget, plot_variance,
                                   write_turntables)
from mvsdi.testbed.prior import IdealDenoiserPrior, default_cache_dir
from mvsdi.testbed.scenes import SCENES, get_scene, render_truth
from mvsdi.testbed.settings import StudySettings, check_settings
from mvsdi.testbed.tables import study_markdown, summarise, summarise_equal_steps, table_csv


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
    thread, so the results are the same for any number of workers. ``start_method``: see ``cells.run_tasks``.
    """
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
    found = run_tasks(tasks, settings, prior, device, workers, say, start_method)
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
