"""The distillation loop: a budget of guidance evaluations, K views per optimiser step.

One step (``Distiller.step``) is the paper's update:

    sample K cameras; for each view k: render → encode → guidance target (no grad)
    → loss_k / K → backward → free; then one optimiser step.

Gradients of the K views accumulate in the parameters' ``.grad``, so peak memory is that of one
view whatever K is, and the update equals the gradient of the mean loss over the K views. The
aggregation is an estimator of its own (``mvsdi.aggregation``: the mean, or CW-MV-SDI's consensus
weights), and the guidance targets come from one of two interchangeable sources (each view in its
own pass, or all K from one batched prior pass).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from mvsdi.aggregation import ConsensusWeighting, mean_gradient
from mvsdi.cameras import Cameras, sample_views
from mvsdi.config import RunConfig
from mvsdi.field import Background, Field
from mvsdi.guidance import guidance_loss, guidance_target, timestep
from mvsdi.occupancy import OccupancyGrid, density_function, density_threshold_for
from mvsdi.priors.base import DiffusionPrior
from mvsdi.priors.prompts import PromptConditioning
from mvsdi.regularisers import convexity, opacity_entropy, sparsity, total_variation
from mvsdi.render import RenderOutput, render
from mvsdi.run_state import Counters, roll_back, snapshot
from mvsdi.schedules import fraction_spent
from mvsdi.step_record import StepRecord


def seeded_generator(device: torch.device | str, *key: int) -> torch.Generator:
    """A generator whose stream depends only on ``key`` (e.g. seed, step, view)."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(seed)


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
    if weights["tv"] > 0:
        terms["tv"] = weights["tv"] * total_variation(out.rgb).sum()
    return terms


@dataclass
class StepViews:
    """What a step draws for its K views before rendering: cameras, shading, t, one generator each."""

    cameras: Cameras
    shadings: list[str]
    ts: list[int]
    generators: list[torch.Generator]


@dataclass
class ViewTargets:
    """Per view: its latents → its guidance target, and the generator its graph render draws from."""

    of_latents: list[Callable[[torch.Tensor], torch.Tensor]]
    generators: list[torch.Generator]


@dataclass
class AutoBatching:
    """``--view-batching auto`` on CUDA: a trial of four steps, then the faster way for the rest.

    Steps 1 and 2 of the trial warm up each way (first-call costs: allocator growth, kernel
    selection, graph capture), steps 3 and 4 are timed, one each way; the gradient is the same
    either way up to float rounding, so the choice changes only speed. A resumed process runs its
    own trial.
    """

    TRIAL_STEPS = 4
    trial: list[tuple[bool, float]] = field(default_factory=list)  # (batched, seconds) of each trial step

    def batches(self) -> bool:
        if len(self.trial) < self.TRIAL_STEPS:
            return len(self.trial) % 2 == 1  # sequential, batched, sequential, batched
        return self.choice()

    def record(self, batched: bool, seconds: float) -> None:
        if len(self.trial) < self.TRIAL_STEPS:
            self.trial.append((batched, seconds))

    def choice(self) -> bool:
        timed = dict(self.trial[2:])
        return timed[True] < timed[False]


