"""Intervals and verdicts over repeated runs: one home for the study, the bench and the curves."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats


def t_quantile_95(dof: int) -> float:
    """Two-sided 95% Student-t quantile for ``dof`` degrees of freedom."""
    if dof < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom, got {dof}")
    return float(stats.t.ppf(0.975, dof))


def mean_interval(values: list[float]) -> tuple[float, float]:
    """Mean of the finite values and the half-width of its 95% t interval (nan for a single value)."""
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size == 1:
        return float(x[0]), float("nan")
    return float(x.mean()), t_quantile_95(x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)


VERDICTS = ("better", "worse", "not distinguishable")


def paired_verdict(difference: tuple[float, float], higher_is_better: bool) -> str:
    """'better' or 'worse' when the 95% interval of a paired difference (mean, half-width) excludes
    zero on that side, else 'not distinguishable' (also without an interval)."""
    mean, half = difference
    if not (math.isfinite(mean) and math.isfinite(half)) or abs(mean) <= half:
        return VERDICTS[2]
    return VERDICTS[0] if (mean > 0) == higher_is_better else VERDICTS[1]
