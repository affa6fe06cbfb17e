"""Volume rendering of a ``Field`` over a learned ``Background``, with point-light shading.

Every ray of every camera is cut by the field's cube and sampled at ``n_samples`` stratified
distances; the samples are composited with the usual quadrature
    alpha_i = 1 - exp(-sigma_i delta_i),  T_i = prod_{j<i} (1 - alpha_j),  w_i = T_i alpha_i.

Two ways to get there, with the same samples and the same ``RenderOutput``:

- the dense reference (``occupancy=None``, both thresholds 0, grad enabled): the field is
  evaluated at all N·H·W·S samples in one batch, laid out [N, H, W, S];
- the packed path (any other call): a selection pass without grad drops samples in empty cells of
  an ``OccupancyGrid``, samples whose alpha is at most ``alpha_threshold``, and samples whose
  transmittance in front is at most ``transmittance_threshold`` (early ray termination); only
  the M kept samples are evaluated, as a packed [M, 3] batch, and composited ray by ray from
  segment-wise prefix sums. Without grad (evaluation views, validation and export renders, the
  pre-render of batched guidance) rays go in groups of about ``chunk_samples`` candidate samples,
  so peak memory does not grow with the image size (only the [R, S] sample offsets are held in
  full); with grad, the field calls go in pieces of ``chunk_samples`` points, so memory is what the
  graph saves plus the working set of one call.

Error of the skipping, per ray (``tests/test_occupancy.py`` checks it): let D be the dropped
samples and E = sum_{i in D} w_i their weight in the dense render. Each sample dropped by the
alpha test has w_i <= alpha_i <= alpha_threshold, and the samples dropped by early termination
together weigh at most transmittance_threshold. The kept samples' weights only grow (less in
front of them) and by telescoping sum_K (w'_i - w_i) = T_end - T'_end + E <= E, so with colours
and background in [0, 1]
    |rgb - rgb_dense| <= 2E,  |opacity - opacity_dense| <= E,  |depth - depth_dense| <= 2E·far,
    E <= sum_{i in D, alpha_i <= alpha_threshold} T_i alpha_i + transmittance_threshold.
A grid whose estimates bound the field's density from above (see ``mvsdi.occupancy``) skips only
samples that the alpha test would have dropped, so the bound holds with it too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mvsdi.cameras import Cameras, rays
from mvsdi.field import Background, Field
from mvsdi.knobs import knob
from mvsdi.occupancy import OccupancyGrid, density_function

SHADINGS = ("albedo", "diffuse", "textureless")
# Points per field call of the packed path (``chunk_samples=0``: by device). The paper's field holds
# a few kB per point while it runs (explicit normals ~5 kB), so 2^14 points keep a call's working
# set near 100 MB on a CPU (benchmarks/render_speed.py); on a GPU a call costs ~100 kernel launches,
# so larger calls pay there.
CHUNK_SAMPLES_BY_DEVICE = {"cpu": 2 ** 14, "cuda": 2 ** 18}


@dataclass(frozen=True)
class RenderConfig:
    """How a run's renders sample rays (``RunConfig.render``).

    The defaults are the reference's (nerfacc's estimator in threestudio): a 32³ occupancy grid,
    refreshed every 16 guidance evaluations with an EMA decay of 0.95, samples kept where
    alpha > 0.01 and the transmittance in front is above 1e-4. ``DENSE`` renders every sample.
    """

    occupancy_grid: bool = knob(True, "skip samples in empty cells of an occupancy grid")
    grid_resolution: int = knob(32, "cells a side of the occupancy grid")
    grid_refresh_every: int = knob(16, "guidance evaluations between refreshes of the grid (a function of the "
                                       "budget spent)")
    grid_decay: float = knob(0.95, "EMA decay of the grid's density estimates, per refresh")
    alpha_threshold: float = knob(0.01, "samples whose alpha is at most this are skipped")
    transmittance_threshold: float = knob(1e-4, "early ray termination: samples whose transmittance in front is "
                                                "at most this are skipped")
    chunk_samples: int = knob(0, "points per field call; 0: by device (CHUNK_SAMPLES_BY_DEVICE)")

    def __post_init__(self) -> None:
        if self.grid_resolution < 1 or self.grid_refresh_every < 1 or self.chunk_samples < 0:
            raise ValueError("render: grid_resolution and grid_refresh_every must be >= 1 and chunk_samples >= 0, got "
                             f"{self.grid_resolution}, {self.grid_refresh_every}, {self.chunk_samples}")
        if not 0.0 <= self.grid_decay <= 1.0:
            raise ValueError(f"render: grid_decay must be in [0, 1], got {self.grid_decay}")
        if not (0.0 <= self.alpha_threshold < 1.0 and 0.0 <= self.transmittance_threshold < 1.0):
            raise ValueError("render: alpha_threshold and transmittance_threshold must be in [0, 1), got "
                             f"{self.alpha_threshold}, {self.transmittance_threshold}")


DENSE = RenderConfig(occupancy_grid=False, alpha_threshold=0.0, transmittance_threshold=0.0)


@dataclass
class ShadingConfig:
    """Light colours of threestudio's diffuse-with-point-light material (grey light)."""

    ambient: float = 0.1
    diffuse: float = 0.9


