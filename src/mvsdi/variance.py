"""How noisy is the K-view gradient? Variance of the estimator at fixed parameters, per unit of budget.

A K-view step spends K guidance evaluations. Averaging B/K such steps' gradients would give a
variance of Var(g_K)·K/B, so ``K·Var(g_K)`` is the variance per guidance evaluation: the number
to compare across K and samplers at equal budget. For K i.i.d. random views it equals Var(g_1)
(ratio 1); antithetic views lower it only if the paired views' gradients are negatively
correlated. Var is the total variance (trace of the covariance) of the flattened parameter gradient.

Every setting draws repeat r from the same random key, so the settings' repeats are paired (common
random numbers: view 0 of repeat r has the same t and noise under K=1 and K=2). The 95% interval
of a ratio therefore comes from a *paired* bootstrap over repeats: one resample of the repeat
indices is applied to every setting. Only the R×R Gram matrix of the gradients is needed for that,
because the total variance of any weighted resample is a quadratic form in it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mvsdi.config import RunConfig
from mvsdi.distill import Distiller, Model
from mvsdi.priors.base import DiffusionPrior

VARIANCE_STREAM = 7_919  # keeps the estimator's random keys apart from any training step's
BOOTSTRAP_RESAMPLES = 2_000
# With 2 repeats the only resample of two distinct draws is the sample itself (the others draw one
# gradient twice: zero variance), so a bootstrap "interval" would have zero width or be undefined.
MIN_BOOTSTRAP_REPEATS = 3


@dataclass(frozen=True)
class GradientVariance:
    views: int
    sampler: str
    repeats: int
    total_variance: float  # of one step's gradient
    per_evaluation: float  # total_variance · K
    mean_norm: float  # ‖mean gradient‖, to read the variance against


class GradientSamples:
    """R gradient samples and their Gram matrix ⟨g_i, g_j⟩ (float64), from which the variance of any
    resample follows. The object holds the gradients (float32) to take new dot products; keep
    ``gram()`` and drop the object once all samples are in."""

    def __init__(self) -> None:
        self._samples: list[torch.Tensor] = []
        self._gram: list[list[float]] = []

    @property
    def n(self) -> int:
        return len(self._samples)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().flatten().float().clone()
        dots = [float(torch.dot(x.double(), s.double())) for s in self._samples] + [float(x.double().square().sum())]
        for row, dot in zip(self._gram, dots):
            row.append(dot)
        self._gram.append(dots)
        self._samples.append(x)

    def gram(self) -> np.ndarray:
        return np.asarray(self._gram, dtype=np.float64)

    def total_variance(self) -> float:
        """Unbiased trace of the covariance: Σ_i ‖g_i − ḡ‖² / (n − 1)."""
        if self.n < 2:
            raise ValueError("the variance needs at least 2 gradient samples (repeats >= 2)")
        return float(resampled_total_variance(self.gram(), np.ones((1, self.n)))[0])

    def mean_norm(self) -> float:
        g = self.gram()
        return math.sqrt(max(float(g.sum()) / self.n ** 2, 0.0))


def resampled_total_variance(gram: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[B] unbiased total variance of B resamples; ``counts[b, i]`` = how often sample i is drawn.

    With weights w (Σw = n): Σ_i w_i ‖g_i − ḡ_w‖² = Σ_i w_i G_ii − wᵀGw / n, divided by n − 1.
    """
    n = counts.sum(1)
    spread = counts @ np.diag(gram) - np.einsum("bi,ij,bj->b", counts, gram, counts) / n
    return np.maximum(spread, 0.0) / (n - 1)


def flat_gradient(model: Model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])


def gradient_samples(distiller: Distiller, fraction: float, repeats: int, seed: int = 0) -> GradientSamples:
    """R independent K-view gradients of the distiller's current parameters (no optimiser step)."""
    samples = GradientSamples()
    for r in range(repeats):
        distiller.accumulate_gradients(fraction, (seed, VARIANCE_STREAM, r))
        samples.add(flat_gradient(distiller.model))
    distiller.optimizer.zero_grad(set_to_none=True)
    return samples


def summarise_samples(samples: GradientSamples, views: int, sampler: str) -> GradientVariance:
    total = samples.total_variance()
    return GradientVariance(views, sampler, samples.n, total, total * views, samples.mean_norm())


def estimator_variance(distiller: Distiller, fraction: float, repeats: int, seed: int = 0) -> GradientVariance:
    c = distiller.config
    return summarise_samples(gradient_samples(distiller, fraction, repeats, seed), c.views, c.sampler)


def ratio_intervals(grams: list[np.ndarray], views: list[int], resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = 0) -> list[tuple[float, float, float]]:
    """Per setting: (2.5%, 97.5% percentile interval, standard error of the log) of its variance per
    evaluation over the first setting's, by a paired bootstrap over the repeat index; all nan with
    fewer than ``MIN_BOOTSTRAP_REPEATS`` repeats (no interval can be had from so few)."""
    n = len(grams[0])
    if any(len(g) != n for g in grams):
        raise ValueError("a paired bootstrap needs the same number of repeats in every setting")
    if n < MIN_BOOTSTRAP_REPEATS:
        return [(float("nan"),) * 3 for _ in grams]
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
    per_eval = [resampled_total_variance(g, counts) * k for g, k in zip(grams, views)]
    out = []
    for v in per_eval:
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = v / per_eval[0]
        ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
        if ratio.size < resamples // 2:  # degenerate (a zero-variance setting): no interval
            out.append((float("nan"), float("nan"), float("nan")))
            continue
        lo, hi = np.percentile(ratio, [2.5, 97.5])
        out.append((float(lo), float(hi), float(np.log(ratio).std(ddof=1))))
    return out


def compare_estimators(base: RunConfig, prior: DiffusionPrior, model_state: dict[str, Any], device: torch.device,
                       settings: list[tuple[int, str]], fraction: float, repeats: int, seed: int = 0) -> list[dict[str, Any]]:
    """Variance per guidance evaluation of each (K, sampler) at the same parameters, its ratio to
    the first setting (normally K=1 random) and the ratio's 95% paired-bootstrap interval
    (``ratio_low``, ``ratio_high``) and log standard error (``log_ratio_se``)."""
    rows, grams = [], []
    for views, sampler in settings:
        config = dataclasses.replace(base, views=views, sampler=sampler, budget=views * max(1, base.budget // views))
        model = Model.create(config, device)
        model.load_state_dict(model_state)
        samples = gradient_samples(Distiller(config, prior, model, device), fraction, repeats, seed)
        rows.append(dataclasses.asdict(summarise_samples(samples, views, sampler)) | {"fraction": fraction})
        grams.append(samples.gram())
    reference = rows[0]["per_evaluation"]
    intervals = ratio_intervals(grams, [v for v, _ in settings], seed=seed)
    for row, (low, high, log_se) in zip(rows, intervals):
        row["ratio"] = row["per_evaluation"] / reference if reference > 0 else float("nan")
        row.update(ratio_low=low, ratio_high=high, log_ratio_se=log_se)
    return rows
