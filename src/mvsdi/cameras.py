"""Cameras on a sphere around the object, the view samplers of MV-SDI, and ray generation.

Conventions (shared by the field, the renderer and the priors):
- world is z-up; the object sits at the origin inside a ball of radius ``bound``;
- a camera at azimuth φ, elevation ε and distance d sits at d·(cos ε cos φ, cos ε sin φ, sin ε)
  and looks at the origin; azimuth 0 is the object's front (+x);
- camera-to-world matrices follow OpenGL: the camera looks down its own −z, +y is up.

Every sampler is a pure function of a ``torch.Generator``: the same seed gives the same views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Callable

import torch

from mvsdi.knobs import knob

Range = tuple[float, float]


@dataclass(frozen=True)
class CameraRanges:
    """Where training cameras and point lights are drawn from (SDI configuration)."""

    distance: Range = knob((1.5, 2.0), "camera distance from the origin (LO HI)")
    fovy_deg: Range = knob((40.0, 70.0), "vertical field of view in degrees (LO HI)")
    elevation_deg: Range = knob((-10.0, 45.0), "training camera elevations in degrees (LO HI)",
                                flags=("--elevation-range",), metavar=("LO", "HI"))
    azimuth_deg: Range = knob((-180.0, 180.0), "training camera azimuths in degrees (LO HI)")
    light_distance: Range = knob((0.8, 1.5), "point light distance (LO HI)")
    light_perturb: float = knob(1.0, "point light position jitter")
    # threestudio's random-camera jitter, with its default values (the MV-SDI configs keep them):
    camera_perturb: float = knob(0.1, "each view's position moves by U[-p, p]^3")
    center_perturb: float = knob(0.2, "each view looks at N(0, p²I) instead of the origin")
    up_perturb: float = knob(0.02, "each view's up vector is +z + N(0, p²I)")
    sphere_elevation_prob: float = knob(0.5, "per step, one coin: elevation uniform on the sphere with this "
                                             "probability, else uniform in degrees")

    def __post_init__(self) -> None:
        for name in ("distance", "fovy_deg", "elevation_deg", "azimuth_deg", "light_distance"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"camera range {name}={lo, hi}: the lower end must not exceed the upper")
        if not (-90.0 < self.elevation_deg[0] and self.elevation_deg[1] < 90.0):
            raise ValueError("elevation range must lie strictly inside (-90°, 90°): the camera 'up' is +z")
        if self.distance[0] <= 0 or not 0 < self.fovy_deg[0] <= self.fovy_deg[1] < 180:
            raise ValueError("camera distance must be positive and fovy inside (0°, 180°)")
        if min(self.camera_perturb, self.center_perturb, self.up_perturb, self.light_perturb) < 0:
            raise ValueError("camera, centre, up and light perturbations must be >= 0")
        if not 0.0 <= self.sphere_elevation_prob <= 1.0:
            raise ValueError(f"sphere_elevation_prob must lie in [0, 1], got {self.sphere_elevation_prob}")

    def unperturbed(self) -> "CameraRanges":
        """The same ranges without position, centre and up jitter (exact orbits, for tests and plots)."""
        return replace(self, camera_perturb=0.0, center_perturb=0.0, up_perturb=0.0)


@dataclass(frozen=True)
class Cameras:
    """A batch of N cameras (all tensors have leading dimension N, in the default dtype: float32).

    The nominal pose is the orbit point (azimuth, elevation, distance) looking at the origin with +z
    up; view-dependent prompts read it. ``eye_offset``, ``center`` and ``up`` carry the training
    jitter (zero, zero and +z when not given): the rendered camera sits at the orbit point plus
    ``eye_offset`` and looks at ``center``.
    """

    azimuth_deg: torch.Tensor
    elevation_deg: torch.Tensor
    distance: torch.Tensor
    fovy_deg: torch.Tensor
    light_position: torch.Tensor  # [N, 3], world coordinates of the point light
    eye_offset: torch.Tensor | None = None  # [N, 3]
    center: torch.Tensor | None = None  # [N, 3]
    up: torch.Tensor | None = None  # [N, 3], need not be unit

    def __post_init__(self) -> None:
        n, like = len(self.azimuth_deg), self.azimuth_deg
        zeros = lambda: torch.zeros(n, 3, dtype=like.dtype, device=like.device)  # noqa: E731
        for name, default in (("eye_offset", zeros), ("center", zeros),
                              ("up", lambda: torch.tensor([0.0, 0.0, 1.0], dtype=like.dtype,
                                                          device=like.device).expand(n, 3).clone())):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default())

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
        """[N, 3] where the camera really is: the orbit point plus its jitter."""
        return spherical_to_cartesian(self.azimuth_deg, self.elevation_deg, self.distance) + self.eye_offset

    def camera_to_world(self) -> torch.Tensor:
        """[N, 4, 4] OpenGL camera-to-world matrices looking at ``center`` with ``up`` as up."""
        eye = self.position
        forward = torch.nn.functional.normalize(self.center - eye, dim=-1)
        right = torch.nn.functional.normalize(torch.cross(forward, self.up.to(eye), dim=-1), dim=-1)
        up = torch.cross(right, forward, dim=-1)
        c2w = torch.zeros(len(self), 4, 4, dtype=eye.dtype, device=eye.device)
        c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, up, -forward, eye
        c2w[:, 3, 3] = 1.0
        return c2w


def spherical_to_cartesian(azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor,
                           radius: torch.Tensor) -> torch.Tensor:
    az, el = torch.deg2rad(azimuth_deg), torch.deg2rad(elevation_deg)
    unit = torch.stack([torch.cos(el) * torch.cos(az), torch.cos(el) * torch.sin(az), torch.sin(el)], -1)
    return unit * radius[..., None]


def wrap_azimuth(azimuth_deg: torch.Tensor) -> torch.Tensor:
    """Map any azimuth to [-180°, 180°)."""
    return torch.remainder(azimuth_deg + 180.0, 360.0) - 180.0


def rays(cameras: Cameras, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray origins and unit directions through pixel centres, each [N, H, W, 3], row 0 at the top."""
    device, dtype = cameras.azimuth_deg.device, cameras.azimuth_deg.dtype
    focal = 0.5 * height / torch.tan(0.5 * torch.deg2rad(cameras.fovy_deg))  # [N], in pixels
    j = torch.arange(width, device=device, dtype=dtype) + 0.5 - 0.5 * width
    i = torch.arange(height, device=device, dtype=dtype) + 0.5 - 0.5 * height
    ii, jj = torch.meshgrid(i, j, indexing="ij")
    f = focal[:, None, None]
    local = torch.stack([jj.expand(len(cameras), -1, -1) / f, -ii.expand(len(cameras), -1, -1) / f,
                         -torch.ones(len(cameras), height, width, device=device, dtype=dtype)], -1)
    c2w = cameras.camera_to_world()
    directions = torch.nn.functional.normalize(torch.einsum("nij,nhwj->nhwi", c2w[:, :3, :3], local), dim=-1)
    origins = c2w[:, None, None, :3, 3].expand_as(directions)
    return origins, directions