DEFAULT_SHADING = ShadingConfig()  # render's default shading


@dataclass
class RenderOutput:
    rgb: Tensor  # [N, H, W, 3] composited over the background, in [0, 1]
    opacity: Tensor  # [N, H, W, 1] accumulated weight
    depth: Tensor  # [N, H, W, 1] weights-sum of sample distance (0 where empty)
    normal: Tensor  # [N, H, W, 3] weights-sum of world normals (not normalised)
    orientation: Tensor  # [N] orientation penalty (normals facing away from the camera)
    z_variance: Tensor  # [N] mean over opaque rays of the per-ray variance of sample distance
    # "samples_per_ray": field evaluations per ray (all rays of the render, those that miss the
    # cube included); "density_samples_per_ray": evaluations of the selection pass (packed path)
    stats: dict[str, float] = dataclasses.field(default_factory=dict)


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


def sample_offsets(shape: tuple[int, ...], n_samples: int, perturb: bool, generator: torch.Generator | None,
                   device: torch.device, dtype: torch.dtype) -> Tensor:
    """Where each sample sits inside its bin, in [0, 1): [*shape, S], uniform with ``perturb``, else 0.5.

    The one random draw of a render: both render paths make it identically, so they consume the
    generator alike and place their samples at the same distances.
    """
    if perturb:
        return torch.rand((*shape, n_samples), generator=generator, device=device, dtype=dtype)
    return torch.full((), 0.5, device=device, dtype=dtype).expand(*shape, n_samples)  # no [R, S] memory


