"""``mvsdi generate``: one prompt → a trained field and a complete run directory."""

from __future__ import annotations

import platform
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mvsdi
from mvsdi.config import RunConfig
from mvsdi.distill import Distiller, Model, train
from mvsdi.priors.loading import load_prior, resolve_device
from mvsdi.rundir import RunDirectory, to_uint8


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"mvsdi": mvsdi.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def _peak_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    # ru_maxrss is in KiB on Linux: the whole process's peak resident memory
    return {"peak_process_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class Progress:
    """A tqdm bar counting guidance evaluations (so its rate is evaluations/s and its ETA is honest)."""

    def __init__(self, config: RunConfig, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=config.budget, unit="eval", disable=not enabled, dynamic_ncols=True)

    def __call__(self, record: dict[str, Any]) -> None:
        self.bar.update(record["guidance_evaluations"] - self.bar.n)
        self.bar.set_postfix(t=min(record["t"]), loss=f"{record['loss']:.4g}", unet=record["unet_calls"], refresh=False)

    def close(self) -> None:
        self.bar.close()


def write_evaluation(run: RunDirectory, distiller: Distiller) -> int:
    """The evaluation renders (PNG per view, RGB and normals) and a turntable video of both side by side."""
    frames = []
    for i, out in enumerate(distiller.evaluation_renders()):
        rgb = out.rgb[0]
        normal = (torch.nn.functional.normalize(out.normal[0], dim=-1) * 0.5 + 0.5) * out.opacity[0]
        run.save_image(f"{i:03d}.png", rgb)
        run.save_image(f"normal_{i:03d}.png", normal)
        frames.append(np.concatenate([to_uint8(rgb), to_uint8(normal)], axis=1))
    run.save_video(frames)
    return len(frames)


def generate(config: RunConfig, out: Path, overwrite: bool = False, progress: bool = True) -> Path:
    """Train ``config`` and write its run directory at ``out``; returns the committed path.

    Nothing is written at ``out`` until the run completes (see ``RunDirectory``).
    """
    device = resolve_device(config.device)
    run = RunDirectory(out, overwrite=overwrite)
    try:
        prior = load_prior(config.model, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        run.write_config(config.to_dict())
        distiller = Distiller(config, prior, Model.create(config, device), device)
        bar = Progress(config, progress)

        def on_step(record: dict[str, Any]) -> None:
            run.log(record)
            bar(record)

        try:
            wall = train(distiller, on_step=on_step, on_checkpoint=run.save_checkpoint)
        finally:
            bar.close()
        started = time.perf_counter()
        n_renders = write_evaluation(run, distiller)
        run.write_summary({
            "status": "completed", "prompt": config.prompt, "preset": config.preset,
            "steps": distiller.counters.steps, "views_per_step": config.views,
            "skipped_steps": distiller.counters.skipped_steps,
            "guidance_evaluations": distiller.counters.guidance_evaluations,
            "unet_calls": prior.counters.calls, "unet_images": prior.counters.images,
            "train_seconds": wall, "evaluation_seconds": time.perf_counter() - started,
            "evaluations_per_second": distiller.counters.guidance_evaluations / max(wall, 1e-9),
            "evaluation_renders": n_renders, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            **_peak_memory(device), "versions": _versions(),
        })
        return run.commit()
    except BaseException:
        run.discard()
        raise
