"""Prompt conditioning shared by all priors: view-dependent prompts, classifier-free guidance, Perp-Neg.

Every text a prompt can need is embedded once, at construction. Per step, the conditioning of each
camera is built from those cached tensors by indexing (view-dependent prompts) or by a convex
combination (Perp-Neg's interpolated positive), and the whole guided batch goes through the prior
in a single ``predict_noise`` call, so the prior's counters measure exactly one call per guidance.

Perp-Neg (Armandpour et al. 2023) follows the rule of threestudio's prompt processor, whose numbers
are reproduced here:

- azimuth |φ| < 90°: r = 1 − |φ|/90 (1 = pure front); positive = r·front + (1−r)·side;
  negatives (front, side) with weights (−f_fs(r), −f_sf(1−r));
- |φ| ≥ 90°: r = 2 − |φ|/90 (1 = pure side, 0 = pure back); positive = r·side + (1−r)·back;
  negatives (side, front) with weights (−f_sb(r), −f_fsb(r));
- overhead cameras (elevation above ``overhead_deg``): positive = overhead, both negatives carry
  weight 0 (their slots hold the unconditional text so the batch keeps its shape);

with the shifted exponential decay f(r) = a·exp(−b·r) + c. The weights are negative, so adding
w·perp(ε_neg − ε_u, ε_pos − ε_u) pushes the sample *away* from the other views' descriptions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mvsdi.cameras import Cameras, view_direction, wrap_azimuth
from mvsdi.knobs import knob
from mvsdi.priors.base import DiffusionPrior

# Order of the cached view-dependent embeddings; UNCOND is the negative prompt (the "empty" text).
VIEWS = ("front", "side", "back", "overhead")
FRONT, SIDE, BACK, OVERHEAD, UNCOND = range(5)

Decay = tuple[float, float, float]  # (a, b, c) of a·exp(−b·r) + c


@dataclass(frozen=True)
class PromptConfig:
    view_dependent: bool = knob(True, "append \", front view\" / \", side view\" / ... per camera")
    perp_neg: bool = knob(True, "Perp-Neg as in the SDI configuration (needs view-dependent prompts)")
    negative_prompt: str = knob("", "the unconditional text of classifier-free guidance", flags=("--negative-prompt",))
    front_half_width_deg: float = knob(45.0, "azimuths within this of the front get the front view's prompt")
    overhead_deg: float = knob(60.0, "cameras above this elevation get the overhead view's prompt")
    # threestudio's defaults; f_fs(1) ≈ 0 and f_sb(1) ≈ 0, so a pure view does not repel itself
    perp_neg_f_sb: Decay = knob((1.0, 0.5, -0.606), "Perp-Neg weight decay f_sb(r) = a·exp(−b·r) + c (A B C)")
    perp_neg_f_fsb: Decay = knob((1.0, 0.5, 0.967), "Perp-Neg weight decay f_fsb (A B C)")
    perp_neg_f_fs: Decay = knob((4.0, 0.5, -2.426), "Perp-Neg weight decay f_fs (A B C)")
    perp_neg_f_sf: Decay = knob((4.0, 0.5, -2.426), "Perp-Neg weight decay f_sf (A B C)")

    def __post_init__(self) -> None:
        # Refuse rather than silently switch view-dependence back on: the caller asked for both.
        if self.perp_neg and not self.view_dependent:
            raise ValueError("perp_neg=True needs view-dependent prompts: set view_dependent=True or perp_neg=False")


def shifted_exponential_decay(abc: Decay, r: torch.Tensor) -> torch.Tensor:
    a, b, c = abc
    return a * torch.exp(-b * r) + c


@dataclass(frozen=True)
class PerpNegPlan:
    """Per camera: how to mix the cached embeddings into the positive, which two negatives, their weights."""

    positive: torch.Tensor  # [N, 5] convex weights over (front, side, back, overhead, uncond)
    negatives: torch.Tensor  # [N, 2] long indices into the same five embeddings
    weights: torch.Tensor  # [N, 2] float32, the w_i of the Perp-Neg sum (≤ 0 by default)


def perp_neg_plan(azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor, cfg: PromptConfig) -> PerpNegPlan:
    az = wrap_azimuth(azimuth_deg.float()).abs()
    front_half = az < 90.0
    r_fs = 1.0 - az / 90.0  # 1 at the front, 0 at the side
    r_sb = 2.0 - az / 90.0  # 1 at the side, 0 at the back
    n = az.shape[0]
    positive = torch.zeros(n, 5)
    positive[:, FRONT] = torch.where(front_half, r_fs, 0.0)
    positive[:, SIDE] = torch.where(front_half, 1.0 - r_fs, r_sb)
    positive[:, BACK] = torch.where(front_half, 0.0, 1.0 - r_sb)
    negatives = torch.where(front_half[:, None], torch.tensor([FRONT, SIDE]), torch.tensor([SIDE, FRONT]))
    weights = torch.stack([
        torch.where(front_half, -shifted_exponential_decay(cfg.perp_neg_f_fs, r_fs),
                    -shifted_exponential_decay(cfg.perp_neg_f_sb, r_sb)),
        torch.where(front_half, -shifted_exponential_decay(cfg.perp_neg_f_sf, 1.0 - r_fs),
                    -shifted_exponential_decay(cfg.perp_neg_f_fsb, r_sb)),
    ], dim=1)
    overhead = elevation_deg.float() > cfg.overhead_deg
    positive[overhead] = torch.eye(5)[OVERHEAD]
    negatives[overhead] = UNCOND
    weights[overhead] = 0.0
    return PerpNegPlan(positive, negatives, weights)


def perpendicular(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The part of each sample of ``a`` orthogonal to the same sample of ``b`` (inner product over C,H,W)."""
    dims = tuple(range(1, a.ndim))
    # the floor only matters when ε_pos = ε_u exactly; then the projection is taken as zero
    coef = (a * b).sum(dims, keepdim=True) / (b * b).sum(dims, keepdim=True).clamp_min(1e-12)
    return a - coef * b


