import pytest
import torch

from mvsdi.guidance import SDIConfig, timestep
from mvsdi.schedules import (LevelSchedule, LossWeights, Schedules, ShadingSchedule, fraction_spent, step_reaching,
                             steps_for_budget)


def test_budget_gives_steps():
    assert steps_for_budget(10_000, 1) == 10_000
    assert steps_for_budget(10_000, 2) == 5_000
    assert steps_for_budget(10_000, 4) == 2_500
    assert steps_for_budget(12, 6) == 2


@pytest.mark.parametrize("budget,views,msg", [(3, 4, "smaller than K=4"), (10_001, 4, "use 10000 or 10004"),
                                              (10, 0, ">= 1")])
def test_bad_budgets_are_refused_with_a_fix(budget, views, msg):
    with pytest.raises(ValueError, match=msg):
        steps_for_budget(budget, views)


def test_schedules_are_identical_across_k_at_equal_budget_fraction():
    """K=1, 2, 4 at step s·(4/K) have spent the same fraction, so every schedule agrees."""
    budget, sched, sdi = 10_000, Schedules(), SDIConfig()
    for s4 in range(0, 2_500, 37):
        values = []
        for views in (1, 2, 4):
            step = s4 * 4 // views
            f = fraction_spent(step, views, budget)
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


# --- the reference's step-counted schedules (--schedule reference) ---------------------------------

from mvsdi.config import preset, with_schedule  # noqa: E402
from mvsdi.schedules import REFERENCE_STEP_SCHEDULES, reference_schedules  # noqa: E402


@pytest.mark.parametrize("name,views,final_t,levels_at_end,ambient,sparsity_off,convexity_low", [
    ("sdi", 1, 250, 16, 0.10, 0.30, 0.40),
    ("mvsdi-k2", 2, 615, 13, 0.20, 0.60, 0.80),
    ("mvsdi-k4", 4, 797, 16, 0.10, 0.60, 0.80),
    ("mvsdi-k6-octa", 6, 858, 16, 0.10, 0.60, 0.80),
])
def test_reference_schedules_reproduce_the_reference_table(name, views, final_t, levels_at_end, ambient,
                                                           sparsity_off, convexity_low):
    """../shared/DESIGN.md's table: what the reference's K-view configs do over their own steps."""
    config = with_schedule(preset(name, "x"), "reference")
    steps, sched = config.steps, config.schedules
    last = fraction_spent(steps - 1, views, config.budget)
    g = torch.Generator().manual_seed(0)
    assert abs(timestep(config.guidance, last, g, 1000) - final_t) <= 1
    assert sched.levels(last, 16) == levels_at_end
    fraction_of_run = lambda s: fraction_spent(s, views, config.budget)  # noqa: E731
    # albedo only while step < ambient_only_steps; the ramps end at their step counts
    assert sched.shading.ambient_only_until == pytest.approx(fraction_of_run(round(ambient * steps)), abs=1e-3)
    assert sched.weights.sparsity(fraction_of_run(round(sparsity_off * steps))) == pytest.approx(0.0, abs=1e-3)
    assert sched.weights.convexity(fraction_of_run(round(convexity_low * steps))) == pytest.approx(0.1, abs=1e-3)


def test_reference_levels_step_exactly_at_the_configs_step_counts():
    views = 4
    start, every = REFERENCE_STEP_SCHEDULES[views][:2]
    levels = reference_schedules(views).levels
    f = lambda s: fraction_spent(s, views, 10_000)  # noqa: E731
    assert [levels(f(s), 16) for s in (start - 1, start, start + every - 1, start + every)] == [8, 8, 8, 9]


def test_budget_schedules_stay_the_default_and_the_reference_refuses_k_it_has_no_config_for():
    assert preset("mvsdi-k2", "x").schedules == Schedules()
    with pytest.raises(ValueError, match="K = 1, 2, 4, 6, 8 only"):
        with_schedule(preset("mvsdi-k2", "x", views=3, budget=9999), "reference")


def test_a_reference_config_whose_k_changed_is_refused():
    import dataclasses

    config = with_schedule(preset("mvsdi-k2", "x"), "reference")
    with pytest.raises(ValueError, match="not the reference's for K=4"):
        dataclasses.replace(config, views=4)
    assert preset("mvsdi-k2", "x", views=4, schedule="reference").schedules == reference_schedules(4)


def test_sdi_without_anneal_draws_t_uniformly_per_view():
    cfg = SDIConfig(t_anneal=False)
    ts = {timestep(cfg, 0.5, torch.Generator().manual_seed(i), 1000) for i in range(200)}
    assert min(ts) >= 250 and max(ts) <= 980 and len(ts) > 100


def test_step_reaching_is_the_first_step_at_which_a_fraction_is_spent():
    assert step_reaching(0.5, 4, 96) == 12 and fraction_spent(12, 4, 96) == 0.5
    assert step_reaching(0.33, 4, 96) == 8  # 7 steps spend 0.2917, 8 spend 0.3333
    assert (step_reaching(0.0, 2, 10), step_reaching(1.0, 2, 10)) == (0, 5)
    for fraction in (-0.1, 1.01):
        with pytest.raises(ValueError, match="a budget fraction is in"):
            step_reaching(fraction, 2, 10)
