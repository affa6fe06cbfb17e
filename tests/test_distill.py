"""The distillation loop on the tiny SD stack: K-view accumulation, counting, schedules."""

import pytest
import torch

from mvsdi.cameras import sample_views
from mvsdi.config import preset
from mvsdi.distill import Distiller, Model, seeded_generator, view_losses
from mvsdi.field import FieldConfig
from mvsdi.guidance import guidance_loss, guidance_target, sdi_unet_calls, timestep
from mvsdi.priors.stable_diffusion import StableDiffusionPrior
from mvsdi.render import DENSE, render
from mvsdi.schedules import Schedules, ShadingSchedule, fraction_spent
from mvsdi.variance import flat_gradient

CPU = torch.device("cpu")
SMALL_FIELD = FieldConfig(n_levels=4, log2_table_size=12, base_resolution=8, per_level_scale=2.0, hidden_dim=16)


@pytest.fixture(scope="module")
def prior(tiny_sd_folder):
    return StableDiffusionPrior(str(tiny_sd_folder), device="cpu")


def small(name, **kw):
    base = dict(prompt="a wooden chair", model="tiny", device="cpu", resolution=16, samples_per_ray=16,
                eval_views=4, eval_resolution=16, field=SMALL_FIELD)
    base.update(kw)
    return preset(name, **base)


@pytest.mark.parametrize("name", ["mvsdi-k4", "mvsds-k2"])
def test_accumulated_views_equal_the_gradient_of_the_batched_mean_loss(tiny_sd_prior64, float64, name):
    """Distiller.step (view by view, loss/K, backward each) == one batched forward of the mean loss.

    In float64: the two differ only in how the prior's kernels batch (K calls of one vs one of K),
    which SDI's inversion amplifies; a float32 tolerance here passed on one CPU and failed on another.
    """
    prior = tiny_sd_prior64
    # the dense renderer: the reference below is a hand-written dense render of the same views
    config = small(name, budget=8, perturb_samples=False, render=DENSE,
                   schedules=Schedules(shading=ShadingSchedule(ambient_only_until=1.0)))
    torch.manual_seed(0)
    distiller = Distiller(config, prior, Model.create(config, CPU), CPU)
    reference = Model.create(config, CPU)
    reference.load_state_dict(distiller.model.state_dict())
    distiller.step()
    accumulated = flat_gradient(distiller.model)

    # the same step, recomputed with all K views in one batch
    f = fraction_spent(0, config.views, config.budget)
    reference.field.set_active_levels(config.schedules.levels(f, SMALL_FIELD.n_levels))
    step_rng = seeded_generator("cpu", config.seed, 0)
    cameras = sample_views(config.sampler, config.views, step_rng, config.cameras)
    view_rngs = [seeded_generator("cpu", config.seed, 0, k) for k in range(config.views)]
    ts = []
    for g in view_rngs:  # the step draws each view's shading, then its t
        assert config.schedules.shading(f, g) == "albedo"
        ts.append(timestep(config.guidance, f, g, prior.num_train_timesteps))
    t = ts[0] if config.guidance.kind == "sdi" else torch.tensor(ts)
    weights = config.schedules.weights.at(f)
    out = render(reference.field, reference.background, cameras, 16, 16, n_samples=16, shading="albedo")
    latents = prior.encode_images(out.rgb.permute(0, 3, 1, 2))
    target = guidance_target(config.guidance, distiller.conditioning, prior.alphas_cumprod, latents, cameras, t,
                             view_rngs)
    terms = view_losses(out, cameras, weights, guidance_loss(config.guidance, latents, target))
    (sum(terms.values()) / config.views).backward()
    batched = flat_gradient(reference)
    assert accumulated.dtype == torch.float64 and accumulated.abs().max() > 0
    # float64 rounding amplified by the inversion stays many orders below 1e-8 of the largest entry
    assert (accumulated - batched).abs().max() <= 1e-8 * batched.abs().max()


def test_unet_calls_follow_the_t_schedule_and_evaluations_the_budget(prior):
    config = small("mvsdi-k2", budget=12)
    distiller = Distiller(config, prior, Model.create(config, CPU), CPU)
    before = prior.counters.calls
    records = [distiller.step() for _ in range(config.steps)]
    assert len(records) == 6 and records[-1].guidance_evaluations == 12
    assert all(len(set(r.t)) == 1 for r in records)  # SDI: the views of a step share the annealed t
    expected = [sum(sdi_unet_calls(t, config.guidance, 1000) for t in r.t) for r in records]
    assert [r.unet_calls_step for r in records] == expected
    assert prior.counters.calls - before == sum(expected)
    # SDI anneals t from 980 down as the budget is spent
    assert records[0].t[0] == 980 and all(a.t[0] > b.t[0] for a, b in zip(records, records[1:]))


