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
    resample follows; also the Gram matrix of each named part of the vector (``parts``: name →
    slice, e.g. the hash tables and the shared weights). The object holds the gradients (float32)
    to take new dot products; keep ``gram()`` and drop the object once all samples are in."""

    def __init__(self, parts: dict[str, slice] | None = None) -> None:
        self._samples: list[torch.Tensor] = []
        self._parts = {"all": slice(None), **(parts or {})}
        self._grams: dict[str, list[list[float]]] = {name: [] for name in self._parts}

    @property
    def n(self) -> int:
        return len(self._samples)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().flatten().float().clone()
        for name, part in self._parts.items():
            xp = x[part].double()
            dots = [float(torch.dot(xp, s[part].double())) for s in self._samples] + [float(xp.square().sum())]
            for row, dot in zip(self._grams[name], dots):
                row.append(dot)
            self._grams[name].append(dots)
        self._samples.append(x)

    def gram(self, part: str = "all") -> np.ndarray:
        return np.asarray(self._grams[part], dtype=np.float64)

    def grams(self) -> dict[str, np.ndarray]:
        return {name: self.gram(name) for name in self._parts}

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


def gradient_parts(model: Model) -> dict[str, slice]:
    """Where the hash tables and the shared weights (MLP, blob, background) lie in ``flat_gradient``.

    Antithetic views see different sides of the object and so touch mostly different table entries,
    while every view moves the shared weights: the two parts can behave differently.
    """
    tables = model.field.encoding.embeddings
    offset = 0
    for p in model.parameters():
        if p is tables:
            break
        offset += p.numel()
    total = sum(p.numel() for p in model.parameters())
    end = offset + tables.numel()
    if offset != 0 or end == total:  # the shared part must be one slice after the tables
        raise ValueError("expected the hash tables first in the model's parameters, followed by the shared weights")
    return {"tables": slice(offset, end), "shared": slice(end, total)}


def gradient_samples(distiller: Distiller, fraction: float, repeats: int, seed: int = 0) -> GradientSamples:
    """R independent K-view gradients of the distiller's current parameters (no optimiser step)."""
    samples = GradientSamples(gradient_parts(distiller.model))
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
    per_eval = [resampled_total_variance(gram, counts) * setting_views for gram, setting_views in zip(grams, views)]
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


MEDIAN_OF_MEANS_GROUPS = 8


def median_of_means_ratio(gram: np.ndarray, reference: np.ndarray, views: int, reference_views: int = 1,
                          groups: int = MEDIAN_OF_MEANS_GROUPS) -> tuple[float, float, float]:
    """(median, smallest, largest) over ``groups`` disjoint groups of paired draws of the ratio of
    variances per evaluation. A few huge gradients (SDI's heavy tail) move a mean over all draws but
    only one group's ratio, so the median is robust while the extremes show the tail."""
    n = len(gram)
    if len(reference) != n:
        raise ValueError("a paired ratio needs the same number of repeats in both settings")
    size = n // groups
    if size < 2:
        raise ValueError(f"median of means over {groups} groups needs >= {2 * groups} repeats, got {n}")
    ratios = []
    for g in range(groups):
        block = np.zeros((1, n))
        block[0, g * size:(g + 1) * size] = 1.0
        mine = resampled_total_variance(gram, block)[0] * views
        theirs = resampled_total_variance(reference, block)[0] * reference_views
        ratios.append(mine / theirs if theirs > 0 else float("nan"))
    return float(np.nanmedian(ratios)), float(np.nanmin(ratios)), float(np.nanmax(ratios))


def compare_estimators(base: RunConfig, prior: DiffusionPrior, model_state: dict[str, Any], device: torch.device,
                       settings: list[tuple[int, str]], fraction: float, repeats: int,
                       seed: int = 0) -> list[dict[str, Any]]:
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
        grams.append(samples.grams())
    reference = rows[0]["per_evaluation"]
    view_counts = [v for v, _ in settings]
    intervals = ratio_intervals([g["all"] for g in grams], view_counts, seed=seed)
    for row, (low, high, log_se) in zip(rows, intervals):
        row["ratio"] = row["per_evaluation"] / reference if reference > 0 else float("nan")
        row.update(ratio_low=low, ratio_high=high, log_ratio_se=log_se)
    for row, gram, views in zip(rows, grams, view_counts):
        for part in ("tables", "shared"):  # the parts' plain ratios, then the robust ones if R allows
            own, ref = resampled_total_variance(gram[part], np.ones((1, repeats)))[0], \
                resampled_total_variance(grams[0][part], np.ones((1, repeats)))[0]
            row[f"{part}_ratio"] = own * views / ref if ref > 0 else float("nan")
        if repeats >= 2 * MEDIAN_OF_MEANS_GROUPS:
            for part in ("all", "tables", "shared"):
                median, low, high = median_of_means_ratio(gram[part], grams[0][part], views)
                row.update({f"{part}_mom_ratio": median, f"{part}_mom_min": low, f"{part}_mom_max": high})
    return rows
