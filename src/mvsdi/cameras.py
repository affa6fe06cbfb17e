"""Cameras on a sphere around the object, the view samplers of MV-SDI, and ray generation.

Conventions (shared by the field, the renderer and the priors):
- world is z-up; the object sits at the origin inside a ball of radius ``bound``;
- a camera at azimuth φ, elevation ε and distance d sits at d·(cos ε cos φ, cos ε sin φ, sin ε)
  and looks at the origin; azimuth 0 is the object's front (+x);
- camera-to-world matrices follow OpenGL: the camera looks down its own −z, +y is up.

Every sampler is a pure function of a ``torch.Generator``: the same seed gives the same views.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch

Range = tuple[float, float]


@dataclass(frozen=True)
class CameraRanges:
    """Where training cameras and point lights are drawn from (SDI configuration)."""

    distance: Range = (1.5, 2.0)
    fovy_deg: Range = (40.0, 70.0)
    elevation_deg: Range = (-10.0, 45.0)
    azimuth_deg: Range = (-180.0, 180.0)
    light_distance: Range = (0.8, 1.5)
    light_perturb: float = 1.0

    def __post_init__(self) -> None:
        for name in ("distance", "fovy_deg", "elevation_deg", "azimuth_deg", "light_distance"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"camera range {name}={lo, hi}: the lower end must not exceed the upper")
        if not (-90.0 < self.elevation_deg[0] and self.elevation_deg[1] < 90.0):
            raise ValueError("elevation range must lie strictly inside (-90°, 90°): the camera 'up' is +z")
        if self.distance[0] <= 0 or not 0 < self.fovy_deg[0] <= self.fovy_deg[1] < 180:
            raise ValueError("camera distance must be positive and fovy inside (0°, 180°)")


@dataclass(frozen=True)
class Cameras:
    """A batch of N cameras (all tensors have leading dimension N, float32)."""

    azimuth_deg: torch.Tensor
    elevation_deg: torch.Tensor
    distance: torch.Tensor
    fovy_deg: torch.Tensor
    light_position: torch.Tensor  # [N, 3], world coordinates of the point light

    def __len__(self) -> int:
        return self.azimuth_deg.shape[0]

    def __getitem__(self, index: int | slice) -> "Cameras":
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Cameras(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to(self, device: torch.device | str) -> "Cameras":
        return Cameras(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @staticmethod
    def cat(parts: list["Cameras"]) -> "Cameras":
        return Cameras(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Cameras)})

    @property
    def position(self) -> torch.Tensor:
        return spherical_to_cartesian(self.azimuth_deg, self.elevation_deg, self.distance)

    def camera_to_world(self) -> torch.Tensor:
        """[N, 4, 4] OpenGL camera-to-world matrices looking at the origin with +z up."""
        eye = self.position
        forward = torch.nn.functional.normalize(-eye, dim=-1)
        world_up = torch.tensor([0.0, 0.0, 1.0], dtype=eye.dtype, device=eye.device).expand_as(eye)
        right = torch.nn.functional.normalize(torch.cross(forward, world_up, dim=-1), dim=-1)
        up = torch.cross(right, forward, dim=-1)
        c2w = torch.zeros(len(self), 4, 4, dtype=eye.dtype, device=eye.device)
        c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, up, -forward, eye
        c2w[:, 3, 3] = 1.0
        return c2w


def spherical_to_cartesian(azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    az, el = torch.deg2rad(azimuth_deg), torch.deg2rad(elevation_deg)
    return torch.stack([torch.cos(el) * torch.cos(az), torch.cos(el) * torch.sin(az), torch.sin(el)], -1) * radius[..., None]


def wrap_azimuth(azimuth_deg: torch.Tensor) -> torch.Tensor:
    """Map any azimuth to [-180°, 180°)."""
    return torch.remainder(azimuth_deg + 180.0, 360.0) - 180.0


def rays(cameras: Cameras, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray origins and unit directions through pixel centres, each [N, H, W, 3], row 0 at the top."""
    device = cameras.azimuth_deg.device
    focal = 0.5 * height / torch.tan(0.5 * torch.deg2rad(cameras.fovy_deg))  # [N], in pixels
    j = torch.arange(width, device=device, dtype=torch.float32) + 0.5 - 0.5 * width
    i = torch.arange(height, device=device, dtype=torch.float32) + 0.5 - 0.5 * height
    ii, jj = torch.meshgrid(i, j, indexing="ij")
    f = focal[:, None, None]
    local = torch.stack([jj.expand(len(cameras), -1, -1) / f, -ii.expand(len(cameras), -1, -1) / f,
                         -torch.ones(len(cameras), height, width, device=device)], -1)
    c2w = cameras.camera_to_world()
    directions = torch.nn.functional.normalize(torch.einsum("nij,nhwj->nhwi", c2w[:, :3, :3], local), dim=-1)
    origins = c2w[:, None, None, :3, 3].expand_as(directions)
    return origins, directions


