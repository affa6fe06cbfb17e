"""SDS and SDI against independent computations on a toy prior whose noise prediction is known."""

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from mvsdi.cameras import evaluation_cameras
from mvsdi.guidance import (SDIConfig, SDSConfig, guidance_loss, guidance_target, inversion_grid, sdi_unet_calls,
                            timestep)

SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                   timestep_spacing="leading")


def alphas():
    return DDIMScheduler(**SD_SCHEDULE).alphas_cumprod.float()


class ToyPrompt:
    """Guided noise ε̂ = 0.3·x + 0.01·scale·1 — independent of t, so any walk is easy to recompute."""

    def __init__(self):
        self.calls, self.labels = 0, []

    def guided_noise(self, x, t, cameras, scale):
        self.calls += 1
        self.labels.append(t.tolist())
        assert t.shape == (x.shape[0],) and len(cameras) == x.shape[0]
        return 0.3 * x + 0.01 * scale


def eps_np(x, scale):
    return 0.3 * x + 0.01 * scale


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_inversion_grid_is_the_leading_ten_step_grid_below_t():
    cfg = SDIConfig()
    assert inversion_grid(980, cfg, 1000) == [1, 101, 201, 301, 401, 501, 601, 701, 801, 901]
    assert inversion_grid(250, cfg, 1000) == [1, 101, 201]
    assert inversion_grid(101, cfg, 1000) == [1]
    assert inversion_grid(1, cfg, 1000) == []
    assert sdi_unet_calls(980, cfg, 1000) == 12 and sdi_unet_calls(250, cfg, 1000) == 5


def test_sdi_anneals_t_with_the_budget_fraction_and_sds_draws_it():
    cfg = SDIConfig()
    g = torch.Generator().manual_seed(0)
    assert timestep(cfg, 0.0, g, 1000) == 980
    assert timestep(cfg, 1.0, g, 1000) == 250
    assert timestep(cfg, 0.5, g, 1000) == int((0.98 - 0.73 * 0.5) * 1000)
    ts = [timestep(SDSConfig(), 0.3, g, 1000) for _ in range(2000)]
    assert min(ts) >= 20 and max(ts) <= 980 and len(set(ts)) > 500



def test_sds_upper_end_falls_with_the_budget_fraction_when_asked():
    cfg = SDSConfig(t_max=0.98, t_max_end=0.3)
    assert cfg.upper(0.0) == 0.98 and cfg.upper(1.0) == pytest.approx(0.3) and cfg.upper(2.0) == pytest.approx(0.3)
    assert cfg.upper(0.5) == pytest.approx(0.64)
    assert SDSConfig().upper(0.9) == 0.98  # no anneal unless asked: the recorded runs stand
    g = torch.Generator().manual_seed(0)
    late = [timestep(cfg, 0.9, g, 1000) for _ in range(2000)]
    assert min(late) >= 20 and max(late) <= int(cfg.upper(0.9) * 1000) and max(late) > 350
    with pytest.raises(ValueError, match="t_max_end"):
        SDSConfig(t_max_end=0.01)  # below t_min
    with pytest.raises(ValueError, match="t_max_end"):
        SDSConfig(t_max_end=1.5)  # past T
    with pytest.raises(ValueError, match="t_min"):
        SDSConfig(t_min=0.5, t_max=0.4)

def test_sdi_without_eta_matches_diffusers_inverse_ddim_then_a_hand_step():
    """The grid part of the walk is checked against diffusers' DDIMInverseScheduler (a separate
    implementation of the same maths); the last step to t' and x̂₀ are recomputed in float64."""
    cfg = SDIConfig(inversion_eta=0.0)
    ac = alphas()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = 430
    g = gens(1, seed=5)
    delta = int(torch.randint(0, cfg.delta_max + 1, (1,), generator=torch.Generator().manual_seed(5)).item())
    prompt = ToyPrompt()
    target = guidance_target(cfg, prompt, ac, z, evaluation_cameras(1), t, g)

    inverse = DDIMInverseScheduler(**SD_SCHEDULE)
    inverse.set_timesteps(10)
    x = z.double()
    grid = [int(s) for s in inverse.timesteps if s < t]
    assert grid == [1, 101, 201, 301, 401]
    for s in grid:  # each step ends at s, starting from the previous grid point (ᾱ[0] before the first)
        x = inverse.step(eps_np(x, cfg.inversion_guidance_scale), s, x).prev_sample
    acd = ac.double()
    t_prime = min(t + delta, 999)
    a_cur, a_next = acd[grid[-1]], acd[t_prime]
    e = eps_np(x, cfg.inversion_guidance_scale)
    x0 = (x - (1 - a_cur).sqrt() * e) / a_cur.sqrt()
    x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * e
    expected = (x - (1 - acd[t]).sqrt() * eps_np(x, cfg.guidance_scale)) / acd[t].sqrt()
    assert torch.allclose(target.double(), expected, rtol=1e-4, atol=1e-4)
    # calls: one per grid point below t, one from the last grid point to t', one denoise
    assert prompt.calls == sdi_unet_calls(t, cfg, 1000) == len(grid) + 2
    assert prompt.labels[0] == [0] and prompt.labels[-1] == [t]