class PromptConditioning:
    """One prompt bound to one prior: guided noise for N latents seen from N cameras."""

    def __init__(self, prior: DiffusionPrior, prompt: str, cfg: PromptConfig = PromptConfig()):
        if not prompt or not prompt.strip():
            raise ValueError("the prompt is empty: pass a text that describes the object")
        self.prior, self.prompt, self.cfg = prior, prompt, cfg
        texts = [f"{prompt}, {view} view" for view in VIEWS] + [cfg.negative_prompt, prompt]
        self.texts = texts
        # one embed call for all six texts; [front, side, back, overhead, uncond] then the plain prompt
        # in the default dtype (float32; float64 for reference computations), whatever the prior's
        embedded = prior.embed_texts(texts).to(torch.get_default_dtype())
        self.basis = embedded[:5]
        self.plain = embedded[5]

    @property
    def uncond(self) -> torch.Tensor:
        return self.basis[UNCOND]

    def view_indices(self, cameras: Cameras) -> torch.Tensor:
        words = view_direction(cameras.azimuth_deg, cameras.elevation_deg,
                               self.cfg.front_half_width_deg, self.cfg.overhead_deg)
        return torch.tensor([VIEWS.index(w) for w in words], device=self.basis.device)

    def conditional_embeddings(self, cameras: Cameras) -> torch.Tensor:
        """[N, ...] the positive text of each camera for plain CFG."""
        if self.cfg.view_dependent:
            return self.basis[self.view_indices(cameras)]
        return self.plain.expand(len(cameras), *self.plain.shape)

    def guided_noise(self, latents_t: torch.Tensor, t: torch.Tensor, cameras: Cameras,
                     guidance_scale: float) -> torch.Tensor:
        if len(cameras) != latents_t.shape[0]:
            raise ValueError(f"{latents_t.shape[0]} latents but {len(cameras)} cameras: one camera per latent")
        if self.cfg.perp_neg:
            return self._perp_neg(latents_t, t, cameras, guidance_scale)
        n = latents_t.shape[0]
        embeddings = torch.cat([self.conditional_embeddings(cameras), self.uncond.expand(n, *self.uncond.shape)])
        eps = self.prior.predict_noise(latents_t.repeat(2, *[1] * (latents_t.ndim - 1)), t.repeat(2), embeddings)
        eps_c, eps_u = eps.chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)

    def _perp_neg(self, latents_t: torch.Tensor, t: torch.Tensor, cameras: Cameras,
                  guidance_scale: float) -> torch.Tensor:
        n = latents_t.shape[0]
        device = self.basis.device
        plan = perp_neg_plan(cameras.azimuth_deg.cpu(), cameras.elevation_deg.cpu(), self.cfg)
        positive = torch.einsum("nk,k...->n...", plan.positive.to(device), self.basis)
        negatives = self.basis[plan.negatives.to(device)]  # [N, 2, ...]
        # batch layout: [positive | negative 1 | negative 2 | uncond], N each
        embeddings = torch.cat([positive, negatives[:, 0], negatives[:, 1], self.uncond.expand(n, *self.uncond.shape)])
        eps = self.prior.predict_noise(latents_t.repeat(4, *[1] * (latents_t.ndim - 1)), t.repeat(4), embeddings)
        eps_pos, eps_n1, eps_n2, eps_u = eps.chunk(4)
        delta_pos = eps_pos - eps_u
        weights = plan.weights.to(eps.device, eps.dtype).view(n, *[1] * (eps.ndim - 1), 2)
        repel = (weights[..., 0] * perpendicular(eps_n1 - eps_u, delta_pos)
                 + weights[..., 1] * perpendicular(eps_n2 - eps_u, delta_pos))
        return eps_u + guidance_scale * (delta_pos + repel)

