"""Score distillation guidance: SDS (DreamFusion) and SDI (score distillation via inversion).

Each guidance turns clean latents z of rendered views into a *target* computed without gradient,
and a loss between z and that target whose gradient w.r.t. z is the distillation update:

    SDS: target = z − w(t)(ε̂_cfg(x_t) − ε),  x_t = √ᾱ_t z + √(1−ᾱ_t) ε, ε random
         loss   = 0.5‖z − target‖² (sum) / N
    SDI: ε found by DDIM-inverting z to t' = min(t+δ, T−1), target = x̂₀ of the inverted x_{t'}
         loss   = 0.5 · mean((z − target)²) / N

Randomness is drawn from one generator per view, so a view's noise does not depend on whether it
is processed alone or in a batch with others (the K-view accumulation relies on this).

UNet calls: one SDS evaluation is one guided call; one SDI evaluation is (grid points below t) + 1
inversion calls plus one denoising call. Every call goes through ``PromptConditioning.guided_noise``
so the prior's counters see it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from mvsdi.cameras import Cameras
from mvsdi.knobs import knob


class GuidedDenoiser(Protocol):
    """What guidance needs from a prompt: classifier-free guided noise for N latents / N cameras."""

    def guided_noise(self, latents_t: torch.Tensor, t: torch.Tensor, cameras: Cameras,
                     guidance_scale: float) -> torch.Tensor: ...


@dataclass(frozen=True)
class SDSConfig:
    guidance_scale: float = knob(100.0, "classifier-free guidance scale", flags=("--guidance-scale",))
    t_min: float = knob(0.02, "t ~ U[t_min, t_max]·T per view: lower end")
    t_max: float = knob(0.98, "t ~ U[t_min, t_max]·T per view: upper end")
    # a falling upper end (threestudio's max-step anneal, here over the budget fraction) spends the late
    # steps at small t; on the testbed it raised 3D IoU but brought back no detail (docs/testbed.md)
    t_max_end: float | None = knob(None, "if set, t_max falls linearly to this over the budget (none: fixed)")
    weighting: Literal["sds", "uniform", "fantasia3d"] = knob("sds", "w(t) of the SDS gradient")
    kind: Literal["sds"] = knob("sds", "sds or sdi: fixed by the preset (start from one of the other kind to switch)")

    def __post_init__(self) -> None:
        ends = (self.t_max,) if self.t_max_end is None else (self.t_max, self.t_max_end)
        if not all(0.0 <= self.t_min <= top < 1.0 for top in ends):
            raise ValueError(f"SDS needs 0 <= t_min <= t_max < 1 (and t_max_end likewise), got t_min={self.t_min}, "
                             f"t_max={self.t_max}, t_max_end={self.t_max_end}")

    def upper(self, fraction: float) -> float:
        """The upper end of t's range after ``fraction`` of the budget."""
        if self.t_max_end is None:
            return self.t_max
        return self.t_max + (self.t_max_end - self.t_max) * min(max(fraction, 0.0), 1.0)


