import math

import numpy as np
import pytest
import torch

from mvsdi.config import preset
from mvsdi.distill import Distiller, Model
from mvsdi.field import FieldConfig
from mvsdi.priors.stable_diffusion import StableDiffusionPrior
from mvsdi.variance import (GradientSamples, compare_estimators, estimator_variance, flat_gradient, ratio_intervals,
                            resampled_total_variance)

CPU = torch.device("cpu")
SMALL = FieldConfig(n_levels=4, log2_table_size=12, base_resolution=8, per_level_scale=2.0, hidden_dim=16)


def test_gradient_samples_give_the_unbiased_trace_of_the_covariance():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([1.0, 2.0, 0.5])
    samples = torch.randn(400, 3, generator=g) * scales + torch.tensor([5.0, -1.0, 0.0])
    m = GradientSamples()
    for s in samples:
        m.add(s)
    expected = samples.double().var(0, unbiased=True).sum().item()
    assert m.total_variance() == pytest.approx(expected, rel=1e-9)
    assert m.total_variance() == pytest.approx((scales ** 2).sum().item(), rel=0.15)
    assert m.mean_norm() == pytest.approx(samples.double().mean(0).norm().item(), rel=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        one = GradientSamples()
        one.add(samples[0])
        one.total_variance()


def test_a_resample_s_variance_from_the_gram_matrix_equals_the_direct_one():
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(1)).double()
    counts = np.array([[2, 0, 1, 0, 3, 0], [1, 1, 1, 1, 1, 1]], dtype=float)
    gram = (x @ x.T).numpy()
    for row, found in zip(counts, resampled_total_variance(gram, counts)):
        drawn = x.repeat_interleave(torch.tensor(row, dtype=torch.long), 0)
        assert found == pytest.approx(drawn.var(0, unbiased=True).sum().item(), rel=1e-9)


def test_the_ratio_interval_is_paired_over_repeats():
    """Setting B = 2 × setting A draw by draw: the ratio is exactly 4 (×K) in every resample, so a
    paired bootstrap gives a zero-width interval; an independent C gets a wide one around its truth."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(16, 4, generator=g).double()
    c = 3.0 * torch.randn(16, 4, generator=g).double()
    grams = [(v @ v.T).numpy() for v in (a, 2 * a, c)]
    (l1, h1, s1), (l2, h2, s2), (l3, h3, s3) = ratio_intervals(grams, [1, 2, 1], resamples=500)
    assert l1 == h1 == 1.0 and s1 == 0.0
    assert l2 == pytest.approx(8.0) and h2 == pytest.approx(8.0) and s2 < 1e-9
    assert l3 < 9.0 < h3 and h3 / l3 > 1.5 and s3 > 0.1
    with pytest.raises(ValueError, match="same number of repeats"):
        ratio_intervals([grams[0], grams[0][:3, :3]], [1, 1])


def test_two_repeats_give_no_interval_rather_than_a_zero_width_or_random_one():
    """With R = 2 the only resample of two distinct draws is the sample itself: the bootstrap
    returned nan or a zero-width interval depending on the draw of resamples."""
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(3)).double()
    grams = [(v @ v.T).numpy() for v in (x, 3 * x.flip(0))]
    for seed in range(4):
        assert all(math.isnan(v) for row in ratio_intervals(grams, [1, 2], seed=seed) for v in row)
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(3, 4, generator=g).double(), torch.randn(3, 4, generator=g).double()
    low, high, log_se = ratio_intervals([(v @ v.T).numpy() for v in (a, b)], [1, 1])[1]
    assert low < high and log_se > 0  # from R = 3 on there is an interval


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
    assert rows[1]["ratio_low"] <= rows[1]["ratio_high"] and rows[1]["log_ratio_se"] > 0
    assert all(r["fraction"] == 0.5 for r in rows)


def test_the_hash_tables_and_the_shared_weights_partition_the_gradient():
    from mvsdi.variance import gradient_parts

    config = preset("mvsds-k2", "x", model="tiny", device="cpu", field=SMALL)
    model = Model.create(config, CPU)
    parts = gradient_parts(model)
    total = sum(p.numel() for p in model.parameters())
    assert parts["tables"].start == 0 and parts["tables"].stop == parts["shared"].start
    assert parts["shared"].stop == total
    assert parts["tables"].stop == model.field.encoding.embeddings.numel()


def test_part_grams_add_up_to_the_whole_and_median_of_means_resists_one_huge_draw(float64):
    from mvsdi.variance import median_of_means_ratio

    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 6, generator=g)
    samples = GradientSamples({"a": slice(0, 4), "b": slice(4, 6)})
    for row in x:
        samples.add(row)
    grams = samples.grams()
    np.testing.assert_allclose(grams["a"] + grams["b"], grams["all"], rtol=1e-6, atol=1e-6)  # float32 samples
    heavy = x.clone()
    heavy[5] *= 100.0  # one draw of the second setting from a heavy tail
    other = GradientSamples()
    for row in heavy:
        other.add(row)
    counts = np.ones((1, 32))  # every sample drawn once
    plain = resampled_total_variance(other.gram(), counts)[0] / resampled_total_variance(grams["all"], counts)[0]
    median, low, high = median_of_means_ratio(other.gram(), grams["all"], 1)
    assert plain > 50 and median == pytest.approx(1.0) and high > 100 and low == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs >= 16 repeats"):
        median_of_means_ratio(grams["all"][:8, :8], grams["all"][:8, :8], 1)
