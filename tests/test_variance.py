import pytest
import torch

from mvsdi.config import preset
from mvsdi.distill import Distiller, Model
from mvsdi.field import FieldConfig
from mvsdi.priors.stable_diffusion import StableDiffusionPrior
from mvsdi.variance import RunningMoments, compare_estimators, estimator_variance, flat_gradient

CPU = torch.device("cpu")
SMALL = FieldConfig(n_levels=4, log2_table_size=12, base_resolution=8, per_level_scale=2.0, hidden_dim=16)


def test_running_moments_give_the_unbiased_trace_of_the_covariance():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([1.0, 2.0, 0.5])
    samples = torch.randn(4000, 3, generator=g) * scales + torch.tensor([5.0, -1.0, 0.0])
    m = RunningMoments()
    for s in samples:
        m.add(s)
    expected = samples.double().var(0, unbiased=True).sum().item()
    assert m.total_variance() == pytest.approx(expected, rel=1e-9)
    assert m.total_variance() == pytest.approx((scales ** 2).sum().item(), rel=0.06)
    with pytest.raises(ValueError, match="at least 2"):
        one = RunningMoments()
        one.add(samples[0])
        one.total_variance()


@pytest.fixture(scope="module")
def prior(tiny_sd_folder):
    return StableDiffusionPrior(str(tiny_sd_folder), device="cpu")


def small(**kw):
    return preset("sds", "a wooden chair", model="tiny", device="cpu", resolution=16, samples_per_ray=16,
                  budget=8, field=SMALL, **kw)


def test_estimator_draws_independent_reproducible_gradients_without_moving_parameters(prior):
    config = small()
    distiller = Distiller(config, prior, Model.create(config, CPU), CPU)
    before = [p.detach().clone() for p in distiller.model.field.parameters()]
    a = estimator_variance(distiller, 0.5, repeats=3, seed=1)
    b = estimator_variance(distiller, 0.5, repeats=3, seed=1)
    assert a == b and a.total_variance > 0 and a.per_evaluation == a.total_variance
    assert all(torch.equal(x, y) for x, y in zip(before, distiller.model.field.parameters()))
    distiller.accumulate_gradients(0.5, (1, 7919, 0))
    g0 = flat_gradient(distiller.model).clone()
    distiller.accumulate_gradients(0.5, (1, 7919, 1))
    assert not torch.equal(g0, flat_gradient(distiller.model))


def test_comparison_reports_per_evaluation_variance_and_ratio(prior):
    config = small()
    state = Model.create(config, CPU).state_dict()
    rows = compare_estimators(config, prior, state, CPU, [(1, "random"), (2, "antipodal")], 0.5, repeats=3)
    assert rows[0]["ratio"] == 1.0
    assert rows[1]["per_evaluation"] == pytest.approx(2 * rows[1]["total_variance"])
    assert rows[1]["ratio"] == pytest.approx(rows[1]["per_evaluation"] / rows[0]["per_evaluation"])