def test_sds_evaluation_is_one_unet_call_with_its_own_t(prior):
    config = small("mvsds-k2", budget=8)
    distiller = Distiller(config, prior, Model.create(config, CPU), CPU)
    records = [distiller.step() for _ in range(config.steps)]
    assert [r.unet_calls_step for r in records] == [2, 2, 2, 2]
    assert any(len(set(r.t)) == 2 for r in records)  # views draw t independently


def test_k_views_at_equal_budget_follow_the_same_schedule(prior):
    seen = {}
    for name in ("sdi", "mvsdi-k2", "mvsdi-k4"):
        config = small(name, budget=8)
        distiller = Distiller(config, prior, Model.create(config, CPU), CPU)
        seen[name] = {r.fraction: (r.t[0], r.levels) for r in (distiller.step() for _ in range(config.steps))}
    for fraction, value in seen["mvsdi-k4"].items():
        assert seen["sdi"][fraction] == value == seen["mvsdi-k2"][fraction]


def test_a_non_finite_step_is_skipped_and_counted(prior, monkeypatch):
    import mvsdi.distill as distill_module

    config = small("sds", budget=3)
    distiller = Distiller(config, prior, Model.create(config, CPU), CPU)
    real = distill_module.guidance_loss
    poisoned = {"left": 1}

    def sometimes_nan(cfg, latents, target):
        loss = real(cfg, latents, target)
        if poisoned["left"]:
            poisoned["left"] -= 1
            return loss * float("nan")
        return loss

    monkeypatch.setattr(distill_module, "guidance_loss", sometimes_nan)
    before = [p.detach().clone() for p in distiller.model.field.parameters()]
    first = distiller.step()
    assert first.skipped and distiller.counters.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, distiller.model.field.parameters()))
    assert not distiller.optimizer.state  # Adam never saw the NaN gradient
    second = distiller.step()
    assert not second.skipped and second.guidance_evaluations == 2
    assert all(torch.isfinite(p).all() for p in distiller.model.field.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, distiller.model.field.parameters()))


def test_sdi_without_its_anneal_never_batches_views(prior):
    """Views of different t cannot share one inversion grid, so the batched fast path must not run."""
    import dataclasses

    from mvsdi.guidance import SDIConfig

    config = small("mvsdi-k2", view_batching="batched", budget=4)
    assert Distiller(config, prior, Model.create(config, CPU), CPU).batches_views()
    uniform_t = dataclasses.replace(config, guidance=SDIConfig(t_anneal=False))
    distiller = Distiller(uniform_t, prior, Model.create(uniform_t, CPU), CPU)
    assert not distiller.batches_views()
    assert len(set(distiller.step().t)) == 2  # each view drew its own t


def test_auto_view_batching_times_both_ways_after_warming_up_and_keeps_the_faster():
    from mvsdi.distill import AutoBatching

    for batched_seconds, expected in ((0.5, True), (2.0, False)):
        auto = AutoBatching()
        pattern = []
        for seconds_of in ({False: 9.0, True: 9.0}, {False: 1.0, True: batched_seconds}):  # warm-up, then timed
            for _ in range(2):
                batched = auto.batches()
                pattern.append(batched)
                auto.record(batched, seconds_of[batched])
        assert pattern == [False, True, False, True]
        assert auto.batches() is expected
        auto.record(not expected, 0.0)  # after the trial, steps no longer change the choice
        assert auto.batches() is expected


def test_auto_view_batching_drives_the_steps_where_it_measures(prior, monkeypatch):
    config = small("mvsds-k2", view_batching="auto", budget=12)
    distiller = Distiller(config, prior, Model.create(config, CPU), CPU)
    assert not distiller.batches_views()  # the CPU never batches under auto
    monkeypatch.setattr(distiller, "_measures_batching", lambda: True)  # as on CUDA
    flags = [distiller.step().batched_views for _ in range(6)]
    assert flags[:4] == [False, True, False, True]
    assert flags[4:] == [distiller.auto_batching.choice()] * 2


def test_a_step_record_logs_the_documented_line(prior):
    """log.jsonl's keys and their order are a file format (README's run directory table)."""
    import json

    config = small("cw-mvsdi-k2", budget=4)
    distiller = Distiller(config, prior, Model.create(config, CPU), CPU)
    record = distiller.step()
    line = record.to_log()
    assert list(line) == ["step", "fraction", "t", "loss", *(f"loss_{name}" for name in record.loss_terms),
                          "guidance_evaluations", "unet_calls", "unet_calls_step", "unet_images", "lr", "levels",
                          "shading", "grad_norm", "skipped", "batched_views", "samples_per_ray_evaluated",
                          "consensus_weights", "consensus_agreement", "consensus_sharpness"]
    assert "loss_guidance" in line and line["guidance_evaluations"] == 2 and line["step"] == 0
    record.wall_s = 1.5  # set by train: the line's last key
    assert list(record.to_log())[-1] == "wall_s"
    assert json.loads(json.dumps(record.to_log())) == record.to_log()  # JSON-ready: plain values only
