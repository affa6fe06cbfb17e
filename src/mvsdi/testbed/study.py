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
import torch

from mvsdi.atomic_files import atomic_write_bytes, atomic_write_json
from mvsdi.cameras import evaluation_cameras
from mvsdi.images import to_uint8
from mvsdi.priors.loading import resolve_device
from mvsdi.testbed.cells import (CellPool, CellTask, Deadline, default_workers, expected_cost, study_blocks,
                                 study_tasks)
from mvsdi.testbed.figures import (method_caption, plot_budget_axis, plot_metric_vs_budget, plot_variance,
                                   write_turntables)
from mvsdi.testbed.prior import IdealDenoiserPrior, default_cache_dir
from mvsdi.testbed.scenes import SCENES, get_scene, render_truth
from mvsdi.testbed.settings import METRICS, StudySettings, check_settings, output_reserve_seconds
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
                    out: Path, coverage: str | None = None) -> list[dict[str, Any]]:
    """table.md, table.csv and the plots from a study's results and variance rows (also for a study
    written by earlier code: benchmarks/testbed_tables.py); returns the summary table. ``coverage``:
    how many blocks ran and why it stopped (a study with a time limit), said above the tables."""
    table = summarise(results)
    text = study_markdown(table, variance, settings, summarise_equal_steps(results), coverage)
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
    thread, so the results are the same for any number of workers. ``start_method``: see ``cells.CellPool``.
    The cells run in blocks of one scene and seed (``cells.study_blocks``); with
    ``settings.time_limit_minutes`` a block starts only when it is predicted to end before the
    limit less ``settings.output_reserve_seconds`` (``cells.Deadline``), and the tables hold the
    blocks that ran. results.jsonl is rewritten as each block completes.
    """
    check_settings(settings)
    started = time.perf_counter()
    device = resolve_device(settings.device)
    out.mkdir(parents=True, exist_ok=True)
    say = _reporter(progress, log)
    tasks = study_tasks(settings)
    cells = [t for t in tasks if t.method is not None]
    say(f"testbed study: {len(cells)} cells ({len(settings.guidances)} guidance × {len(settings.scenes)} scene × "
        f"{len(settings.seeds)} seed × {len(settings.budgets)} budget × {len(settings.methods)} methods), "
        f"{'/'.join(map(str, settings.budgets))} guidance evaluations each, {settings.image_size}² renders, on {device}"
        + (f", time limit {settings.time_limit_minutes:g} min" if settings.time_limit_minutes else ""))
    # the prior covers every registered scene: their union is the unconditional branch of guidance
    say(f"building the ideal-denoiser prior: {settings.references} reference views of each of the {len(SCENES)} "
        f"scenes at {settings.image_size}² (rendered once, then cached in {default_cache_dir()}) ...")
    prior = IdealDenoiserPrior(n_references=settings.references, image_size=settings.image_size, device=device)
    workers = min(workers or default_workers(device, settings, prior), len(tasks))
    say(f"prior ready ({time.perf_counter() - started:.0f} s); running the cells in {workers} "
        f"worker{'s' * (workers > 1)}"
        + (f" (the first-seed K1 runs also measure the gradient variance of the methods at "
           f"{', '.join(f'{f:g}' for f in settings.variance_fractions)} of the run, "
           f"{settings.variance_repeats} draws each: the longest cells)" if settings.variance_repeats else "") + " ...")
    found, ran, interrupted = _run_blocks(tasks, settings, prior, device, workers, start_method, started, say, out)
    blocks = study_blocks(settings)
    coverage = _coverage(settings, len(ran), len(blocks), interrupted)
    if coverage:
        say(coverage)
    results, variance = _assembled(tasks, found, ran)
    _say_variance_coverage(tasks, ran, settings, say, "the interruption" if interrupted else "the time limit")
    say("writing tables, plots and turntables ...")
    written = time.perf_counter()
    frames, captions = _turntable_frames(tasks, found, ran, settings)
    atomic_write_json(out / "variance.json", variance)
    table = write_summaries(results, variance, settings, out, coverage)
    write_turntables(frames, out, captions)
    meta = {"settings": dataclasses.asdict(settings), "seconds": time.perf_counter() - started,
            "output_seconds": time.perf_counter() - written, "workers": workers, "machine": platform.platform(),
            "device": str(device), "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "blocks": {"ran": len(ran), "of": len(blocks),
                       "stopped_by_time_limit": len(ran) < len(blocks) and not interrupted,
                       "interrupted": interrupted, "coverage": coverage}}
    atomic_write_json(out / "study.json", meta)
    return {"table": table, "variance": variance, **meta}


Block = tuple[str, int]  # (scene, seed)

BLOCK = "a block: one scene and seed, every method and guidance"


def _coverage(settings: StudySettings, ran: int, of: int, interrupted: bool) -> str | None:
    """The line above the tables when not every block may have run (None when the question does not arise)."""
    if interrupted:
        return f"interrupted (Ctrl-C): {ran} of {of} blocks ({BLOCK})"
    if not settings.time_limit_minutes:
        return None
    said = f"time limit: {ran} of {of} blocks" if ran < of else f"all {of} blocks within the time limit"
    return f"{said} ({settings.time_limit_minutes:g} min; {BLOCK})"


def _run_blocks(tasks: list[CellTask], settings: StudySettings, prior: IdealDenoiserPrior, device: torch.device,
                workers: int, start_method: str | None, started: float, say: Callable[[str], None],
                out: Path) -> tuple[list[dict[str, Any] | None], list[Block], bool]:
    """Every admitted task's result (None where its block was not started), the complete blocks in
    the order they completed, and whether Ctrl-C stopped the cells. Without a time limit every block
    is submitted at once; with one, a block is submitted when the workers are about to run out of
    queued cells and ``Deadline.fits`` says it ends in time; the first block always starts (nothing
    is measured before a cell finishes). results.jsonl is rewritten, in the study's order, as each
    block completes. A Ctrl-C after a block has completed stops the workers and keeps the complete
    blocks (the study's outputs are then written over them); before that, it propagates."""
    members: dict[Block, list[int]] = {}
    for i, task in enumerate(tasks):
        members.setdefault((task.scene, task.seed), []).append(i)
    waiting = study_blocks(settings)
    limit = settings.time_limit_minutes
    deadline = (Deadline(started + 60.0 * limit - output_reserve_seconds(settings), workers) if limit else None)
    found: list[dict[str, Any] | None] = [None] * len(tasks)
    left: dict[Block, int] = {}  # unfinished tasks of each admitted block
    ran: list[Block] = []
    try:
        with CellPool(settings, prior, device, workers, start_method) as pool:
            while True:
                while waiting and (deadline is None or _admits(deadline, pool, waiting[0], tasks, members, found, left,
                                                                settings)):
                    block = waiting.pop(0)
                    left[block] = len(members[block])
                    pool.submit([(i, tasks[i]) for i in members[block]])
                if not pool.outstanding:
                    return found, ran, False
                i, found[i] = pool.next_finished()
                _say_finished(say, tasks[i], found[i], sum(r is not None for r in found), len(tasks))
                if deadline is not None:
                    deadline.record(expected_cost(tasks[i], settings), found[i]["seconds"])
                block = (tasks[i].scene, tasks[i].seed)
                left[block] -= 1
                if not left[block]:
                    ran.append(block)
                    results, _ = _assembled(tasks, found, ran)
                    atomic_write_bytes(out / "results.jsonl", "".join(json.dumps(r) + "\n" for r in results).encode())
    except KeyboardInterrupt:  # the pool is shut down; its workers got the same Ctrl-C
        if not ran:
            raise
        return found, ran, True


def _admits(deadline: Deadline, pool: CellPool, block: Block, tasks: list[CellTask], members: dict[Block, list[int]],
            found: list[dict[str, Any] | None], left: dict[Block, int], settings: StudySettings) -> bool:
    """Whether to submit ``block`` now: the first block always; later ones once the workers are about
    to run out of queued cells (so the decision uses the most measurements) and if it ends in time."""
    if not left:
        return True
    if pool.outstanding > pool.workers:
        return False
    outstanding = [i for b, n in left.items() if n for i in members[b] if found[i] is None]
    return deadline.fits(time.perf_counter(), [expected_cost(tasks[i], settings) for i in outstanding],
                         [expected_cost(tasks[i], settings) for i in members[block]])


def _say_finished(say: Callable[[str], None], task: CellTask, result: dict[str, Any], done: int, total: int) -> None:
    last = result["rows"][-1]
    say(f"[{done}/{total}] {task.label()}: " + ", ".join(f"{m} {last[m]:.3f}" for m in METRICS)
        + (f" ({result['seconds']:.0f} s)" if task.method else ""))


def _assembled(tasks: list[CellTask], found: list[dict[str, Any] | None],
               ran: list[Block]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The results rows and variance rows of the complete blocks, in the order of ``tasks``."""
    complete = set(ran)
    kept = [(t, r) for t, r in zip(tasks, found) if (t.scene, t.seed) in complete]
    initial = {(t.scene, t.seed): r["rows"][0] | {"train_seconds": 0.0, "unet_calls": 0}
               for t, r in kept if t.method is None}
    results, variance = [], []
    for task, cell in kept:
        if task.method is None:
            continue
        rows = [dict(initial[(task.scene, task.seed)]), *cell["rows"]]
        results += [{"guidance": task.guidance, "scene": task.scene, "seed": task.seed, "method": task.method.name,
                     "budget": task.budget, **r} for r in rows]
        variance += cell["variance"]
    return results, variance


def _say_variance_coverage(tasks: list[CellTask], ran: list[Block], settings: StudySettings,
                           say: Callable[[str], None], why: str) -> None:
    """A line when ``why`` (the time limit, an interruption) left out some of the variance meter's
    runs (first seed's K1)."""
    measured = {t.scene for t in tasks if t.measures_variance}
    kept = {t.scene for t in tasks if t.measures_variance and (t.scene, t.seed) in set(ran)}
    if measured and kept != measured:
        say(f"gradient variance: measured on {len(kept)} of {len(measured)} scenes "
            f"({', '.join(sorted(kept)) or 'none'}); {why} left out the blocks of the others' "
            f"first seed ({settings.seeds[0]})")


def _turntable_frames(tasks: list[CellTask], found: list[dict[str, Any] | None], ran: list[Block],
                      settings: StudySettings) -> tuple[dict, dict]:
    """The turntable panels and captions per (guidance, scene) of the complete blocks: the truth, then each method."""
    frames: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    captions: dict[tuple[str, str], dict[str, list[str]]] = {}
    for task, cell in zip(tasks, found):
        if task.method is None or not task.keeps_frames or (task.scene, task.seed) not in set(ran):
            continue
        key = (task.guidance, task.scene)
        if key not in frames:
            truth = render_truth(get_scene(task.scene), evaluation_cameras(), settings.image_size)
            frames[key] = {"truth": np.stack([to_uint8(x.permute(1, 2, 0)) for x in truth])}
            captions[key] = {"truth": ["truth", task.scene, f"{task.guidance}, seed {task.seed}"]}
        frames[key][task.method.name] = cell["frames"]
        captions[key][task.method.name] = method_caption(task.method.name, cell["rows"][-1])
    return frames, captions
