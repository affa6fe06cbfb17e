"""A run's convergence curve: the CLIP score of its fixed front view at each validation point.

``mvsdi generate`` saves, every tenth of the run, the front view (azimuth 0, elevation 15°: the
evaluation's view 0) and one line of ``RUN/validation/convergence.jsonl`` with the cost spent so
far. Here each of those images is scored against the run's prompt with the CLIP score's model
(ViT-B/32, cosine, not ×100), and the curve is written as ``RUN/convergence.json`` and plotted in
``RUN/convergence.png`` against guidance evaluations and against UNet forward passes (batch
elements through the UNet, ``unet_images``; see ``mvsdi.generate.Validation``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from mvsdi.atomic_files import atomic_write_json
from mvsdi.evaluate import clip_metrics as cm
from mvsdi.evaluate.run_folder import Run, RunError, load_images
from mvsdi.generate import CONVERGENCE_POINTS as POINTS_FILE  # in RUN/validation
from mvsdi.plotting import save_figure, subplots
from mvsdi.rundir import VALIDATION

CONVERGENCE_FILE = "convergence.json"
CONVERGENCE_PLOT = "convergence.png"
POINT_KEYS = ("step", "fraction", "guidance_evaluations", "unet_forward_passes", "unet_calls", "image")
X_AXES = {"guidance_evaluations": "guidance evaluations spent (one per view)",
          "unet_forward_passes": "UNet forward passes spent (batch elements through the UNet)"}


def _point(line: str, where: str, folder: Path) -> dict[str, Any]:
    """One line of convergence.jsonl, checked: its keys, and that the image it names exists."""
    try:
        point = json.loads(line)
    except ValueError as exc:
        raise RunError(f"{where} is not JSON ({exc}); the file is damaged: regenerate the run") from exc
    missing = [k for k in POINT_KEYS if not isinstance(point, dict) or k not in point]
    if missing:
        raise RunError(f"{where} lacks {', '.join(missing)}; was it written by `mvsdi generate`?")
    if not (folder / str(point["image"])).is_file():
        raise RunError(f"{where} names {point['image']}, which is not in {folder}; regenerate the run")
    return point


def read_points(run_path: Path) -> list[dict[str, Any]] | None:
    """The run's convergence points in order; None when it has none (a run from before they existed)."""
    folder = Path(run_path) / VALIDATION
    path = folder / POINTS_FILE
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()
    points = [_point(line, f"{path} line {i}", folder) for i, line in enumerate(lines, 1) if line.strip()]
    return points or None


def front_scores(images: Sequence[torch.Tensor], prompt: str, evaluator) -> list[float]:
    """CLIP score (cosine with the prompt) of each image, with the evaluator's ViT-B/32."""
    scorer = evaluator.model("b32")
    text = evaluator.texts("b32", [prompt])[0]
    # one at a time: images of one run share a size, but nothing here needs them to
    embeds = torch.cat([scorer.embed_images(image[None]) for image in images])
    return [float(v) for v in cm.clip_score(embeds, text)]


def curve(run: Run, points: list[dict[str, Any]], evaluator) -> dict[str, Any]:
    images = load_images([run.path / VALIDATION / p["image"] for p in points])
    scores = front_scores(images, run.prompt, evaluator)
    return {"prompt": run.prompt, "metric": "clip_score", "model": evaluator.clip_b32,
            "camera": points[0].get("camera"), "x_axes": X_AXES,
            "points": [{**{k: p[k] for k in POINT_KEYS}, "clip_score": round(s, 6)} for p, s in zip(points, scores)]}


def write_convergence(run: Run, evaluator) -> dict[str, Any] | None:
    """RUN/convergence.json and .png when the run has convergence points and the CLIP score is asked for
    (its ViT-B/32 is then loaded anyway); None otherwise."""
    if "clip_score" not in evaluator.metrics:
        return None
    points = read_points(run.path)
    if points is None:
        return None
    result = curve(run, points, evaluator)
    atomic_write_json(run.path / CONVERGENCE_FILE, result)
    plot_run(result, run.path / CONVERGENCE_PLOT)
    return result


def plot_run(result: dict[str, Any], out: Path) -> Path:
    """Two panels: the CLIP score against guidance evaluations, and against UNet forward passes."""
    fig, axes = subplots(1, 2, figsize=(8, 3.2))
    scores = [p["clip_score"] for p in result["points"]]
    for ax, (key, label) in zip(axes[0], X_AXES.items()):
        ax.plot([p[key] for p in result["points"]], scores, marker="o")
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("CLIP score, front view")
    fig.suptitle(result["prompt"], fontsize=9)
    return save_figure(fig, out)
