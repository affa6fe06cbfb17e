"""Volume rendering of a ``Field`` over a learned ``Background``, with point-light shading.

One batched pass: every ray of every camera is cut by the field's cube, sampled at ``n_samples``
stratified distances, and composited with the usual quadrature
    alpha_i = 1 - exp(-sigma_i delta_i),  T_i = prod_{j<i} (1 - alpha_j),  w_i = T_i alpha_i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mvsdi.cameras import Cameras, rays
from mvsdi.field import Background, Field

SHADINGS = ("albedo", "diffuse", "textureless")


@dataclass
class ShadingConfig:
    """Light colours of threestudio's diffuse-with-point-light material (grey light)."""

    ambient: float = 0.1
    diffuse: float = 0.9


@dataclass
class RenderOutput:
    rgb: Tensor  # [N, H, W, 3] composited over the background, in [0, 1]
    opacity: Tensor  # [N, H, W, 1] accumulated weight
    depth: Tensor  # [N, H, W, 1] weights-sum of sample distance (0 where empty)
    normal: Tensor  # [N, H, W, 3] weights-sum of world normals (not normalised)
    orientation: Tensor  # [N] orientation penalty (normals facing away from the camera)
    z_variance: Tensor  # [N] mean over opaque rays of the per-ray variance of sample distance


def _shading_list(shading: str | Sequence[str], n: int) -> list[str]:
    names = [shading] * n if isinstance(shading, str) else list(shading)
    if len(names) != n:
        raise ValueError(f"got {len(names)} shadings for {n} cameras")
    for name in names:
        if name not in SHADINGS:
            raise ValueError(f"unknown shading {name!r}; choose one of: {', '.join(SHADINGS)}")
    return names


def ray_box(origins: Tensor, directions: Tensor, bound: float) -> tuple[Tensor, Tensor, Tensor]:
    """Slab-method intersection with [-bound, bound]^3: (near, far, hit), near clamped to >= 0."""
    # A zero component would give 0 * inf = nan; a tiny same-signed one gives the right +-inf limit.
    tiny = torch.where(directions >= 0, 1e-12, -1e-12).to(directions)
    inv = 1.0 / torch.where(directions.abs() < 1e-12, tiny, directions)
    t0, t1 = (-bound - origins) * inv, (bound - origins) * inv
    near = torch.minimum(t0, t1).amax(-1).clamp_min(0.0)  # the camera may sit inside the cube
    far = torch.maximum(t0, t1).amin(-1)
    hit = far > near
    zero = torch.zeros_like(near)
    return torch.where(hit, near, zero), torch.where(hit, far, zero), hit