@dataclass(frozen=True)
class SDIConfig:
    guidance_scale: float = knob(7.5, "classifier-free guidance scale", flags=("--guidance-scale",))
    inversion_guidance_scale: float = knob(-7.5, "guidance scale of the DDIM inversion",
                                           flags=("--inversion-guidance-scale",))
    inversion_steps: int = knob(10, "size of the DDIM grid that inversion walks along")
    inversion_eta: float = knob(0.3, "stochasticity (eta) of the DDIM inversion")
    delta_max: int = knob(99, "t' = min(t + δ, T−1), δ ~ U{0..delta_max}")
    t_start: float = knob(0.98, "t anneals linearly from t_start·T to t_end·T over the budget")
    t_end: float = knob(0.25, "where the t anneal ends, as a fraction of T")
    # the reference counts the anneal in steps of a 10,000-step run whatever K, i.e. a span of K
    # (its K=2 runs end at t ≈ 615, K=4 at ≈ 797)
    t_anneal_span: float = knob(1.0, "budget fraction at which the anneal reaches t_end (1: the whole run; "
                                     "--schedule reference sets K, as the reference counts it)")
    t_anneal: bool = knob(True, "anneal t; false: draw t ~ U{t_end·T .. t_start·T} per view (the reference's "
                                "sensitivity run)", flags=("--no-t-anneal",))
    kind: Literal["sdi"] = knob("sdi", "sds or sdi: fixed by the preset (start from one of the other kind to switch)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.t_end <= self.t_start < 1.0:
            raise ValueError(f"SDI needs 0 <= t_end <= t_start < 1, got t_end={self.t_end}, t_start={self.t_start}")
        if self.t_anneal_span <= 0:
            raise ValueError(f"t_anneal_span must be > 0, got {self.t_anneal_span}")


GuidanceConfig = SDSConfig | SDIConfig


def timestep(cfg: GuidanceConfig, fraction: float, generator: torch.Generator, num_train_timesteps: int) -> int:
    """A view's diffusion time t (an integer label), a function of the budget fraction spent.

    SDS draws t uniformly (integers, inclusive) for each view, as the reference does in every
    guidance call: a t shared by the K views of a step would make their gradients correlated; its
    upper end may fall with the fraction (``t_max_end``), the same for every K.
    SDI anneals it deterministically, so K=1, 2, 4 see the same t at the same budget fraction;
    without the anneal it draws t per view like SDS, over [t_end, t_start].
    """
    T = num_train_timesteps
    if isinstance(cfg, SDSConfig) or not cfg.t_anneal:
        lo, hi = (cfg.t_min, cfg.upper(fraction)) if isinstance(cfg, SDSConfig) else (cfg.t_end, cfg.t_start)
        return int(torch.randint(int(lo * T), int(hi * T) + 1, (1,), generator=generator).item())
    progress = min(max(fraction / cfg.t_anneal_span, 0.0), 1.0)
    return int((cfg.t_start + (cfg.t_end - cfg.t_start) * progress) * T)


def _randn_per_view(like: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    return torch.stack([torch.randn(like.shape[1:], generator=g, device=g.device, dtype=torch.float32)
                        for g in generators]).to(like.device)


def _sds_weight(cfg: SDSConfig, alpha_bar: torch.Tensor) -> torch.Tensor:
    if cfg.weighting == "sds":
        return 1.0 - alpha_bar
    if cfg.weighting == "uniform":
        return torch.ones_like(alpha_bar)
    return alpha_bar.sqrt() * (1.0 - alpha_bar)


@torch.no_grad()
def sds_target(cfg: SDSConfig, prompt: GuidedDenoiser, alphas_cumprod: torch.Tensor, latents: torch.Tensor,
               cameras: Cameras, t: int | torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    labels = torch.as_tensor(t, dtype=torch.long, device=latents.device).expand(latents.shape[0])
    alpha_bar = alphas_cumprod[labels].view(-1, 1, 1, 1)
    noise = _randn_per_view(latents, generators)
    noisy = alpha_bar.sqrt() * latents + (1.0 - alpha_bar).sqrt() * noise
    eps = prompt.guided_noise(noisy, labels, cameras, cfg.guidance_scale)
    grad = torch.nan_to_num(_sds_weight(cfg, alpha_bar) * (eps - noise))
    return latents - grad


def inversion_grid(t: int, cfg: SDIConfig, num_train_timesteps: int) -> list[int]:
    """The DDIM grid points strictly below t that inversion passes through.

    The grid is SD's "leading" 10-step grid {1, 101, ..., 901} (steps_offset 1). Inversion starts
    at the clean latent (noise level 0), visits each of these points, and ends at t'.
    """
    stride = num_train_timesteps // cfg.inversion_steps
    return [g for g in range(1, num_train_timesteps, stride) if g < t]


def sdi_unet_calls(t: int, cfg: SDIConfig, num_train_timesteps: int) -> int:
    """Guided UNet calls of one SDI evaluation at time t: the inversion steps plus one denoise."""
    return len(inversion_grid(t, cfg, num_train_timesteps)) + 2


def _column(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


@torch.no_grad()
def ddim_invert(cfg: SDIConfig, prompt: GuidedDenoiser, alphas_cumprod: torch.Tensor, latents: torch.Tensor,
                cameras: Cameras, t_final: torch.Tensor, grid: list[int],
                generators: list[torch.Generator]) -> torch.Tensor:
    """Walk the clean latents up the noise levels 0 → grid → t_final[i] with DDIM inversion steps.

    Each step predicts ε at the current level (guided with ``inversion_guidance_scale``), forms x̂₀
    and re-noises it to the next level along the same ε, plus η·σ·z stochasticity with σ the DDIM
    variance between the two levels (the SDI paper's η = 0.3). The grid is shared by the views of
    a step; only the last level t' differs per view.
    """
    n, device = latents.shape[0], latents.device
    x = latents
    levels = [torch.full((n,), g, device=device, dtype=torch.long) for g in [0, *grid]] + [t_final.to(device)]
    for current, nxt in zip(levels[:-1], levels[1:]):
        a_cur, a_next = _column(alphas_cumprod[current]), _column(alphas_cumprod[nxt])
        eps = prompt.guided_noise(x, current, cameras, cfg.inversion_guidance_scale)
        x0 = (x - (1 - a_cur).sqrt() * eps) / a_cur.sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        if cfg.inversion_eta > 0:
            variance = (1 - a_cur) / (1 - a_next) * (1 - a_next / a_cur)
            x = x + cfg.inversion_eta * variance.clamp_min(0).sqrt() * _randn_per_view(x, generators)
    return x


def _t_prime(cfg: SDIConfig, t: int, generators: list[torch.Generator], num_train_timesteps: int) -> torch.Tensor:
    """t' = min(t + δ, T−1) per view, δ ~ U{0..delta_max} from the view's own generator."""
    deltas = [int(torch.randint(0, cfg.delta_max + 1, (1,), generator=g, device=g.device).item()) for g in generators]
    return torch.tensor([min(t + d, num_train_timesteps - 1) for d in deltas], dtype=torch.long)


@torch.no_grad()
def sdi_target(cfg: SDIConfig, prompt: GuidedDenoiser, alphas_cumprod: torch.Tensor, latents: torch.Tensor,
               cameras: Cameras, t: int, generators: list[torch.Generator]) -> torch.Tensor:
    T = alphas_cumprod.shape[0]
    t_prime = _t_prime(cfg, t, generators, T)
    x_t = ddim_invert(cfg, prompt, alphas_cumprod, latents, cameras, t_prime, inversion_grid(t, cfg, T), generators)
    # Denoised at label t (not t'), with x̂₀ formed at ᾱ_t: the SDI reference's choice.
    labels = torch.full((latents.shape[0],), t, device=x_t.device, dtype=torch.long)
    eps = prompt.guided_noise(x_t, labels, cameras, cfg.guidance_scale)
    alpha_bar = alphas_cumprod[t]
    return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def guidance_target(cfg: GuidanceConfig, prompt: GuidedDenoiser, alphas_cumprod: torch.Tensor, latents: torch.Tensor,
                    cameras: Cameras, t: int | torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """The no-grad target for N latents of N views at time t (one generator per view).

    SDS takes one t per view ([N] tensor) or one for all; SDI's t is shared (annealed) and an int.
    """
    if len(generators) != latents.shape[0] or len(cameras) != latents.shape[0]:
        raise ValueError("guidance_target needs one camera and one generator per latent")
    if isinstance(cfg, SDIConfig) and not isinstance(t, int):
        raise ValueError("SDI anneals one t for all views of a step: pass it as an int")
    fn = sds_target if isinstance(cfg, SDSConfig) else sdi_target
    return fn(cfg, prompt, alphas_cumprod, latents.detach().float(), cameras, t, generators)


def guidance_loss(cfg: GuidanceConfig, latents: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-view loss [N]: its gradient w.r.t. z is the distillation update of that view.

    Summed over views it is the reference's batch loss (which divides by the batch size).
    """
    diff = (latents.float() - target.detach()).flatten(1)
    if isinstance(cfg, SDSConfig):
        return 0.5 * diff.pow(2).sum(1)
    return 0.5 * diff.pow(2).mean(1)

