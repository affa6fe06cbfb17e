"""Everything scheduled over training, as a function of the fraction f ∈ [0, 1] of the budget spent.

The reference configuration counts in optimiser steps of a 10,000-step run. Here each step-count is
divided by 10,000, so a K-view run (10,000/K steps) passes through the same hash-grid levels,
shading phase, t and regulariser weights at the same fraction of its guidance budget as K=1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

REFERENCE_STEPS = 10_000  # the SDI configuration's run length, the unit of its step-counted schedules


@dataclass(frozen=True)
class Ramp:
    """Linear from ``start`` to ``end`` while f goes from ``f0`` to ``f1``, constant outside."""

    start: float
    end: float
    f0: float = 0.0
    f1: float = 0.0

    def __call__(self, fraction: float) -> float:
        if self.f1 <= self.f0:
            return self.end if fraction >= self.f1 else self.start
        a = min(max((fraction - self.f0) / (self.f1 - self.f0), 0.0), 1.0)
        return self.start + a * (self.end - self.start)


@dataclass(frozen=True)
class LossWeights:
    """Regulariser weights of the SDI configuration (its step-ramps divided by 10,000)."""

    orientation: Ramp = Ramp(0.1, 0.1)
    sparsity: Ramp = Ramp(0.15, 0.0, 0.0, 3000 / REFERENCE_STEPS)
    opacity: Ramp = Ramp(0.1, 0.1)
    convexity: Ramp = Ramp(1.0, 0.1, 0.0, 4000 / REFERENCE_STEPS)
    z_variance: Ramp = Ramp(1.0, 1.0)

    def at(self, fraction: float) -> dict[str, float]:
        return {name: getattr(self, name)(fraction) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class LevelSchedule:
    """Progressive hash-grid unmasking: ``start`` levels, then one more every ``every`` of the budget."""

    start: int = 8
    begin: float = 2000 / REFERENCE_STEPS
    every: float = 500 / REFERENCE_STEPS

    def __call__(self, fraction: float, n_levels: int) -> int:
        extra = int(max(fraction - self.begin, 0.0) / self.every + 1e-9) if fraction >= self.begin else 0
        return max(1, min(self.start + extra, n_levels))


@dataclass(frozen=True)
class ShadingSchedule:
    """Albedo only during the ambient phase; afterwards shaded with probability ``shaded_prob``,
    then textureless with probability ``textureless_prob`` (else diffuse)."""

    ambient_only_until: float = 1000 / REFERENCE_STEPS
    shaded_prob: float = 0.3
    textureless_prob: float = 0.75

    def __call__(self, fraction: float, generator: torch.Generator) -> str:
        u, v = torch.rand(2, generator=generator, device=generator.device).tolist()
        if fraction < self.ambient_only_until or u > self.shaded_prob:
            return "albedo"
        return "textureless" if v < self.textureless_prob else "diffuse"


@dataclass(frozen=True)
class Schedules:
    levels: LevelSchedule = LevelSchedule()
    shading: ShadingSchedule = ShadingSchedule()
    weights: LossWeights = LossWeights()


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