def test_sdi_eta_noise_follows_the_ddim_variance():
    cfg = SDIConfig(inversion_eta=0.3)
    ac = alphas().double()
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    t = 250
    target = guidance_target(cfg, ToyPrompt(), ac.float(), z, evaluation_cameras(1), t, gens(1, 9))
    # recompute with the same random stream: δ first, then one normal draw per inversion step
    g = torch.Generator().manual_seed(9)
    delta = int(torch.randint(0, cfg.delta_max + 1, (1,), generator=g).item())
    levels = [0, 1, 101, 201, min(t + delta, 999)]
    x = z.double()
    for cur, nxt in zip(levels[:-1], levels[1:]):
        e = eps_np(x, -7.5)
        x0 = (x - torch.sqrt(1 - ac[cur]) * e) / torch.sqrt(ac[cur])
        sigma = torch.sqrt((1 - ac[cur]) / (1 - ac[nxt]) * (1 - ac[nxt] / ac[cur]))
        noise = torch.randn(z.shape[1:], generator=g).double()
        x = torch.sqrt(ac[nxt]) * x0 + torch.sqrt(1 - ac[nxt]) * e + 0.3 * sigma * noise
    expected = (x - torch.sqrt(1 - ac[t]) * eps_np(x, 7.5)) / torch.sqrt(ac[t])
    assert torch.allclose(target.double(), expected, atol=1e-4)


def test_sds_target_is_latent_minus_weighted_noise_residual():
    cfg = SDSConfig()
    ac = alphas()
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    t = 600
    target = guidance_target(cfg, ToyPrompt(), ac, z, evaluation_cameras(2), t, gens(2, 11))
    noise = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(11 + i)) for i in range(2)])
    a = ac[t]
    x_t = a.sqrt() * z + (1 - a).sqrt() * noise
    expected = z - (1 - a) * (0.3 * x_t + 0.01 * 100 - noise)
    assert torch.allclose(target, expected, atol=1e-5)


def test_loss_gradients_are_the_distillation_updates():
    z = torch.randn(2, 4, 4, 4, requires_grad=True)
    target = torch.randn(2, 4, 4, 4)
    guidance_loss(SDSConfig(), z, target).sum().backward()
    assert torch.allclose(z.grad, z.detach() - target)  # SDS: grad = w(ε̂ − ε)
    z.grad = None
    guidance_loss(SDIConfig(), z, target).sum().backward()
    assert torch.allclose(z.grad, (z.detach() - target) / (4 * 4 * 4))  # SDI: 0.5·mean


def test_a_view_gets_the_same_target_alone_or_in_a_batch():
    for cfg in (SDSConfig(), SDIConfig()):
        z = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(4))
        cams = evaluation_cameras(3)
        batched = guidance_target(cfg, ToyPrompt(), alphas(), z, cams, 500, gens(3, 20))
        alone = torch.cat([guidance_target(cfg, ToyPrompt(), alphas(), z[i:i + 1], cams[i], 500, gens(1, 20 + i))
                           for i in range(3)])
        assert torch.allclose(batched, alone, atol=1e-6)


def test_mismatched_generators_are_refused():
    with pytest.raises(ValueError, match="one camera and one generator"):
        guidance_target(SDSConfig(), ToyPrompt(), alphas(), torch.zeros(2, 4, 2, 2), evaluation_cameras(2), 10, gens(1))


def test_sds_accepts_one_t_per_view_and_sdi_refuses_it():
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(6))
    cams = evaluation_cameras(2)
    both = guidance_target(SDSConfig(), ToyPrompt(), alphas(), z, cams, torch.tensor([100, 900]), gens(2, 30))
    first = guidance_target(SDSConfig(), ToyPrompt(), alphas(), z[:1], cams[0], 100, gens(1, 30))
    second = guidance_target(SDSConfig(), ToyPrompt(), alphas(), z[1:], cams[1], 900, gens(1, 31))
    assert torch.allclose(both, torch.cat([first, second]), atol=1e-6)
    with pytest.raises(ValueError, match="int"):
        guidance_target(SDIConfig(), ToyPrompt(), alphas(), z, cams, torch.tensor([300, 300]), gens(2))