def sample_distances(near: Tensor, far: Tensor, n_samples: int, perturb: bool,
                     generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Stratified distances [..., S] between near and far and the bin width [..., 1] of each ray.

    Each sample stands for its whole bin, so delta is the bin width; with ``perturb`` the sample
    is uniform inside its bin, which keeps the quadrature of the density integral unbiased.
    """
    u = sample_offsets(near.shape, n_samples, perturb, generator, near.device, near.dtype)
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
           n_samples: int = 64, shading: str | Sequence[str] = "albedo",
           shading_cfg: ShadingConfig = DEFAULT_SHADING,
           perturb: bool = False, generator: torch.Generator | None = None, need_normals: bool = True,
           occupancy: OccupancyGrid | None = None, alpha_threshold: float = 0.0, transmittance_threshold: float = 0.0,
           chunk_samples: int | None = 0) -> RenderOutput:
    """Render N cameras at height x width; ``shading`` is one mode for all images or one per camera.

    Normals are computed when the shading needs them or ``need_normals`` is set; otherwise the
    normal map and the orientation penalty are zeros. With ``occupancy`` or a threshold > 0 only
    the samples that pass them are evaluated (see the module docstring for the error this makes);
    the field is called on at most ``chunk_samples`` points at a time (0: by device, see
    ``CHUNK_SAMPLES_BY_DEVICE``; None: no chunks).
    Points reach the field in its parameters' dtype (float64 fields render in float64).
    """
    names = _shading_list(shading, len(cameras))
    origins, directions = rays(cameras, height, width)  # [N, H, W, 3]
    dtype = next((p.dtype for p in field.parameters()), origins.dtype)
    origins, directions = origins.to(dtype), directions.to(dtype)
    normals_needed = need_normals or any(n != "albedo" for n in names)
    if chunk_samples == 0:
        chunk_samples = CHUNK_SAMPLES_BY_DEVICE.get(origins.device.type, CHUNK_SAMPLES_BY_DEVICE["cuda"])
    skipping = occupancy is not None or alpha_threshold > 0 or transmittance_threshold > 0
    if not skipping and (torch.is_grad_enabled() or chunk_samples is None):
        return _render_dense(field, background, cameras, origins, directions, names, n_samples, shading_cfg,
                             perturb, generator, normals_needed)
    rays_ = _Rays.of(cameras, origins, directions, field.cfg.bound, names, n_samples, perturb, generator)
    selection = _Selection(occupancy, alpha_threshold, transmittance_threshold)
    per_ray, counts = _march(field, background, rays_, selection, normals_needed, shading_cfg, chunk_samples)
    return _images(per_ray, counts, len(cameras), height, width, normals_needed)


def _render_dense(field: Field, background: Background, cameras: Cameras, origins: Tensor, directions: Tensor,
                  names: list[str], n_samples: int, shading_cfg: ShadingConfig, perturb: bool,
                  generator: torch.Generator | None, normals_needed: bool) -> RenderOutput:
    """The reference: every sample of every ray in one [N, H, W, S] batch."""
    near, far, _ = ray_box(origins, directions, field.cfg.bound)
    t, delta = sample_distances(near, far, n_samples, perturb, generator)  # [N, H, W, S], [N, H, W, 1]
    points = origins[..., None, :] + t[..., None] * directions[..., None, :]  # [N, H, W, S, 3]

    if normals_needed:
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
        stats={"samples_per_ray": float(n_samples), "density_samples_per_ray": 0.0},
    )


# ------------------------------------------------------------------------------------------------
# the packed path: select samples without grad, evaluate and composite only those

_ALBEDO, _DIFFUSE, _TEXTURELESS = range(3)  # shading codes, in the order of SHADINGS


@dataclass
class _Rays:
    """R = N·H·W rays, flattened, with what each needs to place, shade and composite its samples."""

    origins: Tensor  # [R, 3]
    directions: Tensor  # [R, 3]
    near: Tensor  # [R]
    width: Tensor  # [R] bin width (0 for rays that miss the cube)
    offsets: Tensor  # [R, S] sample position inside its bin (``sample_offsets``)
    hit: Tensor  # [R] bool
    light: Tensor  # [R, 3]
    mode: Tensor  # [R] shading code

    @classmethod
    def of(cls, cameras: Cameras, origins: Tensor, directions: Tensor, bound: float, names: list[str],
           n_samples: int, perturb: bool, generator: torch.Generator | None) -> "_Rays":
        near, far, hit = ray_box(origins, directions, bound)
        u = sample_offsets(near.shape, n_samples, perturb, generator, near.device, near.dtype)
        per_image = origins.shape[1] * origins.shape[2]
        codes = torch.tensor([SHADINGS.index(n) for n in names], device=near.device)
        return cls(origins.reshape(-1, 3), directions.reshape(-1, 3), near.reshape(-1),
                   ((far - near) / n_samples).reshape(-1), u.reshape(-1, n_samples), hit.reshape(-1),
                   cameras.light_position.to(origins).repeat_interleave(per_image, 0),
                   codes.repeat_interleave(per_image))

    def __len__(self) -> int:
        return self.near.shape[0]

    @property
    def n_samples(self) -> int:
        return self.offsets.shape[1]

    def chunk(self, start: int, stop: int) -> "_Rays":
        return _Rays(*(getattr(self, f.name)[start:stop] for f in dataclasses.fields(self)))

    def distances(self, ray: Tensor, sample: Tensor) -> Tensor:
        """t of the given (ray, sample) pairs; the same expression as ``sample_distances``, so the
        same bits as the dense reference."""
        return self.near[ray] + (sample.to(self.near.dtype) + self.offsets[ray, sample]) * self.width[ray]

    def all_distances(self) -> Tensor:
        bins = torch.arange(self.n_samples, device=self.near.device, dtype=self.near.dtype)
        return self.near[:, None] + (bins + self.offsets) * self.width[:, None]

    def points(self, ray: Tensor, t: Tensor) -> Tensor:
        return self.origins[ray] + t[..., None] * self.directions[ray]


@dataclass(frozen=True)
class _Selection:
    """Which samples the packed path may skip (a zero threshold disables its test)."""

    occupancy: OccupancyGrid | None
    alpha_threshold: float
    transmittance_threshold: float

    @property
    def needs_density(self) -> bool:
        return self.alpha_threshold > 0 or self.transmittance_threshold > 0


def _candidates(rays_: _Rays, occupancy: OccupancyGrid | None, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """(ray, sample) pairs, ray-major, of the samples of rays [start, stop) that meet the cube and,
    with a grid, lie in occupied cells. No field call: only [stop - start, S] masks."""
    piece = rays_.chunk(start, stop)
    keep = piece.hit[:, None].expand(-1, rays_.n_samples)
    if occupancy is not None:
        t = piece.all_distances()
        keep = keep & occupancy.occupied(piece.origins[:, None] + t[..., None] * piece.directions[:, None])
    ray, sample = keep.nonzero(as_tuple=True)
    return ray + start, sample


def _groups(rays_: _Rays, occupancy: OccupancyGrid | None, chunk_samples: int | None) -> list[tuple[int, int]]:
    """Consecutive ray ranges holding about ``chunk_samples`` candidate samples each (at least one ray).

    Grouping by candidates rather than by rays keeps the field calls few and full (a call has a
    fixed cost) however empty the image is, and their size bounded however full.
    """
    n = len(rays_)
    if chunk_samples is None:
        return [(0, n)]
    step = max(1, chunk_samples // rays_.n_samples)
    if occupancy is None:
        counts = rays_.hit.long() * rays_.n_samples
    else:
        counts = torch.cat([torch.bincount(_candidates(rays_, occupancy, a, min(a + step, n))[0] - a,
                                           minlength=min(a + step, n) - a) for a in range(0, n, step)])
    group = (torch.cumsum(counts, 0) - counts) // chunk_samples  # nondecreasing group id per ray
    sizes = torch.unique_consecutive(group, return_counts=True)[1].tolist()
    ends = torch.tensor(sizes).cumsum(0).tolist()
    return list(zip([0] + ends[:-1], ends))


def exclusive_segment_sum(values: Tensor, ray: Tensor, n_rays: int) -> Tensor:
    """For packed values [M] sorted by ray: the sum of the earlier values of the same ray.

    A prefix sum over the whole pack minus that at the ray's first entry. The running total over
    many rays is large and is subtracted back out, so it is taken in float64, or float32 would
    lose the per-ray digits.
    """
    wide = values.double()
    before_all = torch.cumsum(wide, 0) - wide
    counts = torch.bincount(ray, minlength=n_rays)
    first = torch.cumsum(counts, 0) - counts  # index of each ray's first entry
    return (before_all - before_all[first[ray]]).to(values.dtype)


@torch.no_grad()
def _select_group(field: Field, rays_: _Rays, start: int, stop: int, selection: _Selection,
                  chunk_samples: int | None) -> tuple[Tensor, Tensor, int]:
    """The (ray, sample) pairs of rays [start, stop) worth evaluating, and the field evaluations
    the selection spent (its density pass over the candidates, in one call)."""
    step = len(rays_) if chunk_samples is None else max(1, chunk_samples // rays_.n_samples)
    pairs = [_candidates(rays_, selection.occupancy, a, min(a + step, stop)) for a in range(start, stop, step)]
    ray, sample = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    if not selection.needs_density or ray.numel() == 0:  # (a field need not accept an empty batch)
        return ray, sample, 0
    points = rays_.points(ray, rays_.distances(ray, sample))  # about chunk_samples: the group's size
    density = density_function(field)(points)
    tau = density.to(rays_.near.dtype) * rays_.width[ray]
    keep = torch.ones_like(ray, dtype=torch.bool)
    if selection.alpha_threshold > 0:  # a dropped sample still attenuates the ones behind it
        keep &= -torch.expm1(-tau) > selection.alpha_threshold
    if selection.transmittance_threshold > 0:
        keep &= torch.exp(-exclusive_segment_sum(tau, ray - start, stop - start)) > selection.transmittance_threshold
    return ray[keep], sample[keep], ray.numel()


def select_samples(field: Field, rays_: _Rays, selection: _Selection,
                   chunk_samples: int | None = CHUNK_SAMPLES_BY_DEVICE["cpu"]) -> tuple[Tensor, Tensor, int]:
    """The (ray, sample) index pairs [M], [M] that are worth evaluating, in ray-major order, and the
    number of field evaluations spent deciding (the density pass over samples in occupied cells).

    A zero threshold turns its test off: with no grid and both thresholds 0 every sample of every
    ray that meets the cube is kept, which is the dense render exactly (the others weigh 0).
    """
    parts = [_select_group(field, rays_, a, b, selection, chunk_samples)
             for a, b in _groups(rays_, selection.occupancy, chunk_samples)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), sum(p[2] for p in parts)


def segment_weights(density: Tensor, delta: Tensor, ray: Tensor, n_rays: int) -> Tensor:
    """``composite_weights`` of packed samples [M] (sorted by ray, in order along each ray)."""
    tau = density * delta
    return torch.exp(-exclusive_segment_sum(tau, ray, n_rays)) * -torch.expm1(-tau)


def shade_samples(albedo: Tensor, normals: Tensor | None, points: Tensor, light: Tensor, mode: Tensor,
                  cfg: ShadingConfig) -> Tensor:
    """``shade`` for packed samples [M, ...], each with its light [M, 3] and shading code [M]."""
    if normals is None or bool((mode == _ALBEDO).all()):
        return albedo
    lambert = (normals * F.normalize(light - points, dim=-1)).sum(-1, keepdim=True).clamp_min(0.0)
    base = torch.where((mode == _TEXTURELESS)[:, None], torch.ones_like(albedo), albedo)
    lit = (base * (cfg.ambient + cfg.diffuse * lambert)).clamp(0.0, 1.0)
    return torch.where((mode == _ALBEDO)[:, None], albedo, lit)


def _per_ray_sum(values: Tensor, ray: Tensor, n_rays: int) -> Tensor:
    """Sum of packed [M, ...] values over each ray's samples: [R, ...]."""
    return values.new_zeros((n_rays, *values.shape[1:])).index_add(0, ray, values)


def _evaluate(field: Field, points: Tensor, normals_needed: bool,
              chunk_samples: int | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(density, albedo, normals or None) at packed points [M, 3], at most ``chunk_samples`` per
    field call: the field's working set while it runs (a few kB a point) stays that of one call,
    forward and backward, while the graph keeps only what each call saves."""
    if points.shape[0] == 0:  # nothing to evaluate: the field is not called (it would add nothing)
        zeros = points.new_zeros(0, 3)
        return points.new_zeros(0), zeros, zeros if normals_needed else None
    pieces = [points] if chunk_samples is None else points.split(chunk_samples)
    outs = [field.with_normals(p) if normals_needed else (*field(p), None) for p in pieces]
    if len(outs) == 1:
        return outs[0]
    return tuple(torch.cat(parts) if parts[0] is not None else None for parts in zip(*outs))


def _composite(field: Field, background: Background, rays_: _Rays, ray: Tensor, sample: Tensor,
               normals_needed: bool, shading_cfg: ShadingConfig, chunk_samples: int | None) -> dict[str, Tensor]:
    """Per-ray maps of the kept samples: rgb [r, 3], opacity [r], depth [r], normal [r, 3], the
    orientation sum sg(w) relu(n.d)^2 [r] and the distance variance [r]."""
    n_rays, t = len(rays_), rays_.distances(ray, sample)
    points = rays_.points(ray, t)
    density, albedo, normals = _evaluate(field, points, normals_needed, chunk_samples)
    colour = shade_samples(albedo, normals, points, rays_.light[ray], rays_.mode[ray], shading_cfg)
    w = segment_weights(density, rays_.width[ray], ray, n_rays)
    opacity = _per_ray_sum(w, ray, n_rays)
    p = w / opacity.clamp_min(1e-6)[ray]  # normalised weights, as ``distance_variance``
    mean = _per_ray_sum(p * t, ray, n_rays)
    out = {
        "rgb": _per_ray_sum(w[:, None] * colour, ray, n_rays) + (1.0 - opacity)[:, None] * background(rays_.directions),
        "opacity": opacity,
        "depth": _per_ray_sum(w * t, ray, n_rays),
        "variance": _per_ray_sum(p * (t - mean[ray]).square(), ray, n_rays),
    }
    if normals is not None:
        facing_away = (normals * rays_.directions[ray]).sum(-1).clamp_min(0.0).square()
        out["normal"] = _per_ray_sum(w[:, None] * normals, ray, n_rays)
        out["facing_away"] = _per_ray_sum(w.detach() * facing_away, ray, n_rays)
    return out


def _march(field: Field, background: Background, rays_: _Rays, selection: _Selection, normals_needed: bool,
           shading_cfg: ShadingConfig, chunk_samples: int | None) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Per-ray maps of all rays and the counts of field evaluations.

    Selection goes group by group, the same groups with and without grad, so both pick the same
    samples bit for bit. With grad the kept samples of all groups are then evaluated into one graph
    (in field calls of ``chunk_samples`` points); without grad each group is evaluated and
    composited on its own and freed.
    """
    counts = {"evaluated": 0, "density": 0, "rays": len(rays_)}
    kept, parts = [], []
    for a, b in _groups(rays_, selection.occupancy, chunk_samples):
        ray, sample, spent = _select_group(field, rays_, a, b, selection, chunk_samples)
        counts["evaluated"] += ray.numel()
        counts["density"] += spent
        if torch.is_grad_enabled():
            kept.append((ray, sample))
        else:
            parts.append(_composite(field, background, rays_.chunk(a, b), ray - a, sample, normals_needed,
                                    shading_cfg, chunk_samples))
    if kept:
        ray, sample = torch.cat([k[0] for k in kept]), torch.cat([k[1] for k in kept])
        return _composite(field, background, rays_, ray, sample, normals_needed, shading_cfg, chunk_samples), counts
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, counts


def _images(per_ray: dict[str, Tensor], counts: dict[str, int], n: int, height: int, width: int,
            normals_needed: bool) -> RenderOutput:
    """Per-ray maps reshaped to images, and the per-image penalties (as the dense reference)."""
    image = lambda x, c: x.reshape(n, height, width, c)  # noqa: E731
    opacity = per_ray["opacity"].reshape(n, -1)
    opaque = (opacity > 0.5).to(opacity)
    z_variance = (per_ray["variance"].reshape(n, -1) * opaque).sum(1) / opaque.sum(1).clamp_min(1.0)
    if normals_needed:
        rays_with_content = (opacity > 0).sum(1).clamp_min(1)
        orientation, normal = per_ray["facing_away"].reshape(n, -1).sum(1) / rays_with_content, per_ray["normal"]
    else:
        orientation, normal = opacity.new_zeros(n), torch.zeros_like(per_ray["rgb"])
    n_rays = max(counts["rays"], 1)
    return RenderOutput(
        rgb=image(per_ray["rgb"], 3), opacity=image(opacity, 1), depth=image(per_ray["depth"], 1),
        normal=image(normal, 3), orientation=orientation, z_variance=z_variance,
        stats={"samples_per_ray": counts["evaluated"] / n_rays, "density_samples_per_ray": counts["density"] / n_rays},
    )