# ----------------------------------------------------------------------------------------------
# view samplers


def _uniform(n: int, bounds: Range, generator: torch.Generator) -> torch.Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def _elevations(n: int, ranges: CameraRanges, g: torch.Generator) -> torch.Tensor:
    """n elevations of one step: one coin picks uniform on the sphere (area-uniform between the two
    latitudes, by inverse transform of sin ε) or uniform in degrees (denser near the poles)."""
    on_sphere = float(torch.rand(1, generator=g)) < ranges.sphere_elevation_prob
    lo, hi = ranges.elevation_deg
    if not on_sphere:
        return _uniform(n, (lo, hi), g)
    s_lo, s_hi = math.sin(math.radians(lo)), math.sin(math.radians(hi))
    return torch.rad2deg(torch.asin(_uniform(n, (s_lo, s_hi), g)))


def _lights(eye: torch.Tensor, ranges: CameraRanges, generator: torch.Generator) -> torch.Tensor:
    """Point light near the camera's side: its direction is the camera's plus Gaussian jitter."""
    jitter = torch.randn(eye.shape, generator=generator) * ranges.light_perturb
    direction = torch.nn.functional.normalize(eye + jitter, dim=-1)
    return direction * _uniform(eye.shape[0], ranges.light_distance, generator)[:, None]


