"""Running one cell: generate its run directory (unless done), measure it, write ``bench_metrics.json``.

This is what an executor's worker calls; it returns a small JSON-able record for ``OUT/cells.jsonl``.
A failure inside a cell is retried and then returned as a "failed" record with the error text. A
problem that no retry can fix and that every cell would hit (the prior's or a metric's weights
cannot be loaded) is raised as ``FatalBenchError`` so the bench stops with the loader's message.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from mvsdi import generate as gen
from mvsdi.atomic_files import atomic_write_json
from mvsdi.bench.matrix import Cell, differences_on_disk, is_done, run_status
from mvsdi.config import is_ideal
from mvsdi.evaluate.clip_metrics import MetricLoadError
from mvsdi.evaluate.runs import Evaluator, evaluate_run
from mvsdi.models import load_prior
from mvsdi.priors.loading import resolve_device
from mvsdi.priors.stable_diffusion import PriorLoadError
from mvsdi.rundir import SUMMARY, RunDirectoryError, load_trained_model
from mvsdi.testbed.metrics import evaluate_field

CELL_METRICS = "bench_metrics.json"  # per-cell metrics, flat, read back by the aggregation
TESTBED_METRICS = ("psnr", "iou", "r_precision", "janus")  # evaluate_field's, against the true scene


class FatalBenchError(RuntimeError):
    """Every cell would fail the same way (weights that cannot be loaded): stop the bench and say why."""


@dataclass(frozen=True)
class EvalSettings:
    """How cells are measured; picklable, so it travels to worker processes and Ray tasks."""

    metrics: tuple[str, ...]
    candidates: tuple[str, ...] = ()  # R-Precision's prompts (Stable Diffusion prior only)
    # (Evaluator field, hub id or local path) of the metric models given by the user, e.g. ("clip_b32", "/models/clip")
    weights: tuple[tuple[str, str], ...] = ()
    iou_resolution: int = 64

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # as read back from JSON: lists, not tuples

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalSettings":
        return cls(metrics=tuple(data["metrics"]), candidates=tuple(data["candidates"]),
                   weights=tuple(tuple(pair) for pair in data["weights"]), iou_resolution=data["iou_resolution"])


_EVALUATORS: dict[tuple, Any] = {}  # one per worker process: CLIP models load once, not per cell


def _evaluator(settings: EvalSettings, device: torch.device):
    key = (settings, str(device))
    if key not in _EVALUATORS:
        _EVALUATORS[key] = Evaluator(settings.metrics, settings.candidates, device=device, **dict(settings.weights))
    return _EVALUATORS[key]


def flatten_clip_metrics(metrics: dict[str, Any]) -> dict[str, float | None]:
    """``mvsdi eval``'s nested metrics → one number per name (clip_iqa's parts become clip_iqa_<part>)."""
    flat: dict[str, float | None] = {}
    for name, value in metrics.items():
        if not isinstance(value, dict):
            continue
        if "mean" in value or "value" in value:
            flat[name] = value.get("mean", value.get("value"))
        for part, sub in value.items():
            if isinstance(sub, dict) and "mean" in sub:
                flat[f"{name}_{part}"] = sub["mean"]
    return flat


def measure_clip(cell: Cell, settings: EvalSettings, device: torch.device) -> dict[str, Any]:
    result = evaluate_run(cell.path, _evaluator(settings, device))  # also writes the detailed metrics.json
    divergence = result["divergence"]
    return {"metrics": flatten_clip_metrics(result.get("metrics", {})), "diverged": bool(divergence["diverged"]),
            "diverged_reason": divergence.get("reason") or ""}


_PRIORS: dict[tuple[str, str], Any] = {}


def measure_testbed(cell: Cell, settings: EvalSettings, device: torch.device) -> dict[str, Any]:
    """The testbed's metrics against the true scene named by the prompt (``evaluate_field``)."""
    config, model = load_trained_model(cell.path, device)
    key = (config.model, str(device))
    if key not in _PRIORS:
        _PRIORS[key] = load_prior(config.model, device)
    result = evaluate_field(model.field, model.background, config.prompt, _PRIORS[key], n_views=config.eval_views,
                            size=config.eval_resolution, n_samples=config.samples_per_ray,
                            iou_resolution=settings.iou_resolution)
    return {"metrics": {m: result[m] for m in settings.metrics}, "diverged": bool(result["diverged"]),
            "diverged_reason": result["diverged_reason"]}


def measure(cell: Cell, settings: EvalSettings) -> dict[str, Any]:
    """Measure a done cell and store the numbers in its run directory."""
    device = resolve_device(cell.config.device)
    measured = (measure_testbed if is_ideal(cell.config.model) else measure_clip)(cell, settings, device)
    summary = json.loads((cell.path / SUMMARY).read_text())
    if summary.get("status") == "diverged":  # training itself gave up (non-finite loss)
        measured.update(diverged=True, diverged_reason=measured["diverged_reason"] or "training diverged")
    atomic_write_json(cell.path / CELL_METRICS, {"cell": cell.key, "settings": settings.to_dict(), **measured})
    return measured


def needs_measurement(cell: Cell, settings: EvalSettings) -> bool:
    """No metrics yet, or metrics measured with other settings (other metrics, CLIP weights, IoU grid)."""
    try:
        return json.loads((cell.path / CELL_METRICS).read_text())["settings"] != settings.to_dict()
    except (OSError, ValueError, KeyError, TypeError):
        return True


def _status(path: Path) -> str | None:
    try:
        return json.loads((path / SUMMARY).read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def _is_fatal(exc: BaseException) -> bool:
    return isinstance(exc, (PriorLoadError, MetricLoadError))


def _train(cell: Cell) -> tuple[str, Path]:
    """Continue an interrupted run of this very config from its checkpoint; otherwise train from the start."""
    if run_status(cell) == "interrupted" and not differences_on_disk(cell):
        try:
            return "resumed", gen.resume(cell.path, progress=False)
        except RunDirectoryError:  # no usable checkpoint (or nothing left to run): start again
            pass
    return "generated", gen.generate(cell.config, cell.path, overwrite=True, progress=False)


def _attempt(cell: Cell, settings: EvalSettings) -> str:
    """One try at a cell: train it unless done, measure it unless measured with these settings."""
    if is_done(cell):
        action = "skipped"
    else:
        action, written = _train(cell)
        if _status(written) == "interrupted":  # Ctrl-C: generate saved the run; stop the whole bench
            raise KeyboardInterrupt
    if action != "skipped" or needs_measurement(cell, settings):
        measure(cell, settings)
    return action


def run_cell(cell: Cell, settings: EvalSettings, retries: int = 1) -> dict[str, Any]:
    """Run, measure and describe one cell; tries 1 + ``retries`` times before recording it as failed."""
    started = time.time()
    # where it ran: the node and the GPU(s) the executor gave this worker
    where = {"host": socket.gethostname(), "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    errors: list[str] = []
    for _ in range(1 + retries):
        try:
            action = _attempt(cell, settings)
            return {"cell": cell.key, "status": action, "attempts": len(errors) + 1,
                    "seconds": round(time.time() - started, 3), **where}
        except Exception as exc:  # noqa: BLE001 - any failure of one cell is recorded, not raised
            if _is_fatal(exc):
                raise FatalBenchError(str(exc)) from exc
            errors.append("".join(traceback.format_exception_only(type(exc), exc)).strip())
    return {"cell": cell.key, "status": "failed", "attempts": len(errors), "error": errors[-1],
            "errors": errors, "seconds": round(time.time() - started, 3), **where}