@dataclass
class Distiller:
    config: RunConfig
    prior: DiffusionPrior
    model: Model
    device: torch.device
    optimizer: torch.optim.Optimizer = field(init=False)
    conditioning: PromptConditioning = field(init=False)
    counters: Counters = field(default_factory=Counters)
    # the training renders' occupancy grid (``config.render``); built and updated by ``step``
    occupancy: OccupancyGrid | None = field(default=None, init=False)
    consensus: ConsensusWeighting | None = field(default=None, init=False)  # CW-MV-SDI's weights, if chosen
    auto_batching: "AutoBatching" = field(default_factory=lambda: AutoBatching(), init=False)
    _render_tally: list[float] = field(default_factory=lambda: [0.0, 0.0], init=False)  # samples/ray sum, views

    def __post_init__(self) -> None:
        self.optimizer = self.model.optimizer(self.config)
        aggregation = self.config.aggregation
        if aggregation.kind == "consensus":
            self.consensus = ConsensusWeighting(aggregation).to(self.device)
            if self.consensus.trained():  # τ in its own Adam group, as in the reference
                self.optimizer.add_param_group({"params": self.consensus.trained(), "lr": aggregation.tau_lr,
                                                "name": "consensus"})
        self.conditioning = PromptConditioning(self.prior, self.config.prompt, self.config.prompts)

    def needs_normals(self, weights: dict[str, float], shading: str) -> bool:
        return shading != "albedo" or weights["orientation"] > 0 or weights["convexity"] > 1e-6

    def render_view(self, camera: Cameras, shading: str, generator: torch.Generator,
                    weights: dict[str, float]) -> RenderOutput:
        c = self.config
        out = render(self.model.field, self.model.background, camera, c.resolution, c.resolution,
                     n_samples=c.samples_per_ray, shading=shading, perturb=c.perturb_samples,
                     generator=generator, need_normals=self.needs_normals(weights, shading),
                     **self.render_settings(self.training_grid()))
        if torch.is_grad_enabled():  # the renders that backward; a batched step's pre-renders are not counted
            self._render_tally[0] += out.stats["samples_per_ray"]
            self._render_tally[1] += 1
        return out

    # -- the occupancy grid ------------------------------------------------------------------------

    def _new_grid(self) -> OccupancyGrid | None:
        c, r = self.config, self.config.render
        if not r.occupancy_grid:
            return None
        threshold = density_threshold_for(r.alpha_threshold, c.samples_per_ray, c.field.bound)
        return OccupancyGrid(r.grid_resolution, c.field.bound, threshold, r.grid_decay, self.device)

    def _grid_period(self, fraction: float) -> int:
        """Refresh periods elapsed at budget ``fraction``: the same for every K at the same fraction."""
        return round(fraction * self.config.budget) // self.config.render.grid_refresh_every

    def training_grid(self) -> OccupancyGrid | None:
        """The run's grid, initialised from the current field on first use (None: dense renders)."""
        if self.occupancy is None:
            self.occupancy = self._new_grid()
        if self.occupancy is not None and not self.occupancy.ready:
            fraction = fraction_spent(self.counters.steps, self.config.views, self.config.budget)
            self.occupancy.initialise(density_function(self.model.field), self._grid_period(fraction))
        return self.occupancy

    def current_grid(self) -> OccupancyGrid | None:
        """The training grid once training has built it; before that, one built from the field for
        this use alone, so a render before the first step (evaluation, the memory probe) changes no
        state of the run."""
        if self.occupancy is not None and self.occupancy.ready:
            return self.occupancy
        grid = self._new_grid()
        if grid is not None:
            grid.initialise(density_function(self.model.field))
        return grid

    def update_occupancy(self, fraction: float) -> None:
        """Before the step at ``fraction``: initialise the grid, or refresh it when a refresh period
        has begun since its last update. The jitter is keyed by the period, not the step, so runs
        with another K draw the same points at the same budget fraction."""
        c = self.config
        if not c.render.occupancy_grid:
            return
        self.model.field.set_active_levels(c.schedules.levels(fraction, c.field.n_levels))  # what the step renders
        grid, period = self.training_grid(), self._grid_period(fraction)
        if period > grid.period:
            jitter = seeded_generator("cpu", c.seed, OCCUPANCY_STREAM, period)
            grid.refresh(density_function(self.model.field), period, jitter)

    def render_settings(self, grid: OccupancyGrid | None) -> dict[str, Any]:
        """The keyword arguments of ``render`` for this run's empty-space skipping with ``grid``."""
        r = self.config.render
        return {"occupancy": grid, "alpha_threshold": r.alpha_threshold,
                "transmittance_threshold": r.transmittance_threshold, "chunk_samples": r.chunk_samples}

    def _load_grid(self, state: dict[str, Any] | None) -> None:
        """The grid of a snapshot (a snapshot taken before the first step has none: rebuilt on use)."""
        self.occupancy = self._new_grid()
        if self.occupancy is not None:
            self.occupancy.load_state_dict(state)

    def accumulate_gradients(self, fraction: float, key: tuple[int, ...]) -> dict[str, Any]:
        """The step's gradient, left in the parameters' ``.grad``: K views, aggregated.

        All randomness comes from generators seeded by ``key`` (the step's) and ``key + (k,)``
        (view k's). Returns the mean loss terms, the views' t, their shadings and the aggregation's
        log values (CW-MV-SDI's weights).
        """
        c = self.config
        self.model.field.set_active_levels(c.schedules.levels(fraction, c.field.n_levels))
        views = self._draw_views(fraction, key)
        weights = c.schedules.weights.at(fraction)
        targets = self._batched_targets(views, weights) if self.batches_views() else self._sequential_targets(views)
        terms: list[dict[str, torch.Tensor]] = []

        def loss_of(k: int) -> torch.Tensor:
            """View k's whole loss with its graph: render → encode → guidance target → loss terms."""
            out = self.render_view(views.cameras[k], views.shadings[k], targets.generators[k], weights)
            latents = self.prior.encode_images(out.rgb.permute(0, 3, 1, 2))
            view_terms = view_losses(out, views.cameras[k], weights,
                                     guidance_loss(c.guidance, latents, targets.of_latents[k](latents)))
            terms.append({name: value.detach() for name, value in view_terms.items()})
            return sum(view_terms.values())

        self.optimizer.zero_grad(set_to_none=True)
        loss_of_views = [lambda k=k: loss_of(k) for k in range(c.views)]
        if self.consensus is None:
            aggregation = mean_gradient(loss_of_views)  # the paper's g = (1/K) Σ_k ∇L(c_k)
        else:
            aggregation = self.consensus(loss_of_views, self.model.parameters())
        totals = {name: sum(view[name] for view in terms) / c.views for name in terms[0]}
        values = torch.stack(list(totals.values())).tolist()  # one host sync per step
        return {"t": views.ts, "terms": dict(zip(totals, values)), "shading": views.shadings,
                "aggregation": aggregation}

    def _draw_views(self, fraction: float, key: tuple[int, ...]) -> "StepViews":
        """The step's K cameras; then each view draws its shading and its t from its own generator.

        Render and guidance draw from that generator next, so the order of the views (or batching
        them) changes no random number.
        """
        c = self.config
        cameras = sample_views(c.sampler, c.views, seeded_generator("cpu", *key), c.cameras).to(self.device)
        generators = [seeded_generator(self.device, *key, k) for k in range(c.views)]
        shadings = [c.schedules.shading(fraction, g) for g in generators]
        ts = [timestep(c.guidance, fraction, g, self.prior.num_train_timesteps) for g in generators]
        return StepViews(cameras, shadings, ts, generators)

    def batches_views(self) -> bool:
        """Whether this step's K guidance targets come from one batched prior pass.

        Batching saves UNet launches (on CUDA a call is launch-bound: K latents cost about what one
        does) but costs a no-graph render of every view first, which at large resolutions can cost
        more than it saves. So "auto" measures on CUDA (``AutoBatching``) and keeps the faster; on
        the CPU it never batches (the extra render only adds time, and CPU results stay those of
        the sequential reference bit for bit). SDI without its t-anneal never batches: views of
        different t cannot share one inversion grid.
        """
        c = self.config
        if c.views == 1 or (c.guidance.kind == "sdi" and not c.guidance.t_anneal):
            return False
        if c.view_batching != "auto":
            return c.view_batching == "batched"
        return self._measures_batching() and self.auto_batching.batches()

    def _measures_batching(self) -> bool:
        return self.device.type == "cuda"

    # -- two interchangeable ways to compute the K guidance targets ------------------------------

    def _sequential_targets(self, views: "StepViews") -> "ViewTargets":
        """Each view's target from its own latents, computed inside its graph pass (no extra render)."""
        c = self.config

        def target(k: int, latents: torch.Tensor) -> torch.Tensor:
            return guidance_target(c.guidance, self.conditioning, self.prior.alphas_cumprod, latents,
                                   views.cameras[k], views.ts[k], [views.generators[k]])

        return ViewTargets([lambda z, k=k: target(k, z) for k in range(c.views)], views.generators)

    @torch.no_grad()
    def _batched_targets(self, views: "StepViews", weights: dict[str, float]) -> "ViewTargets":
        """The K views' targets from renders without a graph and one prior pass.

        Only the K detached latents are kept, so memory stays that of one view. Each generator
        draws its render's randomness here, exactly as in the sequential path, before the guidance
        draws its noise (SDS) or δ and inversion noise (SDI) from it; the graph renders then replay
        copies of the generators as they were before. SDS batches with a t per sample; SDI's
        annealed t is shared, so the views share one inversion grid.
        """
        c = self.config
        replays = [self._copy_generator(g) for g in views.generators]
        latents = torch.cat([self.prior.encode_images(
            self.render_view(views.cameras[k], views.shadings[k], views.generators[k], weights).rgb.permute(0, 3, 1, 2))
            for k in range(c.views)])
        t = views.ts[0] if c.guidance.kind == "sdi" else torch.tensor(views.ts)
        targets = guidance_target(c.guidance, self.conditioning, self.prior.alphas_cumprod, latents, views.cameras,
                                  t, views.generators)
        return ViewTargets([lambda z, k=k: targets[k:k + 1] for k in range(c.views)], replays)

    def _synchronised_clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # kernels are asynchronous: time what ran, not what was queued
        return time.perf_counter()

    @staticmethod
    def _copy_generator(generator: torch.Generator) -> torch.Generator:
        """A generator that will draw exactly what ``generator`` draws next (for a replayed render)."""
        copy_ = torch.Generator(device=generator.device)
        copy_.set_state(generator.get_state())
        return copy_

    def step_key(self, step: int) -> tuple[int, ...]:
        """The key of a step's generators; a rollback moves to fresh streams, or the same NaN would recur."""
        c = self.config
        if self.counters.rollbacks == 0:
            return (c.seed, step)
        return (c.seed, step, ROLLBACK_STREAM, self.counters.rollbacks)

    def step(self) -> StepRecord:
        """One optimiser step over the step's views; returns the step's record.

        A step whose loss or gradient is not finite is not applied (Adam's moments would carry
        the NaN forever); its evaluations still count against the budget and it is logged.
        """
        c, step = self.config, self.counters.steps
        fraction = fraction_spent(step, c.views, c.budget)
        calls_before = self.prior.counters.calls
        self.update_occupancy(fraction)
        self._render_tally = [0.0, 0.0]
        batched, started = self.batches_views(), self._synchronised_clock()
        result = self.accumulate_gradients(fraction, self.step_key(step))
        if c.views > 1 and c.view_batching == "auto" and self._measures_batching():
            self.auto_batching.record(batched, self._synchronised_clock() - started)
        loss = sum(result["terms"].values())
        grad_norm = self.model.gradient_norm()
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            self.counters.skipped_steps += 1
            self.counters.consecutive_skips += 1
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.counters.consecutive_skips = 0
            self.optimizer.step()
        self.counters.steps += 1
        self.counters.guidance_evaluations += c.views
        return StepRecord(
            step=step, fraction=fraction, t=result["t"], loss=loss, loss_terms=result["terms"],
            guidance_evaluations=self.counters.guidance_evaluations, unet_calls=self.prior.counters.calls,
            unet_calls_step=self.prior.counters.calls - calls_before, unet_images=self.prior.counters.images,
            lr=self.optimizer.param_groups[0]["lr"], levels=self.model.field.active_levels,
            shading=result["shading"], grad_norm=grad_norm, skipped=skipped, batched_views=batched,
            samples_per_ray_evaluated=self._render_tally[0] / max(self._render_tally[1], 1.0),
            aggregation=result["aggregation"])

    def state_dict(self) -> dict[str, Any]:
        """The trainable state: weights, Adam's moments, the occupancy grid, CW-MV-SDI's τ (live
        tensors: ``run_state.snapshot`` copies them with the counters and generators)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "occupancy": self.occupancy.state_dict() if self.occupancy is not None else None,
                "consensus": self.consensus.state_dict() if self.consensus is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._load_grid(state.get("occupancy"))
        if self.consensus is not None:
            self.consensus.load_state_dict(state["consensus"])


# rollbacks draw from generators keyed (seed, step, ROLLBACK_STREAM, n): a key no plain step can have
ROLLBACK_STREAM = 2**31
# the occupancy grid's refresh jitter draws from generators keyed (seed, OCCUPANCY_STREAM, period)
OCCUPANCY_STREAM = 2**31 + 1


@dataclass
class TrainResult:
    # "completed" (the plan's last step is done), "paused" (``until_step`` reached before it),
    # "interrupted" (a stop was requested) or "diverged" (rollbacks exhausted)
    status: str
    wall_seconds: float
    events: list[dict[str, Any]] = field(default_factory=list)  # rollbacks, with the step they returned to


def train(distiller: Distiller, on_step: Callable[[StepRecord], None] | None = None,
          on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
          stop_requested: Callable[[], bool] = lambda: False, until_step: int | None = None) -> TrainResult:
    """Run steps until ``distiller.counters.steps`` reaches ``until_step`` (default: ``config.steps``,
    the end of the budget's plan). Called again, it continues from where it stopped: a caller can
    stop at fractions of the budget, measure, and go on, and the steps are those of one call
    (unless a rollback happens: each call begins with its start state as its checkpoint).

    A checkpoint is taken every ``checkpoint_every`` steps, at the plan's end, and when a stop is
    requested (checked between steps). After ``max_consecutive_skips`` non-finite steps in a row
    the run rolls back to the last checkpoint of this call (or to the state the call began with);
    once ``max_rollbacks`` are spent it stops as diverged, with the model left at that last good
    state.

    What the budget means under rollbacks: a rollback returns ``counters.steps`` to the
    checkpoint's step, and the steps after it run again on fresh random streams; the evaluations
    of the discarded steps stay spent. The plan (``config.steps`` steps; schedules at
    ``fraction_spent`` of the step) is unchanged, so a run with rollbacks spends more than
    ``config.budget``: ``counters.guidance_evaluations`` counts every evaluation made. It is
    reported in each step record (log.jsonl's ``guidance_evaluations``) and in summary.json
    (``guidance_evaluations`` beside ``budget``, ``rollbacks`` and ``events``).
    """
    c = distiller.config
    last_step = c.steps if until_step is None else until_step
    if not 0 <= last_step <= c.steps:
        raise ValueError(f"until_step={until_step}: a run of budget {c.budget} at {c.views} views per step has "
                         f"steps 0 to {c.steps}; pass one of those, or None for the end of the run")
    start = time.perf_counter()
    last_good = snapshot(distiller)
    result = TrainResult("completed" if last_step == c.steps else "paused", 0.0)
    while distiller.counters.steps < last_step:
        if stop_requested():
            result.status = "interrupted"
            break
        record = distiller.step()
        record.wall_s = time.perf_counter() - start
        if on_step:
            on_step(record)
        if distiller.counters.consecutive_skips >= c.max_consecutive_skips:
            if distiller.counters.rollbacks >= c.max_rollbacks:
                roll_back(distiller, last_good, count=False)  # outputs of the last good state
                result.status = "diverged"
                break
            roll_back(distiller, last_good)
            result.events.append({"event": "rollback", "at_step": record.step, "to_step": distiller.counters.steps})
            continue
        done = distiller.counters.steps
        if done % c.checkpoint_every == 0 or done == c.steps:
            last_good = snapshot(distiller)
            if on_checkpoint:
                on_checkpoint(last_good)
    if result.status == "interrupted" and on_checkpoint:
        on_checkpoint(snapshot(distiller))
    result.wall_seconds = time.perf_counter() - start
    return result
