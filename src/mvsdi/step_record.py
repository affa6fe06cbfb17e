"""What one optimiser step reports: ``Distiller.step`` returns it, ``generate`` logs and shows it.

``StepRecord.to_log()`` is one line of a run's ``log.jsonl``, a documented file format (README's
run directory table): its keys and their order are those the log has always had.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class StepRecord:
    step: int  # 0-based index of the step in the current trajectory (a rollback runs indices again)
    fraction: float  # budget fraction spent before the step: what the schedules were evaluated at
    t: list[int]  # each view's diffusion timestep
    loss: float  # sum of the loss terms
    loss_terms: dict[str, float]  # name → weighted term, mean over the views (logged as loss_<name>)
    guidance_evaluations: int  # spent after this step, those of steps a rollback discarded included
    unet_calls: int  # UNet launches of the run so far
    unet_calls_step: int  # UNet launches of this step
    unet_images: int  # batch elements through the UNet so far (a CFG call on one view counts 2)
    lr: float  # learning rate of the field's parameter group
    levels: int  # hash-grid levels active in the step's renders
    shading: list[str]  # each view's shading
    grad_norm: float  # ‖∇‖ over all parameters, before the optimiser step
    skipped: bool  # not applied: its loss or gradient was not finite
    batched_views: bool  # whether the views' guidance targets came from one batched prior pass
    samples_per_ray_evaluated: float  # field evaluations per ray of the renders with a graph, mean over views
    aggregation: dict[str, Any]  # the aggregation's log values (CW-MV-SDI: consensus_weights, _agreement, _sharpness)
    wall_s: float | None = None  # seconds since ``train`` began, when the step ran inside it

    def to_log(self) -> dict[str, Any]:
        """The step's line of ``log.jsonl``, as a JSON-ready dict in the log's key order."""
        line = {"step": self.step, "fraction": self.fraction, "t": self.t, "loss": self.loss,
                **{f"loss_{name}": value for name, value in self.loss_terms.items()},
                "guidance_evaluations": self.guidance_evaluations, "unet_calls": self.unet_calls,
                "unet_calls_step": self.unet_calls_step, "unet_images": self.unet_images, "lr": self.lr,
                "levels": self.levels, "shading": self.shading, "grad_norm": self.grad_norm, "skipped": self.skipped,
                "batched_views": self.batched_views, "samples_per_ray_evaluated": self.samples_per_ray_evaluated,
                **self.aggregation}
        if self.wall_s is not None:
            line["wall_s"] = self.wall_s
        return line