# ----------------------------------------------------------------------------------------------
# view samplers


def _uniform(n: int, bounds: Range, generator: torch.Generator) -> torch.Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def _lights(eye: torch.Tensor, ranges: CameraRanges, generator: torch.Generator) -> torch.Tensor:
    """Point light near the camera's side: its direction is the camera's plus Gaussian jitter."""
    jitter = torch.randn(eye.shape, generator=generator) * ranges.light_perturb
    direction = torch.nn.functional.normalize(eye + jitter, dim=-1)
    return direction * _uniform(eye.shape[0], ranges.light_distance, generator)[:, None]


def make_cameras(azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor, distance: torch.Tensor,
                 fovy_deg: torch.Tensor, ranges: CameraRanges, generator: torch.Generator) -> Cameras:
    azimuth_deg = wrap_azimuth(azimuth_deg.float())
    eye = spherical_to_cartesian(azimuth_deg, elevation_deg.float(), distance.float())
    return Cameras(azimuth_deg, elevation_deg.float(), distance.float(), fovy_deg.float(),
                   _lights(eye, ranges, generator))


def _independent(n: int, ranges: CameraRanges, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """n i.i.d. (azimuth, elevation, distance, fovy) draws."""
    return (_uniform(n, ranges.azimuth_deg, g), _uniform(n, ranges.elevation_deg, g),
            _uniform(n, ranges.distance, g), _uniform(n, ranges.fovy_deg, g))


def _pairs(k: int, ranges: CameraRanges, g: torch.Generator, flip_elevation: bool) -> Cameras:
    """k/2 antithetic pairs: the second view of a pair is the first turned by 180° in azimuth.

    Both views of a pair share distance and fovy. With ``flip_elevation`` the second view also
    mirrors the elevation (ε → −ε); ε is then drawn where both ε and −ε are in the range.
    """
    n = k // 2
    azimuth, elevation, distance, fovy = _independent(n, ranges, g)
    if flip_elevation:
        lo, hi = ranges.elevation_deg
        bound = min(abs(lo), abs(hi)) if lo <= 0 <= hi else None
        if bound is None:
            raise ValueError(f"sampler 'random_axis' needs an elevation range that contains 0, got {ranges.elevation_deg}")
        elevation = _uniform(n, (-bound, bound), g)
    second_elevation = -elevation if flip_elevation else elevation
    # interleave so views 2i and 2i+1 form a pair
    inter = lambda a, b: torch.stack([a, b], 1).reshape(-1)  # noqa: E731
    return make_cameras(inter(azimuth, azimuth + 180.0), inter(elevation, second_elevation),
                        inter(distance, distance), inter(fovy, fovy), ranges, g)


def sample_random(k: int, ranges: CameraRanges, g: torch.Generator) -> Cameras:
    return make_cameras(*_independent(k, ranges, g), ranges, g)


def sample_antipodal(k: int, ranges: CameraRanges, g: torch.Generator) -> Cameras:
    return _pairs(k, ranges, g, flip_elevation=False)


def sample_random_axis(k: int, ranges: CameraRanges, g: torch.Generator) -> Cameras:
    return _pairs(k, ranges, g, flip_elevation=True)


def sample_stratified(k: int, ranges: CameraRanges, g: torch.Generator) -> Cameras:
    """One shared offset u: azimuth_k = lo + (hi − lo)(u + k)/K, so each of K strata gets one view."""
    lo, hi = ranges.azimuth_deg
    u = torch.rand(1, generator=g)
    azimuth = lo + (hi - lo) * (u + torch.arange(k)) / k
    _, elevation, distance, fovy = _independent(k, ranges, g)
    return make_cameras(azimuth, elevation, distance, fovy, ranges, g)


def sample_mixed(k: int, ranges: CameraRanges, g: torch.Generator) -> Cameras:
    """K=4: an antipodal azimuth pair (φ, φ+180°) plus the elevation extremes at azimuth φ+90°."""
    azimuth, elevation, distance, fovy = _independent(1, ranges, g)
    lo, hi = ranges.elevation_deg
    return make_cameras(azimuth + torch.tensor([0.0, 180.0, 90.0, 90.0]),
                        torch.cat([elevation, elevation, torch.tensor([hi, lo])]),
                        distance.expand(4), fovy.expand(4), ranges, g)


def sample_octahedral(k: int, ranges: CameraRanges, g: torch.Generator) -> Cameras:
    """K=6: φ, φ+90°, φ+180°, φ+270° at elevation 0 (clamped into the range), plus top and bottom.

    "Top" and "bottom" are the extremes of the elevation range: a camera straight above the object
    has no defined azimuth and the SDI range never goes beyond 45°.
    """
    azimuth, _, distance, fovy = _independent(1, ranges, g)
    lo, hi = ranges.elevation_deg
    ring = min(max(0.0, lo), hi)
    return make_cameras(azimuth + torch.tensor([0.0, 90.0, 180.0, 270.0, 0.0, 0.0]),
                        torch.tensor([ring] * 4 + [hi, lo]), distance.expand(6), fovy.expand(6), ranges, g)


@dataclass(frozen=True)
class Sampler:
    draw: Callable[[int, CameraRanges, torch.Generator], Cameras]
    valid: Callable[[int], bool]
    rule: str  # what K it accepts, for error messages


SAMPLERS: dict[str, Sampler] = {
    "random": Sampler(sample_random, lambda k: k >= 1, "any K >= 1"),
    "antipodal": Sampler(sample_antipodal, lambda k: k >= 2 and k % 2 == 0, "an even K >= 2"),
    "stratified": Sampler(sample_stratified, lambda k: k >= 1, "any K >= 1"),
    "mixed": Sampler(sample_mixed, lambda k: k == 4, "K = 4"),
    "octahedral": Sampler(sample_octahedral, lambda k: k == 6, "K = 6"),
    "random_axis": Sampler(sample_random_axis, lambda k: k >= 2 and k % 2 == 0, "an even K >= 2"),
}


def check_sampler(name: str, k: int) -> Sampler:
    """The sampler called ``name``, or a ValueError that says which K it accepts."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown view sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"the number of views per step must be an integer >= 1, got {k!r}")
    sampler = SAMPLERS[name]
    if not sampler.valid(k):
        raise ValueError(f"view sampler {name!r} cannot make K={k} views: it needs {sampler.rule}")
    return sampler


def sample_views(name: str, k: int, generator: torch.Generator, ranges: CameraRanges = CameraRanges()) -> Cameras:
    """K training cameras from the sampler ``name``; a pure function of the generator's state."""
    return check_sampler(name, k).draw(k, ranges, generator)


def evaluation_cameras(n: int = 50, elevation_deg: float = 15.0, distance: float = 2.0, fovy_deg: float = 70.0) -> Cameras:
    """n views at evenly spaced azimuths starting from the front, light at the camera."""
    azimuth = wrap_azimuth(torch.arange(n, dtype=torch.float32) * (360.0 / n))
    elevation = torch.full((n,), float(elevation_deg))
    dist = torch.full((n,), float(distance))
    eye = spherical_to_cartesian(azimuth, elevation, dist)
    return Cameras(azimuth, elevation, dist, torch.full((n,), float(fovy_deg)), eye.clone())


def view_direction(azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor,
                   front_half_width_deg: float = 45.0, overhead_deg: float = 60.0) -> list[str]:
    """The view word of each camera for view-dependent prompts: front / side / back / overhead."""
    words = []
    for az, el in zip(wrap_azimuth(azimuth_deg).tolist(), elevation_deg.tolist()):
        if el > overhead_deg:
            words.append("overhead")
        elif abs(az) < front_half_width_deg:
            words.append("front")
        elif abs(az) > 180.0 - front_half_width_deg:
            words.append("back")
        else:
            words.append("side")
    return words

