"""The distillation loop: a budget of guidance evaluations, K views per optimiser step.

One step (``Distiller.step``) is the paper's update:

    sample K cameras; for each view k: render → encode → guidance target (no grad)
    → loss_k / K → backward → free; then one optimiser step.

Gradients of the K views accumulate in the parameters' ``.grad``, so peak memory is that of one
view whatever K is, and the update equals the gradient of the mean loss over the K views.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from mvsdi.cameras import Cameras, evaluation_cameras, sample_views
from mvsdi.config import RunConfig
from mvsdi.field import Background, Field
from mvsdi.guidance import guidance_loss, guidance_target, timestep
from mvsdi.priors.base import DiffusionPrior
from mvsdi.priors.prompts import PromptConditioning
from mvsdi.regularisers import convexity, opacity_entropy, sparsity
from mvsdi.render import RenderOutput, render
from mvsdi.schedules import fraction_spent


def seeded_generator(device: torch.device | str, *key: int) -> torch.Generator:
    """A generator whose stream depends only on ``key`` (e.g. seed, step, view)."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class Counters:
    guidance_evaluations: int = 0
    steps: int = 0
    skipped_steps: int = 0  # steps not applied because their loss or gradient was not finite


@dataclass
class Model:
    """The trainable 3D representation: density/albedo field plus background."""

    field: Field
    background: Background

    @classmethod
    def create(cls, config: RunConfig, device: torch.device) -> "Model":
        torch.manual_seed(config.seed)  # parameter initialisation is part of the seeded run
        return cls(Field(config.field).to(device), Background().to(device))

    def optimizer(self, config: RunConfig) -> torch.optim.Adam:
        o = config.optim
        return torch.optim.Adam([
            {"params": list(self.field.parameters()), "lr": o.lr, "name": "field"},
            {"params": list(self.background.parameters()), "lr": o.background_lr, "name": "background"},
        ], betas=o.betas, eps=o.eps)

    def state_dict(self) -> dict[str, Any]:
        return {"field": self.field.state_dict(), "background": self.background.state_dict()}

    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.field.parameters(), *self.background.parameters()]

    def gradient_norm(self) -> float:
        """‖∇‖ over all parameters, without concatenating them (16.7M floats for the default grid)."""
        norms = [torch.linalg.vector_norm(p.grad) for p in self.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms)).item()) if norms else 0.0

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.field.load_state_dict(state["field"])
        self.background.load_state_dict(state["background"])


def view_losses(out: RenderOutput, cameras: Cameras, weights: dict[str, float],
                guidance: torch.Tensor) -> dict[str, torch.Tensor]:
    """All loss terms of one view (already weighted), keyed by name; their sum is the view's loss."""
    terms = {"guidance": guidance.sum()}
    if weights["orientation"] > 0:
        terms["orientation"] = weights["orientation"] * out.orientation.sum()
    if weights["sparsity"] > 0:
        terms["sparsity"] = weights["sparsity"] * sparsity(out.opacity).sum()
    if weights["opacity"] > 0:
        terms["opacity"] = weights["opacity"] * opacity_entropy(out.opacity).sum()
    if weights["convexity"] > 1e-6:
        terms["convexity"] = weights["convexity"] * convexity(out.normal, out.opacity, cameras).sum()
    if weights["z_variance"] > 0:
        terms["z_variance"] = weights["z_variance"] * out.z_variance.sum()
    return terms


