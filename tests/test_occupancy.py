"""Empty-space skipping (occupancy grid, alpha threshold, early ray termination) and chunked
renders against the dense reference renderer.

Equalities are checked in float64, where two orders of the same float operations agree to ~1e-13,
so no CPU or thread count can decide them; the thresholded renders are checked against the error
bound derived in ``mvsdi.render``'s docstring.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from mvsdi.cameras import Cameras, rays, sample_views
from mvsdi.config import RunConfig, preset
from mvsdi.distill import Distiller, Model
from mvsdi.field import Background, Field, FieldConfig
from mvsdi.generate import evaluation_renders
from mvsdi.occupancy import OccupancyGrid, density_function, density_threshold_for
from mvsdi.render import (DENSE, RenderConfig, _Rays, _Selection, composite_weights, ray_box, render, sample_distances,
                          select_samples)
from mvsdi.run_state import restore, roll_back, snapshot
from mvsdi.testbed.prior import IdealDenoiserPrior

CPU = torch.device("cpu")
TINY = FieldConfig(n_levels=4, log2_table_size=10, base_resolution=4, per_level_scale=2.0, hidden_dim=16)
MAPS = ("rgb", "opacity", "depth", "normal", "orientation", "z_variance")


class SoftBall(nn.Module):
    """An opaque ball of radius 0.45 with a soft rim (density up to 60), colour by position; one
    float64 parameter scales the density so that gradients can be compared."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = FieldConfig(bound=1.0)
        self.scale = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def forward(self, x):
        density = self.scale * 60.0 * torch.sigmoid((0.45 - x.norm(dim=-1)) / 0.03)
        return density, torch.sigmoid(3.0 * x)

    def density(self, x):
        return self(x)[0]

    def with_normals(self, x):
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(True)
            density, albedo = self(x_)
            (grad,) = torch.autograd.grad(density.sum(), x_, create_graph=torch.is_grad_enabled())
        return density, albedo, torch.nn.functional.normalize(-grad, dim=-1)


def cameras(n: int = 2, seed: int = 0) -> Cameras:
    return sample_views("random", n, torch.Generator().manual_seed(seed))


def full_grid(bound: float = 1.0) -> OccupancyGrid:
    grid = OccupancyGrid(8, bound, 0.0)
    grid.fill()
    return grid


def render_with_grads(field, background, **kw):
    """A render, and the parameter gradients of a loss that touches every map."""
    field.zero_grad(set_to_none=True)
    background.zero_grad(set_to_none=True)
    out = render(field, background, cameras(), 12, 10, n_samples=16, perturb=True,
                 generator=torch.Generator().manual_seed(3), **kw)
    loss = sum(getattr(out, m).square().mean() for m in MAPS)
    loss.backward()
    grads = [p.grad.clone() for p in [*field.parameters(), *background.parameters()] if p.grad is not None]
    return out, grads


@pytest.mark.parametrize("chunk", [None, 37])  # 37: the selection and the field calls in many pieces
@pytest.mark.parametrize("shading", ["albedo", ["diffuse", "textureless"]])
def test_a_full_grid_with_zero_thresholds_is_the_dense_render(shading, chunk):
    torch.manual_seed(0)
    field, background = Field(TINY).double(), Background().double()
    dense, dense_grads = render_with_grads(field, background, shading=shading)
    packed, packed_grads = render_with_grads(field, background, shading=shading, occupancy=full_grid(),
                                             chunk_samples=chunk)
    assert dense.rgb.dtype == torch.float64
    for name in MAPS:
        a, b = getattr(dense, name), getattr(packed, name)
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (name, (a - b).abs().max())
    assert len(dense_grads) == len(packed_grads) == len(list(field.parameters())) + len(list(background.parameters()))
    for a, b in zip(dense_grads, packed_grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12 * (1 + a.abs().max().item())), (a - b).abs().max()
    # at most the samples of rays that miss the cube are left out
    assert 0 < packed.stats["samples_per_ray"] <= dense.stats["samples_per_ray"] == 16


def _dense_pieces(field, cams, size, n_samples):
    """Per ray [R, S]: dense weights, alphas, transmittance in front, and the _Rays of the render."""
    origins, directions = (x.double() for x in rays(cams, size, size))
    near, far, _ = ray_box(origins, directions, field.cfg.bound)
    t, delta = sample_distances(near, far, n_samples, False, None)
    with torch.no_grad():
        density = field.density(origins[..., None, :] + t[..., None] * directions[..., None, :])
    tau = density * delta
    weights = composite_weights(density, delta).reshape(-1, n_samples)
    alpha = (-torch.expm1(-tau)).reshape(-1, n_samples)
    before = torch.exp(-(torch.cumsum(tau, -1) - tau)).reshape(-1, n_samples)
    rays_ = _Rays.of(cams, origins, directions, field.cfg.bound, ["albedo"] * len(cams), n_samples, False, None)
    return weights, alpha, before, rays_, far.reshape(-1)


