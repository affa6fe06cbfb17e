"""Everything scheduled over training, as a function of the fraction f ∈ [0, 1] of the budget spent.

The reference configuration counts in optimiser steps of a 10,000-step run. Here each step-count is
divided by 10,000, so a K-view run (10,000/K steps) passes through the same hash-grid levels,
shading phase, t and regulariser weights at the same fraction of its guidance budget as K=1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from mvsdi.knobs import knob

REFERENCE_STEPS = 10_000  # the SDI configuration's run length, the unit of its step-counted schedules


@dataclass(frozen=True)
class Ramp:
    """Linear from ``start`` to ``end`` while f goes from ``f0`` to ``f1``, constant outside."""

    start: float = knob(help="value until f0")
    end: float = knob(help="value from f1 on")
    f0: float = knob(0.0, "budget fraction where the ramp starts")
    f1: float = knob(0.0, "budget fraction where the ramp ends")

    def __call__(self, fraction: float) -> float:
        if self.f1 <= self.f0:
            return self.end if fraction >= self.f1 else self.start
        a = min(max((fraction - self.f0) / (self.f1 - self.f0), 0.0), 1.0)
        return self.start + a * (self.end - self.start)


@dataclass(frozen=True)
class LossWeights:
    """Regulariser weights of the SDI configuration (its step-ramps divided by 10,000)."""

    orientation: Ramp = knob(Ramp(0.1, 0.1), "weight of the orientation loss (normals facing the camera)")
    sparsity: Ramp = knob(Ramp(0.15, 0.0, 0.0, 3000 / REFERENCE_STEPS), "weight of the sparsity loss")
    opacity: Ramp = knob(Ramp(0.1, 0.1), "weight of the opacity BCE")
    convexity: Ramp = knob(Ramp(1.0, 0.1, 0.0, 4000 / REFERENCE_STEPS), "weight of the convexity loss")
    z_variance: Ramp = knob(Ramp(1.0, 1.0), "weight of the z-variance loss")
    tv: Ramp = knob(Ramp(0.0, 0.0), "weight of the total variation of the RGB renders (the reference's lambda_tv; "
                                    "off in the SDI configuration)", flags={"end": ("--tv-weight",),
                                                                            "f1": ("--tv-warmup",)})

    def at(self, fraction: float) -> dict[str, float]:
        return {name: getattr(self, name)(fraction) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class LevelSchedule:
    """Progressive hash-grid unmasking: ``start`` levels, then one more every ``every`` of the budget."""

    start: int = knob(8, "hash-grid levels unmasked at the start")
    begin: float = knob(2000 / REFERENCE_STEPS, "budget fraction where unmasking begins")
    every: float = knob(500 / REFERENCE_STEPS, "budget fraction between two unmasked levels")

    def __call__(self, fraction: float, n_levels: int) -> int:
        extra = int(max(fraction - self.begin, 0.0) / self.every + 1e-9) if fraction >= self.begin else 0
        return max(1, min(self.start + extra, n_levels))


@dataclass(frozen=True)
class ShadingSchedule:
    """Albedo only during the ambient phase; afterwards shaded with probability ``shaded_prob``,
    then textureless with probability ``textureless_prob`` (else diffuse)."""

    ambient_only_until: float = knob(1000 / REFERENCE_STEPS, "budget fraction of the albedo-only phase")
    shaded_prob: float = knob(0.3, "afterwards, probability of a shaded view")
    textureless_prob: float = knob(0.75, "probability that a shaded view is textureless (else diffuse)")

    def __call__(self, fraction: float, generator: torch.Generator) -> str:
        u, v = torch.rand(2, generator=generator, device=generator.device).tolist()
        if fraction < self.ambient_only_until or u > self.shaded_prob:
            return "albedo"
        return "textureless" if v < self.textureless_prob else "diffuse"


@dataclass(frozen=True)
class Schedules:
    levels: LevelSchedule = knob(LevelSchedule(), "progressive hash-grid unmasking")
    shading: ShadingSchedule = knob(ShadingSchedule(), "shading of the training views")
    weights: LossWeights = knob(LossWeights(), "regulariser weights")


def steps_for_budget(budget: int, views: int) -> int:
    """Optimiser steps of a run: one guidance evaluation per view, so budget / K.

    A budget that K does not divide is refused rather than rounded, so that two runs said to
    have the same budget really spend the same number of guidance evaluations.
    """
    if not isinstance(views, int) or views < 1:
        raise ValueError(f"views per step (K) must be an integer >= 1, got {views!r}")
    if budget < views:
        raise ValueError(f"budget of {budget} guidance evaluations is smaller than K={views} views per step")
    if budget % views:
        lower, upper = budget - budget % views, budget - budget % views + views
        raise ValueError(f"budget {budget} is not a multiple of K={views}: use {lower} or {upper} "
                         "so every step evaluates all K views")
    return budget // views


def fraction_spent(step: int, views: int, budget: int) -> float:
    """Budget fraction spent before optimiser step ``step`` (0-based)."""
    return step * views / budget


def step_reaching(fraction: float, views: int, budget: int) -> int:
    """The first optimiser step before which ``fraction`` of the budget is spent (``fraction_spent``'s
    inverse, rounded up): where a run that is measured at ``fraction`` stops."""
    steps = steps_for_budget(budget, views)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"a budget fraction is in [0, 1], got {fraction!r}")
    return next(step for step in range(steps + 1) if fraction_spent(step, views, budget) >= fraction)


# --------------------------------------------------------------------------------------------
# the reference's schedules, counted in its optimiser steps

SCHEDULE_MODES = ("budget", "reference")

# From the MV-SDI reference's configs (configs/sdi.yaml, mvsd-anti2, mvsd-anti4 and mvsd-mixed4,
# mvsd-octa6-*, mvsd-anti8): K → (hash-grid start_step, update_steps, ambient_only_steps, step where
# sparsity reaches 0, step where convexity reaches 0.1), in optimiser steps of its 10,000/K-step run.
# Its K=2 configs change only max_steps; K>=4 divide the level and shading steps by K and the
# regulariser ramps by K/2 (rounded as the configs round them).
REFERENCE_STEP_SCHEDULES: dict[int, tuple[int, int, int, int, int]] = {
    1: (2000, 500, 1000, 3000, 4000),
    2: (2000, 500, 1000, 3000, 4000),
    4: (500, 125, 250, 1500, 2000),
    6: (333, 83, 167, 1000, 1333),
    8: (250, 63, 125, 750, 1000),
}


def reference_schedules(views: int, base: Schedules = Schedules()) -> Schedules:
    """The reference's schedules for K=``views`` as budget fractions (other fields kept from ``base``).

    Its step n of a K-view run is budget fraction n·K/10,000, so at the default budget this is the
    reference step for step; at another budget B every count scales by B/10,000. The SDI t-anneal,
    which the reference counts over 10,000 steps whatever K, is the guidance's ``t_anneal_span``.
    """
    if views not in REFERENCE_STEP_SCHEDULES:
        raise ValueError(f"the reference has schedules for K = {', '.join(map(str, REFERENCE_STEP_SCHEDULES))} "
                         f"only, not K={views}: use --schedule budget, or one of those K")
    level_start, level_every, ambient, sparsity_end, convexity_end = REFERENCE_STEP_SCHEDULES[views]
    at = lambda steps: steps * views / REFERENCE_STEPS  # noqa: E731 (a unit conversion)
    weights = dataclasses.replace(
        base.weights,
        sparsity=dataclasses.replace(base.weights.sparsity, f0=0.0, f1=at(sparsity_end)),
        convexity=dataclasses.replace(base.weights.convexity, f0=0.0, f1=at(convexity_end)))
    return Schedules(levels=dataclasses.replace(base.levels, begin=at(level_start), every=at(level_every)),
                     shading=dataclasses.replace(base.shading, ambient_only_until=at(ambient)),
                     weights=weights)
