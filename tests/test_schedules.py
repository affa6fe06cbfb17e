import pytest
import torch

from mvsdi.guidance import SDIConfig, timestep
from mvsdi.schedules import LevelSchedule, LossWeights, Schedules, ShadingSchedule, fraction_spent, steps_for_budget


def test_budget_gives_steps():
    assert steps_for_budget(10_000, 1) == 10_000
    assert steps_for_budget(10_000, 2) == 5_000
    assert steps_for_budget(10_000, 4) == 2_500
    assert steps_for_budget(12, 6) == 2


@pytest.mark.parametrize("budget,k,msg", [(3, 4, "smaller than K=4"), (10_001, 4, "use 10000 or 10004"),
                                          (10, 0, ">= 1")])
def test_bad_budgets_are_refused_with_a_fix(budget, k, msg):
    with pytest.raises(ValueError, match=msg):
        steps_for_budget(budget, k)


def test_schedules_are_identical_across_k_at_equal_budget_fraction():
    """K=1, 2, 4 at step s·(4/K) have spent the same fraction, so every schedule agrees."""
    budget, sched, sdi = 10_000, Schedules(), SDIConfig()
    for s4 in range(0, 2_500, 37):
        values = []
        for k in (1, 2, 4):
            step = s4 * 4 // k
            f = fraction_spent(step, k, budget)
            g = torch.Generator().manual_seed(0)
            values.append((f, sched.levels(f, 16), sched.weights.at(f), timestep(sdi, f, g, 1000)))
        assert values[0] == values[1] == values[2]


def test_level_unmasking_matches_the_reference_at_k1():
    levels = LevelSchedule()
    f = lambda step: fraction_spent(step, 1, 10_000)  # noqa: E731
    assert [levels(f(s), 16) for s in (0, 1999, 2000, 2499, 2500, 3000, 5999, 6000, 9999)] == \
        [8, 8, 8, 8, 9, 10, 15, 16, 16]
    assert levels(1.0, 16) == 16  # every level is reached whatever K (the reference's K=2 never got there)


def test_regulariser_ramps():
    w = LossWeights()
    assert w.at(0.0)["sparsity"] == pytest.approx(0.15) and w.at(0.15)["sparsity"] == pytest.approx(0.075)
    assert w.at(0.3)["sparsity"] == 0.0 and w.at(0.9)["sparsity"] == 0.0
    assert w.at(0.0)["convexity"] == pytest.approx(1.0) and w.at(0.4)["convexity"] == pytest.approx(0.1)
    assert w.at(0.7)["orientation"] == 0.1 and w.at(0.7)["z_variance"] == 1.0


def test_shading_phase_and_probabilities():
    sh = ShadingSchedule()
    g = torch.Generator().manual_seed(0)
    assert {sh(0.05, g) for _ in range(200)} == {"albedo"}
    draws = [sh(0.5, g) for _ in range(20_000)]
    p = {k: draws.count(k) / len(draws) for k in ("albedo", "textureless", "diffuse")}
    assert p["albedo"] == pytest.approx(0.7, abs=0.015)
    assert p["textureless"] == pytest.approx(0.225, abs=0.015)
    assert p["diffuse"] == pytest.approx(0.075, abs=0.01)