@pytest.mark.parametrize("use_grid", [False, True])
def test_thresholds_keep_the_error_within_the_derived_bound(use_grid):
    alpha_thr, t_thr, size, s = 0.01, 1e-4, 24, 64
    field, background, cams = SoftBall(), Background().double(), cameras(3, seed=1)
    grid = None
    if use_grid:  # the ball's density is radial and decreasing: the corner/centre max is an upper bound
        grid = OccupancyGrid(32, 1.0, density_threshold_for(alpha_thr, s, 1.0))
        grid.initialise(density_function(field))
        assert 0.02 < grid.occupied_fraction < 0.2
    kw = dict(n_samples=s, shading="albedo", need_normals=False)
    with torch.no_grad():
        dense = render(field, background, cams, size, size, chunk_samples=None, **kw)
        fast = render(field, background, cams, size, size, occupancy=grid, alpha_threshold=alpha_thr,
                      transmittance_threshold=t_thr, **kw)
    weights, alpha, before, rays_, far = _dense_pieces(field, cams, size, s)
    ray, sample, _ = select_samples(field, rays_, _Selection(grid, alpha_thr, t_thr))
    kept = torch.zeros_like(weights, dtype=torch.bool)
    kept[ray, sample] = True

    # the skipped samples: each one dropped by the alpha test weighs <= its alpha <= alpha_thr;
    # those dropped by early termination weigh together <= t_thr
    by_alpha = ~kept & (before > t_thr)
    assert (weights[by_alpha] <= alpha[by_alpha] + 1e-15).all() and (alpha[by_alpha] <= alpha_thr).all()
    assert ((weights * (~kept & (before <= t_thr))).sum(-1) <= t_thr + 1e-15).all()
    # E = dense weight of everything skipped, and the bound on it
    e = (weights * ~kept).sum(-1)
    assert (e <= (weights * by_alpha).sum(-1) + t_thr + 1e-12).all()
    rgb_err = (fast.rgb - dense.rgb).abs().reshape(-1, 3).amax(-1)
    assert (rgb_err <= 2 * e + 1e-12).all()
    assert ((fast.opacity - dense.opacity).abs().reshape(-1) <= e + 1e-12).all()
    assert ((fast.depth - dense.depth).abs().reshape(-1) <= 2 * e * far + 1e-12).all()
    # ... and it is not vacuous: samples were skipped, the error is real but small
    assert fast.stats["samples_per_ray"] < 0.25 * s
    assert 0 < rgb_err.max() < 0.05


def test_chunked_renders_without_grad_equal_one_chunk():
    torch.manual_seed(0)
    field, background = Field(TINY).double(), Background().double()
    grid = OccupancyGrid(16, 1.0, density_threshold_for(0.01, 16, 1.0))
    grid.initialise(density_function(field))
    kw = dict(n_samples=16, shading=["diffuse", "textureless"], perturb=True)
    with torch.no_grad():
        for extra in (dict(), dict(occupancy=grid, alpha_threshold=0.01, transmittance_threshold=1e-4)):
            whole = render(field, background, cameras(), 12, 10, generator=torch.Generator().manual_seed(5),
                           chunk_samples=None, **extra, **kw)  # dense reference when ``extra`` is empty
            pieces = render(field, background, cameras(), 12, 10, generator=torch.Generator().manual_seed(5),
                            chunk_samples=53, **extra, **kw)  # 3 rays per chunk
            for name in MAPS:
                a, b = getattr(whole, name), getattr(pieces, name)
                assert torch.allclose(a, b, rtol=1e-11, atol=1e-13), (name, extra.keys(), (a - b).abs().max())
            assert whole.stats["samples_per_ray"] >= pieces.stats["samples_per_ray"]


def test_the_initial_grid_holds_the_density_blob_and_stays_off_the_global_rng():
    torch.manual_seed(0)
    field = Field(TINY)
    grid = OccupancyGrid(32, 1.0, density_threshold_for(0.01, 64, 1.0))
    before = torch.get_rng_state()
    grid.initialise(density_function(field))
    grid.refresh(density_function(field), 1, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), before)
    centres = (torch.arange(32) + 0.5) / 16 - 1.0
    radius = torch.stack(torch.meshgrid(centres, centres, centres, indexing="ij"), -1).norm(dim=-1)
    mask = grid.values > grid.density_threshold
    assert mask[radius < 0.45].all() and not mask[radius > 0.75].any()
    # the blob (softplus(10 (1 - r/0.5)) above ~0.19 for r < ~0.58) is a small part of the cube
    assert 0.05 < grid.occupied_fraction < 0.15


def test_the_mean_guard_keeps_a_nearly_empty_grid_from_emptying():
    grid = OccupancyGrid(4, 1.0, density_threshold=1.0)
    grid.initialise(lambda x: 0.1 * (x[:, 0] > 0.5).float())  # everywhere below the threshold
    assert 0 < grid.occupied_fraction < 1