def sample_distances(near: Tensor, far: Tensor, n_samples: int, perturb: bool,
                     generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Stratified distances [..., S] between near and far and the bin width [..., 1] of each ray.

    Each sample stands for its whole bin, so delta is the bin width; with ``perturb`` the sample
    is uniform inside its bin, which keeps the quadrature of the density integral unbiased.
    """
    u = torch.rand((*near.shape, n_samples), generator=generator, device=near.device, dtype=near.dtype) \
        if perturb else torch.full((*near.shape, n_samples), 0.5, device=near.device, dtype=near.dtype)
    width = ((far - near) / n_samples)[..., None]
    bins = torch.arange(n_samples, device=near.device, dtype=near.dtype)
    return near[..., None] + (bins + u) * width, width


def composite_weights(density: Tensor, delta: Tensor) -> Tensor:
    """w_i = T_i (1 - exp(-tau_i)) with T_i = exp(-sum_{j<i} tau_j); stable for huge densities."""
    tau = density * delta
    before = torch.cumsum(tau, -1) - tau  # exclusive sum: optical depth in front of sample i
    return torch.exp(-before) * -torch.expm1(-tau)


def shade(albedo: Tensor, normals: Tensor | None, points: Tensor, cameras: Cameras, names: list[str],
          cfg: ShadingConfig) -> Tensor:
    """Colour of each sample [N, H, W, S, 3] under each image's shading mode."""
    if all(name == "albedo" for name in names):
        return albedo
    per_image = lambda flags: torch.tensor(flags, device=albedo.device).view(-1, 1, 1, 1, 1)  # noqa: E731
    light = cameras.light_position.to(points)[:, None, None, None, :]  # [N, 1, 1, 1, 3]
    to_light = F.normalize(light - points, dim=-1)
    lambert = (normals * to_light).sum(-1, keepdim=True).clamp_min(0.0)
    base = torch.where(per_image([n == "textureless" for n in names]), torch.ones_like(albedo), albedo)
    lit = (base * (cfg.ambient + cfg.diffuse * lambert)).clamp(0.0, 1.0)
    return torch.where(per_image([n == "albedo" for n in names]), albedo, lit)


def orientation_penalty(weights: Tensor, normals: Tensor, directions: Tensor, opacity: Tensor) -> Tensor:
    """Per image: sum over samples of sg(w) relu(n.d)^2, over the number of rays with opacity > 0.

    As in threestudio's "orient" loss the weights are detached: the penalty should turn normals
    towards the camera, not reward deleting the density that carries them.
    """
    facing_away = (normals * directions[..., None, :]).sum(-1).clamp_min(0.0).square()  # [N, H, W, S]
    total = (weights.detach() * facing_away).flatten(1).sum(1)
    rays_with_content = (opacity > 0).flatten(1).sum(1).clamp_min(1)
    return total / rays_with_content


def distance_variance(weights: Tensor, t: Tensor, opacity: Tensor) -> Tensor:
    """Per image: mean over rays with opacity > 0.5 of the variance of t under normalised weights."""
    p = weights / opacity.clamp_min(1e-6)  # [N, H, W, S], sums to 1 on rays that hold anything
    mean = (p * t).sum(-1, keepdim=True)
    variance = (p * (t - mean).square()).sum(-1, keepdim=True)  # [N, H, W, 1]
    opaque = (opacity > 0.5).to(variance)
    return (variance * opaque).flatten(1).sum(1) / opaque.flatten(1).sum(1).clamp_min(1.0)


def render(field: Field, background: Background, cameras: Cameras, height: int, width: int, *,
           n_samples: int = 64, shading: str | Sequence[str] = "albedo", shading_cfg: ShadingConfig = ShadingConfig(),
           perturb: bool = False, generator: torch.Generator | None = None, need_normals: bool = True) -> RenderOutput:
    """Render N cameras at height x width; ``shading`` is one mode for all images or one per camera.

    Normals are computed when the shading needs them or
    ``need_normals`` is set; otherwise the normal map and the orientation penalty are zeros.
    """
    names = _shading_list(shading, len(cameras))
    origins, directions = rays(cameras, height, width)  # [N, H, W, 3]
    near, far, _ = ray_box(origins, directions, field.cfg.bound)
    t, delta = sample_distances(near, far, n_samples, perturb, generator)  # [N, H, W, S], [N, H, W, 1]
    points = origins[..., None, :] + t[..., None] * directions[..., None, :]  # [N, H, W, S, 3]

    if need_normals or any(n != "albedo" for n in names):
        density, albedo, normals = field.with_normals(points)
    else:
        (density, albedo), normals = field(points), None
    colour = shade(albedo, normals, points, cameras, names, shading_cfg)

    weights = composite_weights(density, delta)  # rays that miss the cube have delta 0, so w = 0
    opacity = weights.sum(-1, keepdim=True)
    rgb = (weights[..., None] * colour).sum(-2) + (1.0 - opacity) * background(directions)
    zeros_n = torch.zeros(len(cameras), device=t.device, dtype=t.dtype)
    return RenderOutput(
        rgb=rgb,
        opacity=opacity,
        depth=(weights * t).sum(-1, keepdim=True),
        normal=(weights[..., None] * normals).sum(-2) if normals is not None else torch.zeros_like(rgb),
        orientation=orientation_penalty(weights, normals, directions, opacity) if normals is not None else zeros_n,
        z_variance=distance_variance(weights, t, opacity),
    )