def make_cameras(azimuth_deg: torch.Tensor, elevation_deg: torch.Tensor, ranges: CameraRanges,
                 generator: torch.Generator) -> Cameras:
    """Cameras at the sampler's angles; distance, fovy, jitter and light drawn for every view.

    A view never shares these with its antipodal partner (as in the reference): shared draws made
    the two views of a pair near copies of one image under SDI's deterministic t.
    """
    n, g = len(azimuth_deg), generator
    # the default dtype (float32 unless a float64 reference computation asks for more)
    dtype = torch.get_default_dtype()
    azimuth_deg, elevation_deg = wrap_azimuth(azimuth_deg.to(dtype)), elevation_deg.to(dtype)
    distance, fovy_deg = _uniform(n, ranges.distance, g).to(dtype), _uniform(n, ranges.fovy_deg, g).to(dtype)
    eye_offset = (torch.rand(n, 3, generator=g) * 2.0 - 1.0) * ranges.camera_perturb
    center = torch.randn(n, 3, generator=g) * ranges.center_perturb
    up = torch.tensor([0.0, 0.0, 1.0]) + torch.randn(n, 3, generator=g) * ranges.up_perturb
    eye = spherical_to_cartesian(azimuth_deg, elevation_deg, distance) + eye_offset.to(dtype)
    return Cameras(azimuth_deg, elevation_deg, distance, fovy_deg, _lights(eye, ranges, g).to(dtype),
                   eye_offset.to(dtype), center.to(dtype), up.to(dtype))


# Each sampler gives the K views' (azimuth, elevation) in degrees; ``make_cameras`` does the rest.
Angles = tuple[torch.Tensor, torch.Tensor]


def angles_random(views: int, ranges: CameraRanges, g: torch.Generator) -> Angles:
    """K i.i.d. views."""
    elevation = _elevations(views, ranges, g)
    return _uniform(views, ranges.azimuth_deg, g), elevation


def angles_stratified(views: int, ranges: CameraRanges, g: torch.Generator) -> Angles:
    """Jittered strata: azimuth_k = lo + (hi − lo)(u_k + k)/K with its own u_k per view (the
    reference's "K=2 uniform" row). At K=2 the two views are NOT antipodal: each lies anywhere in
    its half of the circle."""
    elevation = _elevations(views, ranges, g)
    lo, hi = ranges.azimuth_deg
    return lo + (hi - lo) * (torch.rand(views, generator=g) + torch.arange(views)) / views, elevation


def angles_antipodal(views: int, ranges: CameraRanges, g: torch.Generator) -> Angles:
    """Views i and i + K/2 form a pair (φ_i, ε_i), (φ_i + 180°, ε_i); the K/2 pairs are independent.
    Odd K: the last view has its own azimuth and the first pair's elevation (as the reference)."""
    half = views // 2
    elevation = _elevations(views, ranges, g)[:half]
    base = _uniform(half, ranges.azimuth_deg, g)
    azimuth, elevation = torch.cat([base, base + 180.0]), elevation.repeat(2)
    if views % 2:
        azimuth = torch.cat([azimuth, _uniform(1, ranges.azimuth_deg, g)])
        elevation = torch.cat([elevation, elevation[:1]])
    return azimuth, elevation


def random_axis_elevations(ranges: CameraRanges) -> Range:
    """Where ε may lie so that both ε and −ε are in the range: [max(lo, −hi), min(hi, −lo)].

    When that is empty (a range on one side of the horizon, e.g. [5°, 45°]) the reference falls back
    to ±max(min(hi, −lo), 0), which is 0: both views then sit on the horizon, outside the range.
    We do the same, so that random_axis stays the reference's method on every range.
    """
    lo, hi = ranges.elevation_deg
    a, b = max(lo, -hi), min(hi, -lo)
    if b <= a:
        radius = max(min(hi, -lo), 0.0)
        a, b = -radius, radius
    return a, b