# ------------------------------------------------------------------------------------------------
# the grid in the distillation loop


@pytest.fixture(scope="module")
def prior():
    references = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return IdealDenoiserPrior.from_images({"chair": references})


def config_for(views: int, **overrides) -> RunConfig:
    sampler = "random" if views == 1 else "antipodal"
    base = dict(model="tiny", device="cpu", resolution=16, samples_per_ray=8, budget=16, eval_views=2,
                eval_resolution=16, field=TINY, render=RenderConfig(grid_resolution=8, grid_refresh_every=4))
    base.update(overrides)
    return dataclasses.replace(preset("sds", "chair"), views=views, sampler=sampler, **base)


def grids_along_the_budget(prior, views: int, seed: int = 0) -> dict[float, tuple[int, torch.Tensor]]:
    """Grid (period, values) before each step of a 16-evaluation budget, on the fixed initial field."""
    config = config_for(views, seed=seed)
    distiller = Distiller(config, prior, Model.create(dataclasses.replace(config, seed=0), CPU), CPU)
    seen = {}
    for step in range(config.steps):
        fraction = step * views / config.budget
        distiller.update_occupancy(fraction)
        seen[fraction] = (distiller.occupancy.period, distiller.occupancy.values.clone())
    return seen


def test_grid_refreshes_follow_the_budget_fraction_not_k(prior):
    """Refresh every 4 evaluations: K = 1, 2, 4 refresh at the same fractions, with the same keyed
    jitter, so on the same field they hold the same grid wherever they meet."""
    runs = {views: grids_along_the_budget(prior, views) for views in (1, 2, 4)}
    assert [p for p, _ in runs[1].values()] == [e // 4 for e in range(16)]
    assert len({p for p, _ in runs[1].values()}) == 4  # initialised, then refreshed 3 times
    for views in (2, 4):
        for fraction, (period, values) in runs[views].items():
            assert period == runs[1][fraction][0] and torch.equal(values, runs[1][fraction][1]), (views, fraction)
    final = runs[1][15 / 16][1]
    assert not torch.equal(final, runs[1][0.0][1])  # the refreshes changed it
    assert torch.equal(grids_along_the_budget(prior, 1)[15 / 16][1], final)  # deterministic
    assert not torch.equal(grids_along_the_budget(prior, 1, seed=1)[15 / 16][1], final)  # keyed by the run seed


def test_steps_log_samples_per_ray_and_the_grid_survives_snapshot_restore(prior, tmp_path):
    config = config_for(2, budget=12, render=RenderConfig(grid_resolution=8, grid_refresh_every=2))
    a = Distiller(config, prior, Model.create(config, CPU), CPU)
    records = [a.step() for _ in range(3)]
    assert all(0 < r.samples_per_ray_evaluated < config.samples_per_ray for r in records)
    path = tmp_path / "state.pt"
    torch.save(snapshot(a), path)
    state = torch.load(path, weights_only=True)  # what a resumed run reads
    assert state["occupancy"]["period"] == a.occupancy.period == 2
    b = Distiller(config, prior, Model.create(config, CPU), CPU)
    restore(b, state)
    assert torch.equal(b.occupancy.values, a.occupancy.values) and b.occupancy.period == a.occupancy.period
    ra, rb = a.step(), b.step()
    assert ra.loss == rb.loss and ra.samples_per_ray_evaluated == rb.samples_per_ray_evaluated
    assert torch.equal(a.occupancy.values, b.occupancy.values)
    # a rollback returns the grid too; one to a snapshot from before the first step rebuilds it
    roll_back(a, state)
    assert torch.equal(a.occupancy.values, state["occupancy"]["values"])
    fresh = Distiller(config, prior, Model.create(config, CPU), CPU)
    early = snapshot(fresh)
    assert early["occupancy"] is None
    fresh.step()
    roll_back(fresh, early)
    assert not fresh.occupancy.ready


def test_the_dense_config_evaluates_every_sample(prior):
    config = config_for(1, render=DENSE)
    distiller = Distiller(config, prior, Model.create(config, CPU), CPU)
    assert distiller.step().samples_per_ray_evaluated == config.samples_per_ray
    assert distiller.occupancy is None
    assert RunConfig.from_dict(config.to_dict()) == config
    assert preset("sdi", "x").render == RenderConfig() and RenderConfig().occupancy_grid
    with pytest.raises(ValueError, match="alpha_threshold"):
        RenderConfig(alpha_threshold=1.0)


def test_evaluation_renders_before_training_leave_the_run_state_alone(prior):
    config = config_for(1)
    distiller = Distiller(config, prior, Model.create(config, CPU), CPU)
    outs = evaluation_renders(distiller)
    assert distiller.occupancy is None and len(outs) == 2
    assert math.isfinite(outs[0].stats["samples_per_ray"]) and outs[0].stats["samples_per_ray"] < 8
