"""The intervals and verdicts shared by the testbed study, the bench and the convergence curves."""

import math

import pytest

from mvsdi.statistics import mean_interval, paired_verdict, t_quantile_95


def test_t_quantiles_are_the_published_ones():
    # two-sided 95% Student-t quantiles from the standard tables; 19 is the medium study's case
    for dof, value in ((1, 12.706205), (2, 4.302653), (19, 2.093024), (30, 2.042272), (1000, 1.962339)):
        assert t_quantile_95(dof) == pytest.approx(value, abs=1e-6)
    with pytest.raises(ValueError, match="degree of freedom"):
        t_quantile_95(0)


def test_mean_interval_ignores_non_finite_values_and_has_none_for_one_value():
    # the finite values 1 and 3: mean 2, s = √2, half-width t(0.975, 1) · s / √2
    assert mean_interval([1.0, math.nan, 3.0, math.inf]) == pytest.approx((2.0, 12.706205))
    mean, half = mean_interval([5.0])
    assert mean == 5.0 and math.isnan(half)
    assert all(math.isnan(v) for v in mean_interval([]))


NOT = "not distinguishable"


@pytest.mark.parametrize("difference,higher_is_better,verdict", [
    ((1.0, 0.5), True, "better"), ((1.0, 0.5), False, "worse"), ((-1.0, 0.5), True, "worse"),
    ((-1.0, 0.5), False, "better"), ((0.4, 0.5), True, NOT), ((0.5, 0.5), True, NOT),
    ((1.0, math.nan), True, NOT), ((math.nan, math.nan), True, NOT)])
def test_a_verdict_needs_an_interval_that_excludes_zero(difference, higher_is_better, verdict):
    assert paired_verdict(difference, higher_is_better) == verdict