def angles_random_axis(views: int, ranges: CameraRanges, g: torch.Generator) -> Angles:
    """Pairs reflected through the origin: (φ, ε) and (φ + 180°, −ε), views i and i + K/2.
    Odd K: one extra i.i.d. view."""
    half = views // 2
    base = _uniform(half, ranges.azimuth_deg, g)
    axis = _uniform(half, random_axis_elevations(ranges), g)
    azimuth, elevation = torch.cat([base, base + 180.0]), torch.cat([axis, -axis])
    if views % 2:
        azimuth = torch.cat([azimuth, _uniform(1, ranges.azimuth_deg, g)])
        elevation = torch.cat([elevation, _uniform(1, ranges.elevation_deg, g)])
    return azimuth, elevation


def angles_mixed(views: int, ranges: CameraRanges, g: torch.Generator) -> Angles:
    """K=4: an azimuth pair (φa, ε), (φa + 180°, ε), then an elevation pair (φb, ε_max), (φb, ε_min)
    with φb independent of φa; ε uniform in degrees, as the reference."""
    lo, hi = ranges.elevation_deg
    phi_a = _uniform(1, ranges.azimuth_deg, g)
    eps = _uniform(1, (lo, hi), g)
    phi_b = _uniform(1, ranges.azimuth_deg, g)
    return (torch.cat([phi_a, phi_a + 180.0, phi_b, phi_b]),
            torch.cat([eps, eps, torch.tensor([hi, lo])]))


def angles_octahedral(views: int, ranges: CameraRanges, g: torch.Generator) -> Angles:
    """K=6: φ, φ+90°, φ+180°, φ+270° on the horizon, then the top and bottom of the elevation range,
    each at its own random azimuth. "Top" and "bottom" are the range's extremes: a camera straight
    above has no defined azimuth, and the SDI range stops at 45°. The ring sits at 0° (clamped into
    the range when the range excludes the horizon; the reference would leave it at 0°)."""
    lo, hi = ranges.elevation_deg
    phi = _uniform(1, ranges.azimuth_deg, g)
    poles = _uniform(2, ranges.azimuth_deg, g)
    ring = min(max(0.0, lo), hi)
    return (torch.cat([phi + torch.tensor([0.0, 90.0, 180.0, 270.0]), poles]),
            torch.tensor([ring] * 4 + [hi, lo]))


@dataclass(frozen=True)
class Sampler:
    angles: Callable[[int, CameraRanges, torch.Generator], Angles]
    valid: Callable[[int], bool]
    rule: str  # what K it accepts, for error messages


SAMPLERS: dict[str, Sampler] = {
    "random": Sampler(angles_random, lambda views: views >= 1, "any K >= 1"),
    "antipodal": Sampler(angles_antipodal, lambda views: views >= 2, "K >= 2 (an odd K adds one unpaired view)"),
    "stratified": Sampler(angles_stratified, lambda views: views >= 1, "any K >= 1"),
    "mixed": Sampler(angles_mixed, lambda views: views == 4, "K = 4"),
    "octahedral": Sampler(angles_octahedral, lambda views: views == 6, "K = 6"),
    "random_axis": Sampler(angles_random_axis, lambda views: views >= 2, "K >= 2 (an odd K adds one unpaired view)"),
}


def check_sampler(name: str, views: int) -> Sampler:
    """The sampler called ``name``, or a ValueError that says which K it accepts."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown view sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    if not isinstance(views, int) or views < 1:
        raise ValueError(f"the number of views per step must be an integer >= 1, got {views!r}")
    sampler = SAMPLERS[name]
    if not sampler.valid(views):
        raise ValueError(f"view sampler {name!r} cannot make K={views} views: it needs {sampler.rule}")
    return sampler


def sample_views(name: str, views: int, generator: torch.Generator, ranges: CameraRanges = CameraRanges()) -> Cameras:
    """K training cameras from the sampler ``name``; a pure function of the generator's state."""
    azimuth, elevation = check_sampler(name, views).angles(views, ranges, generator)
    return make_cameras(azimuth, elevation, ranges, generator)


def evaluation_cameras(n: int = 50, elevation_deg: float = 15.0, distance: float = 2.0,
                       fovy_deg: float = 70.0) -> Cameras:
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