@dataclass
class Distiller:
    config: RunConfig
    prior: DiffusionPrior
    model: Model
    device: torch.device
    optimizer: torch.optim.Optimizer = field(init=False)
    conditioning: PromptConditioning = field(init=False)
    counters: Counters = field(default_factory=Counters)

    def __post_init__(self) -> None:
        self.optimizer = self.model.optimizer(self.config)
        self.conditioning = PromptConditioning(self.prior, self.config.prompt, self.config.prompts)

    def needs_normals(self, weights: dict[str, float], shading: str) -> bool:
        return shading != "albedo" or weights["orientation"] > 0 or weights["convexity"] > 1e-6

    def render_view(self, camera: Cameras, shading: str, generator: torch.Generator,
                    weights: dict[str, float]) -> RenderOutput:
        c = self.config
        return render(self.model.field, self.model.background, camera, c.resolution, c.resolution,
                      n_samples=c.samples_per_ray, shading=shading, perturb=c.perturb_samples,
                      generator=generator, need_normals=self.needs_normals(weights, shading))

    def accumulate_gradients(self, fraction: float, key: tuple[int, ...]) -> dict[str, Any]:
        """Sample K views and backward each view's loss / K into the parameters' ``.grad``.

        All randomness comes from generators seeded by ``key`` (the step's) and ``key + (k,)``
        (view k's). Returns the mean loss terms, the views' t and their shadings.
        """
        c = self.config
        self.model.field.set_active_levels(c.schedules.levels(fraction, c.field.n_levels))
        step_rng = seeded_generator("cpu", *key)
        cameras = sample_views(c.sampler, c.views, step_rng, c.cameras)
        weights = c.schedules.weights.at(fraction)
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}
        shadings, ts = [], []
        for k in range(c.views):
            view_rng = seeded_generator(self.device, *key, k)
            shading = c.schedules.shading(fraction, view_rng)
            t = timestep(c.guidance, fraction, view_rng, self.prior.num_train_timesteps)
            shadings.append(shading)
            ts.append(t)
            camera = cameras[k].to(self.device)
            out = self.render_view(camera, shading, view_rng, weights)
            latents = self.prior.encode_images(out.rgb.permute(0, 3, 1, 2))
            target = guidance_target(c.guidance, self.conditioning, self.prior.alphas_cumprod, latents,
                                     camera, t, [view_rng])
            terms = view_losses(out, camera, weights, guidance_loss(c.guidance, latents, target))
            (sum(terms.values()) / c.views).backward()
            for name, value in terms.items():  # detached tensors: no host sync per term and view
                totals[name] = totals.get(name, 0.0) + value.detach() / c.views
            del out, latents, target, terms  # free the view's graph before the next view
        values = torch.stack(list(totals.values())).tolist()  # one host sync per step
        return {"t": ts, "terms": dict(zip(totals, values)), "shading": shadings}

    def step(self) -> dict[str, Any]:
        """One optimiser step over K views; returns the step's log record.

        A step whose loss or gradient is not finite is not applied (Adam's moments would carry
        the NaN forever); its evaluations still count against the budget and it is logged.
        """
        c, step = self.config, self.counters.steps
        fraction = fraction_spent(step, c.views, c.budget)
        calls_before = self.prior.counters.calls
        result = self.accumulate_gradients(fraction, (c.seed, step))
        loss = sum(result["terms"].values())
        grad_norm = self.model.gradient_norm()
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            self.counters.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        self.counters.steps += 1
        self.counters.guidance_evaluations += c.views
        return {
            "step": step, "fraction": fraction, "t": result["t"], "loss": loss,
            **{f"loss_{k}": v for k, v in result["terms"].items()},
            "guidance_evaluations": self.counters.guidance_evaluations,
            "unet_calls": self.prior.counters.calls, "unet_calls_step": self.prior.counters.calls - calls_before,
            "unet_images": self.prior.counters.images,
            "lr": self.optimizer.param_groups[0]["lr"], "levels": self.model.field.active_levels,
            "shading": result["shading"], "grad_norm": grad_norm, "skipped": skipped,
        }

    @torch.no_grad()
    def evaluation_renders(self, n: int | None = None, resolution: int | None = None) -> list[RenderOutput]:
        """The evaluation views (evenly spaced azimuths, elevation 15°, distance 2, fovy 70°), albedo."""
        c = self.config
        cams = evaluation_cameras(n or c.eval_views)
        res = resolution or c.eval_resolution
        return [render(self.model.field, self.model.background, cams[i].to(self.device), res, res,
                       n_samples=c.samples_per_ray, shading="albedo", need_normals=True)
                for i in range(len(cams))]

    def checkpoint_state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "counters": vars(self.counters).copy(), "prior_calls": self.prior.counters.calls,
                "config": self.config.to_dict()}


def train(distiller: Distiller, on_step: Callable[[dict[str, Any]], None] | None = None,
          on_checkpoint: Callable[[dict[str, Any]], None] | None = None) -> float:
    """Run all remaining steps of the budget; returns wall seconds spent."""
    c = distiller.config
    start = time.perf_counter()
    while distiller.counters.steps < c.steps:
        record = distiller.step()
        record["wall_s"] = time.perf_counter() - start
        if on_step:
            on_step(record)
        done = distiller.counters.steps
        if on_checkpoint and (done % c.checkpoint_every == 0 or done == c.steps):
            on_checkpoint(distiller.checkpoint_state())
    return time.perf_counter() - start
