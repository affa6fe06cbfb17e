"""The K-view estimators: the mean (MV-SDI) and consensus weights (CW-MV-SDI)."""

import dataclasses
import math

import pytest
import torch

from mvsdi.aggregation import AggregationConfig, ConsensusWeighting, agreement, mean_gradient
from mvsdi.config import preset
from mvsdi.distill import Distiller, Model, train
from mvsdi.field import FieldConfig
from mvsdi.priors.stable_diffusion import StableDiffusionPrior
from mvsdi.render import DENSE
from mvsdi.run_state import restore, snapshot
from mvsdi.variance import flat_gradient

CPU = torch.device("cpu")
SMALL_FIELD = FieldConfig(n_levels=4, log2_table_size=12, base_resolution=8, per_level_scale=2.0, hidden_dim=16)


def _parameters():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64)),
            torch.nn.Parameter(torch.randn(7, dtype=torch.float64))]


def _losses(parameters, directions):
    """View k's loss is ⟨d_k, θ⟩, so its gradient is d_k exactly."""
    return [lambda d=d: sum((p * dp).sum() for p, dp in zip(parameters, d)) for d in directions]


def test_equal_view_gradients_give_uniform_weights_and_the_plain_mean(float64):
    parameters = _parameters()
    same = [torch.randn_like(p) for p in parameters]
    consensus = ConsensusWeighting(AggregationConfig(kind="consensus"))
    logged = consensus(_losses(parameters, [same] * 3), parameters)
    assert logged["consensus_weights"] == pytest.approx([1 / 3] * 3, abs=1e-12)
    assert logged["consensus_agreement"] == pytest.approx([1.0] * 3, abs=1e-12)
    for p, g in zip(parameters, same):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-12)
    # the entropy term is at its minimum and Σ w·a is flat in s when all a_k agree: no push on τ
    assert abs(float(consensus.tau.grad)) < 1e-12


def test_the_mean_estimator_is_the_mean_of_the_view_gradients(float64):
    parameters = _parameters()
    directions = [[torch.randn_like(p) for p in parameters] for _ in range(4)]
    mean_gradient(_losses(parameters, directions))
    for i, p in enumerate(parameters):
        torch.testing.assert_close(p.grad, sum(d[i] for d in directions) / 4, rtol=1e-12, atol=1e-12)


def test_consensus_weights_favour_the_views_that_agree_and_follow_the_formula(float64):
    parameters = _parameters()
    base = [torch.randn_like(p) for p in parameters]
    outlier = [-0.5 * g for g in base]  # disagrees with the other two, without dominating their sum
    directions = [base, [g + 0.1 * torch.randn_like(g) for g in base], outlier]
    config = AggregationConfig(kind="consensus", fixed_sharpness=4.0)
    logged = ConsensusWeighting(config)(_losses(parameters, directions), parameters)
    a = agreement(directions)
    w = torch.softmax(4.0 * a, dim=0)
    assert logged["consensus_weights"] == pytest.approx(w.tolist(), rel=1e-12)
    assert w[2] < w[0] and w[2] < w[1]
    flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    total = flat(directions[0]) + flat(directions[1]) + flat(directions[2])
    for k in range(3):
        cos = torch.dot(flat(directions[k]), total) / (flat(directions[k]).norm() * total.norm())
        assert float(a[k]) == pytest.approx(float(cos), rel=1e-12)
    for i, p in enumerate(parameters):
        torch.testing.assert_close(p.grad, sum(w[k] * directions[k][i] for k in range(3)), rtol=1e-12, atol=1e-12)


def test_tau_gradient_is_that_of_the_auxiliary_loss(float64):
    parameters = _parameters()
    directions = [[torch.randn_like(p) for p in parameters] for _ in range(3)]
    consensus = ConsensusWeighting(AggregationConfig(kind="consensus", tau_init=0.3))
    consensus(_losses(parameters, directions), parameters)
    a = agreement(directions)

    def aux(tau):
        w = torch.softmax(torch.nn.functional.softplus(tau) * a, dim=0)
        return -(w * a).sum() + (math.log(3) + (w * w.log()).sum())

    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad(aux(tau), tau)
    assert float(consensus.tau.grad) == pytest.approx(float(expected), rel=1e-9)


def test_a_view_without_gradient_agrees_with_nothing():
    a = agreement([[torch.ones(3)], [None], [torch.zeros(3)]])
    assert a.tolist() == pytest.approx([1.0, 0.0, 0.0])


@pytest.fixture(scope="module")
def prior(tiny_sd_folder):
    return StableDiffusionPrior(str(tiny_sd_folder), device="cpu")


def _config(**kw):
    return preset("cw-mvsdi-k2", "a wooden chair", model="tiny", device="cpu", resolution=16, samples_per_ray=8,
                  eval_views=2, eval_resolution=16, field=SMALL_FIELD, budget=8, render=DENSE, **kw)


def test_consensus_with_zero_sharpness_is_the_mean_step(tiny_sd_prior64, float64):
    """s = 0 gives w = 1/K exactly: CW-MV-SDI's step must then equal MV-SDI's (float64)."""
    zero = _config(aggregation=AggregationConfig(kind="consensus", fixed_sharpness=0.0))
    mean = dataclasses.replace(zero, aggregation=AggregationConfig())
    grads = []
    for config in (zero, mean):
        distiller = Distiller(config, tiny_sd_prior64, Model.create(config, CPU), CPU)
        distiller.accumulate_gradients(0.0, (0, 0))
        grads.append(flat_gradient(distiller.model))
    scale = grads[1].abs().max()
    assert (grads[0] - grads[1]).abs().max() <= 1e-10 * scale


def test_tau_trains_in_its_own_group_and_survives_a_checkpoint(prior):
    config = _config()
    distiller = Distiller(config, prior, Model.create(config, CPU), CPU)
    groups = {g["name"]: g for g in distiller.optimizer.param_groups}
    assert groups["consensus"]["lr"] == 0.01 and groups["consensus"]["params"] == [distiller.consensus.tau]
    record = distiller.step()
    logged = record.aggregation
    assert len(logged["consensus_weights"]) == 2 and sum(logged["consensus_weights"]) == pytest.approx(1.0)
    assert logged["consensus_sharpness"] == pytest.approx(math.log1p(math.exp(-6.0)), rel=1e-2)
    assert float(distiller.consensus.tau.detach()) != -6.0  # Adam moved it
    state = snapshot(distiller)
    again = Distiller(config, prior, Model.create(config, CPU), CPU)
    restore(again, state)
    assert torch.equal(again.consensus.tau, distiller.consensus.tau)
    assert train(again).status == "completed" and again.counters.steps == config.steps
