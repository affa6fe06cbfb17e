"""Experiment tracking: TensorBoard scalars and validation images, and wandb when asked for.

The x axis of every curve is guidance evaluations spent, not optimiser steps, so runs with
different K (and so different step counts for the same budget) line up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from mvsdi.images import to_uint8
from mvsdi.step_record import StepRecord

TENSORBOARD_DIR = "tensorboard"
# step-record fields plotted as scalars, besides the loss terms (loss_<name>)
SCALARS = ("loss", "guidance_evaluations", "unet_calls", "lr", "levels", "grad_norm", "skipped",
           "samples_per_ray_evaluated")


def check_wandb_available() -> None:
    try:
        import wandb  # noqa: F401
    except ImportError as exc:
        raise ValueError("--wandb was asked for, but wandb is not installed: `pip install wandb`, "
                         "or drop --wandb (TensorBoard logs are written anyway)") from exc


class Tracker:
    def __init__(self, run_folder: Path, config: dict[str, Any], tensorboard: bool = True, wandb: bool = False):
        self.writer = None
        self.wandb_run = None
        if tensorboard:
            self.writer = SummaryWriter(str(Path(run_folder) / TENSORBOARD_DIR), flush_secs=30)
        if wandb:
            check_wandb_available()
            import wandb as wandb_module

            self.wandb_run = wandb_module.init(project="mvsdi", config=config, name=Path(run_folder).name)

    def scalars(self, record: StepRecord) -> dict[str, float]:
        values = {name: float(getattr(record, name)) for name in SCALARS}
        values |= {f"loss_{name}": float(value) for name, value in record.loss_terms.items()}
        if record.t:
            values["t_mean"] = float(np.mean(record.t))
            values["t_min"] = float(np.min(record.t))
        logged = record.aggregation
        if "consensus_weights" in logged:  # CW-MV-SDI, as the reference logs it
            values["consensus_sharpness"] = float(logged["consensus_sharpness"])
            values["consensus_w_max"] = float(np.max(logged["consensus_weights"]))
            values["consensus_w_min"] = float(np.min(logged["consensus_weights"]))
            values["consensus_a_mean"] = float(np.mean(logged["consensus_agreement"]))
            values["consensus_a_min"] = float(np.min(logged["consensus_agreement"]))
        return values

    def log_step(self, record: StepRecord) -> None:
        x = record.guidance_evaluations
        values = self.scalars(record)
        if self.writer:
            for name, value in values.items():
                self.writer.add_scalar(f"train/{name}", value, x)
        if self.wandb_run:
            self.wandb_run.log(values, step=x)

    def log_images(self, evaluations: int, images: dict[str, torch.Tensor]) -> None:
        """``images``: name → [H, W, 3] in [0, 1]."""
        if self.writer:
            for name, image in images.items():
                self.writer.add_image(f"validation/{name}", to_uint8(image), evaluations, dataformats="HWC")
        if self.wandb_run:
            import wandb as wandb_module

            self.wandb_run.log({f"validation/{name}": wandb_module.Image(to_uint8(image))
                                for name, image in images.items()},
                               step=evaluations)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.wandb_run:
            self.wandb_run.finish()
