"""How noisy is the K-view gradient? Variance of the estimator at fixed parameters, per unit of budget.

A K-view step spends K guidance evaluations. Averaging B/K such steps' gradients would give a
variance of Var(g_K)·K/B, so ``K·Var(g_K)`` is the variance per guidance evaluation: the number
to compare across K and samplers at equal budget. For K i.i.d. random views it equals Var(g_1)
(ratio 1); antithetic views lower it only if the paired views' gradients are negatively
correlated. Var is the total variance (trace of the covariance) of the flattened parameter gradient.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from mvsdi.config import RunConfig
from mvsdi.distill import Distiller, Model
from mvsdi.priors.base import DiffusionPrior

VARIANCE_STREAM = 7_919  # keeps the estimator's random keys apart from any training step's


@dataclass(frozen=True)
class GradientVariance:
    views: int
    sampler: str
    repeats: int
    total_variance: float  # of one step's gradient
    per_evaluation: float  # total_variance · K
    mean_norm: float  # ‖mean gradient‖, to read the variance against


class RunningMoments:
    """Sum and sum of squares in float64, so R gradients never need to be held at once."""

    def __init__(self) -> None:
        self.n, self.total, self.squares = 0, None, None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().double()
        self.total = x.clone() if self.total is None else self.total + x
        self.squares = x.pow(2) if self.squares is None else self.squares + x.pow(2)
        self.n += 1

    def total_variance(self) -> float:
        """Unbiased trace of the covariance: Σ_j (Σ x_j² − n·mean_j²) / (n − 1)."""
        if self.n < 2:
            raise ValueError("the variance needs at least 2 gradient samples (repeats >= 2)")
        mean = self.total / self.n
        return float(((self.squares - self.n * mean.pow(2)).sum() / (self.n - 1)).item())

    def mean_norm(self) -> float:
        return float((self.total / self.n).norm().item())


def flat_gradient(model: Model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])


def estimator_variance(distiller: Distiller, fraction: float, repeats: int, seed: int = 0) -> GradientVariance:
    """R independent K-view gradients of the distiller's current parameters (no optimiser step)."""
    moments = RunningMoments()
    for r in range(repeats):
        distiller.accumulate_gradients(fraction, (seed, VARIANCE_STREAM, r))
        moments.add(flat_gradient(distiller.model))
    distiller.optimizer.zero_grad(set_to_none=True)
    c = distiller.config
    total = moments.total_variance()
    return GradientVariance(c.views, c.sampler, repeats, total, total * c.views, moments.mean_norm())


def compare_estimators(base: RunConfig, prior: DiffusionPrior, model_state: dict[str, Any], device: torch.device,
                       settings: list[tuple[int, str]], fraction: float, repeats: int, seed: int = 0) -> list[dict[str, Any]]:
    """Variance per guidance evaluation of each (K, sampler) at the same parameters, and its ratio
    to the first setting (normally K=1 random)."""
    rows = []
    for views, sampler in settings:
        config = dataclasses.replace(base, views=views, sampler=sampler, budget=views * max(1, base.budget // views))
        model = Model.create(config, device)
        model.load_state_dict(model_state)
        result = estimator_variance(Distiller(config, prior, model, device), fraction, repeats, seed)
        rows.append(dataclasses.asdict(result))
    reference = rows[0]["per_evaluation"]
    for row in rows:
        row["ratio"] = row["per_evaluation"] / reference if reference > 0 else float("nan")
    return rows
