"""Procedural scenes with a known shape and colour: the ground truth of the weights-free testbed.

A scene is a signed distance function (negative inside, world units) plus an albedo colour
function, both analytic. Every built-in scene faces +x (azimuth 0 is its front), fits inside
|x|, |y|, |z| <= 0.75, and has no rotational symmetry about the up axis (z): its front and back
look different, so a distilled object with two fronts (the Janus problem) is measurable.

Adding a scene takes a few lines::

    from mvsdi.testbed import Scene, register_scene, sdf

    ball = sdf.translate(sdf.sphere(0.3), (0.0, 0.0, -0.2))
    nose = sdf.capsule((0.25, 0.0, -0.2), (0.45, 0.0, -0.2), 0.05)
    register_scene(Scene.from_parts("ball_with_nose", "a blue ball with a red nose",
                                    [(ball, (0.2, 0.3, 0.9)), (nose, (0.9, 0.1, 0.1))]))

Bump ``version`` whenever a scene's shape or colours change: the reference-image cache is keyed
by it, so stale renders are rebuilt.

Truth images (``render_truth``) are sphere traced: each pixel takes the albedo of the first
surface point its ray meets (exact silhouettes, no sampling along rays), over a constant 0.5
grey (``BACKGROUND``), the same background as the ideal prior's reference images. Grey is also
where the learned background starts, and it sets off both white and dark objects.

``SceneField`` dresses a scene as a ``Field`` for ``mvsdi.render.render`` and the 3D metrics:
density is a sharp logistic of the SDF, ``sigma = (1/s) * sigmoid(-sdf/s)`` with
``s = DENSITY_SHARPNESS = 1e-4``: 10^4 per unit inside (opaque at the first sample inside), ~0
outside. A softer density fattens the object: a ray grazing a surface gathers the logistic tail
along its whole chord (s = 0.005 grew silhouettes by about a pixel at 64²).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvsdi.cameras import Cameras, rays
from mvsdi.field import FieldConfig
from mvsdi.render import ray_box, render
from mvsdi.testbed import sdf as S

Colour = Callable[[Tensor], Tensor]
RGB = tuple[float, float, float]
Part = tuple[S.SDF, "RGB | Colour"]

SCENE_EXTENT = 0.75  # every scene fits in |x|, |y|, |z| <= this
DENSITY_SHARPNESS = 1e-4  # s of sigma = sigmoid(-sdf/s)/s
BACKGROUND = 0.5  # grey of truth renders and reference images, in [0, 1]
TRUTH_BOUND = 0.78  # truth renders march only through this cube: the scenes are inside it
TRACE_STEPS = 128  # sphere-tracing steps of truth renders
HIT_EPS = 1e-3  # a traced ray has hit the surface when the SDF is below this (world units)
GRAZE_EPS = 5e-3  # ... or, after TRACE_STEPS, below this (a ray grazing a surface creeps along it)


@dataclass(frozen=True)
class Scene:
    name: str
    description: str
    sdf: S.SDF
    colour: Colour
    version: int = 1
    # optional: (sdf, colour) in one pass, for speed; derived from sdf and colour when absent
    evaluate: Callable[[Tensor], tuple[Tensor, Tensor]] | None = field(default=None, compare=False)

    def sdf_and_colour(self, p: Tensor) -> tuple[Tensor, Tensor]:
        if self.evaluate is not None:
            return self.evaluate(p)
        return self.sdf(p), self.colour(p)

    @classmethod
    def from_parts(cls, name: str, description: str, parts: Sequence[Part], version: int = 1) -> "Scene":
        """A union of parts, each with a constant RGB or a colour function; a point takes the colour
        of the part it is closest to (inside: the deepest), so colours follow the part surfaces."""
        evaluate = _assemble(list(parts))
        distance = S.union(*[f for f, _ in parts])  # tracing needs the distance alone: skip the colours
        return cls(name, description, distance, lambda p: evaluate(p)[1], version, evaluate)


def _assemble(parts: list[Part]) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    constant = [c if not callable(c) else (0.0, 0.0, 0.0) for _, c in parts]

    def evaluate(p: Tensor) -> tuple[Tensor, Tensor]:
        dist, which = torch.stack([f(p) for f, _ in parts], -1).min(-1)
        colour = torch.tensor(constant, dtype=p.dtype, device=p.device)[which]
        for k, (_, c) in enumerate(parts):
            if callable(c):  # only the few patterned parts pay for a per-point colour
                colour = torch.where((which == k)[..., None], c(p), colour)
        return dist, colour

    return evaluate


def _where(mask: Tensor, a: RGB, b: Tensor | RGB) -> Tensor:
    """Colour ``a`` where mask holds, else ``b`` (a colour tensor or a constant)."""
    b_ = b if isinstance(b, Tensor) else torch.tensor(b, device=mask.device)
    return torch.where(mask[..., None], torch.tensor(a, dtype=b_.dtype, device=mask.device), b_.expand(*mask.shape, 3))


# ------------------------------------------------------------------------------------------------
# the built-in scenes (front = +x, up = +z)

CREAM, RED, BLACK, WHITE = (0.95, 0.92, 0.82), (0.85, 0.1, 0.1), (0.07, 0.07, 0.08), (0.96, 0.96, 0.97)
ORANGE, WOOD, YELLOW, GLASS = (1.0, 0.5, 0.05), (0.45, 0.28, 0.12), (0.98, 0.85, 0.15), (0.55, 0.78, 0.95)


def _mug() -> Scene:
    body = S.subtract(S.cylinder(0.33, 0.33), S.translate(S.cylinder(0.28, 0.2), (0, 0, 0.33)))
    ring = S.translate(S.rotate(S.torus(0.17, 0.045), "y", 90), (0, 0.33, 0))  # handle on the +y side
    handle = S.subtract(ring, S.cylinder(0.3, 0.4))

    def body_colour(p: Tensor) -> Tensor:
        logo = (p[..., 0] > 0.2) & (p[..., 1].square() + p[..., 2].square() < 0.14 ** 2)  # red disc in front
        coffee = (p[..., 2] > 0.1) & (p[..., :2].norm(dim=-1) < 0.285)
        return _where(logo, RED, _where(coffee, (0.35, 0.2, 0.1), CREAM))

    return Scene.from_parts("mug", "a cream coffee mug with a red logo on the front and the handle on its left",
                            [(body, body_colour), (handle, CREAM)])


def _snowman() -> Scene:
    spheres = [((0, 0, -0.42), 0.30), ((0, 0, -0.02), 0.22), ((0, 0, 0.30), 0.16)]
    snow = S.union(*[S.translate(S.sphere(r), c) for c, r in spheres])
    hat = S.union(S.translate(S.cylinder(0.17, 0.015), (0, 0, 0.44)), S.translate(S.cylinder(0.11, 0.1), (0, 0, 0.54)))
    nose = S.capsule((0.12, 0, 0.30), (0.34, 0, 0.28), 0.035)
    dots = [(0.135, 0.06, 0.35), (0.135, -0.06, 0.35), (0.215, 0, 0.03), (0.22, 0, -0.06)]  # eyes, buttons
    coal = S.union(*[S.translate(S.sphere(0.03), c) for c in dots])
    tail = S.translate(S.box((0.025, 0.065, 0.13), 0.01), (-0.225, 0.03, -0.02))  # hangs down the back
    scarf = S.union(S.translate(S.torus(0.14, 0.04), (0, 0, 0.16)), tail)
    arms = S.union(S.capsule((0, 0.2, 0.02), (0, 0.45, 0.2), 0.03), S.capsule((0, -0.2, 0.02), (0, -0.45, 0.2), 0.03))
    return Scene.from_parts("snowman", "a snowman with a carrot nose, a black hat and a red scarf down his back",
                            [(snow, WHITE), (hat, BLACK), (nose, ORANGE), (coal, BLACK), (scarf, RED), (arms, WOOD)])


def _chair() -> Scene:
    seat = S.translate(S.box((0.28, 0.28, 0.04), 0.01), (0, 0, -0.05))
    corners = [(x, y) for x in (-0.24, 0.24) for y in (-0.24, 0.24)]
    legs = S.union(*[S.translate(S.box((0.035, 0.035, 0.3)), (x, y, -0.39)) for x, y in corners])
    back = S.translate(S.box((0.035, 0.28, 0.3), 0.01), (-0.245, 0, 0.29))  # back rest at -x: one sits facing +x
    cushion = S.translate(S.box((0.03, 0.22, 0.2), 0.02), (-0.19, 0, 0.3))
    return Scene.from_parts("chair", "a wooden chair with a red seat and a green cushion on its back rest",
                            [(seat, RED), (legs, WOOD), (back, WOOD), (cushion, (0.2, 0.6, 0.3))])


def _house() -> Scene:
    walls = S.translate(S.box((0.32, 0.28, 0.22)), (0, 0, -0.28))
    # gable roof, ridge along x at z = 0.3, slopes of 45° down to the sides
    roof = S.intersect(S.translate(S.box((0.38, 0.36, 0.2)), (0, 0, 0.12)),
                       S.half_space((0, 1, 1), 0.3 / 2 ** 0.5), S.half_space((0, -1, 1), 0.3 / 2 ** 0.5))
    door = S.translate(S.box((0.02, 0.08, 0.13)), (0.32, 0, -0.37))
    windows = S.union(*[S.translate(S.box((0.015, 0.06, 0.06)), (0.32, y, -0.22)) for y in (-0.17, 0.17)],
                      *[S.translate(S.box((0.08, 0.015, 0.06)), (0.05, y, -0.25)) for y in (-0.28, 0.28)])
    chimney = S.translate(S.box((0.05, 0.05, 0.12)), (-0.18, 0.18, 0.22))
    return Scene.from_parts("house", "a yellow house with a red roof, a brown front door and a chimney at the back",
                            [(walls, (0.95, 0.85, 0.4)), (roof, (0.75, 0.2, 0.15)), (door, (0.4, 0.22, 0.1)),
                             (windows, GLASS), (chimney, (0.5, 0.15, 0.1))])


def _duck() -> Scene:
    body = S.translate(S.ellipsoid((0.38, 0.27, 0.2)), (-0.05, 0, -0.2))
    head = S.translate(S.sphere(0.16), (0.2, 0, 0.12))
    tail = S.translate(S.rotate(S.ellipsoid((0.12, 0.08, 0.04)), "y", -35), (-0.4, 0, -0.06))
    beak = S.translate(S.ellipsoid((0.11, 0.07, 0.03)), (0.38, 0, 0.1))
    eyes = S.union(*[S.translate(S.sphere(0.025), (0.33, y, 0.18)) for y in (-0.07, 0.07)])
    wings = S.union(*[S.translate(S.ellipsoid((0.2, 0.05, 0.1)), (-0.08, y, -0.15)) for y in (-0.24, 0.24)])
    return Scene.from_parts("duck", "a yellow rubber duck with an orange beak",
                            [(S.union(body, head, tail), YELLOW), (beak, ORANGE), (eyes, BLACK),
                             (wings, (0.9, 0.68, 0.1))])


def _car() -> Scene:
    chassis = S.translate(S.box((0.55, 0.26, 0.1), 0.04), (0, 0, -0.2))
    cabin = S.translate(S.box((0.27, 0.22, 0.12), 0.05), (-0.08, 0, 0.0))  # set back: long bonnet in front
    wheel = S.rotate(S.cylinder(0.12, 0.05), "x", 90)
    wheels = S.union(*[S.translate(wheel, (x, y, -0.3)) for x in (-0.33, 0.33) for y in (-0.25, 0.25)])
    lights = S.union(*[S.translate(S.sphere(0.045), (0.54, y, -0.18)) for y in (-0.17, 0.17)])
    grille = S.translate(S.box((0.015, 0.09, 0.03)), (0.555, 0, -0.24))
    plate = S.translate(S.box((0.01, 0.08, 0.03)), (-0.555, 0, -0.22))

    def cabin_colour(p: Tensor) -> Tensor:
        return _where(p[..., 2] > -0.05, GLASS, RED)

    return Scene.from_parts("car", "a small red car with headlights and a long bonnet in front",
                            [(chassis, RED), (cabin, cabin_colour), (wheels, BLACK), (lights, (1.0, 0.95, 0.6)),
                             (grille, (0.2, 0.2, 0.22)), (plate, WHITE)])


def _lamp() -> Scene:
    base = S.translate(S.cylinder(0.2, 0.03), (-0.1, 0, -0.55))
    arms = S.union(S.capsule((-0.1, 0, -0.52), (-0.2, 0, 0.05), 0.03), S.capsule((-0.2, 0, 0.05), (0.15, 0, 0.3), 0.03),
                   S.translate(S.sphere(0.05), (-0.2, 0, 0.05)))
    cone = S.subtract(S.cylinder(0.14, 0.11), S.translate(S.cylinder(0.12, 0.11), (0, 0, -0.03)))  # open at -z
    shade = S.translate(S.rotate(cone, "y", -45), (0.25, 0, 0.22))  # the opening looks forward and down
    bulb = S.translate(S.sphere(0.06), (0.28, 0, 0.19))
    return Scene.from_parts("lamp", "a desk lamp with a dark blue base and a green shade pointing forward",
                            [(base, (0.1, 0.15, 0.4)), (arms, (0.78, 0.78, 0.82)), (shade, (0.1, 0.55, 0.3)),
                             (bulb, (1.0, 0.9, 0.4))])


def _penguin() -> Scene:
    body = S.translate(S.ellipsoid((0.28, 0.26, 0.4)), (0, 0, -0.15))
    head = S.translate(S.sphere(0.19), (0.02, 0, 0.34))
    beak = S.translate(S.rotate(S.ellipsoid((0.1, 0.05, 0.035)), "y", 10), (0.22, 0, 0.3))
    eyes = S.union(*[S.translate(S.sphere(0.035), (0.17, y, 0.4)) for y in (-0.07, 0.07)])
    feet = S.union(*[S.translate(S.ellipsoid((0.1, 0.06, 0.03)), (0.12, y, -0.55)) for y in (-0.1, 0.1)])
    flippers = S.union(*[S.translate(S.rotate(S.ellipsoid((0.06, 0.03, 0.2)), "x", a), (0, y, -0.1))
                         for y, a in ((0.27, 20), (-0.27, -20))])

    def body_colour(p: Tensor) -> Tensor:
        return _where(p[..., 0] > 0.1, WHITE, BLACK)  # white belly in front, black back

    return Scene.from_parts("penguin", "a penguin with a white belly, an orange beak and orange feet",
                            [(body, body_colour), (head, BLACK), (beak, ORANGE), (eyes, WHITE), (feet, ORANGE),
                             (flippers, BLACK)])


# ------------------------------------------------------------------------------------------------
# registry

SCENES: dict[str, Scene] = {}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")


def _check_fits(scene: Scene, extent: float = TRUTH_BOUND, n: int = 24) -> None:
    """Refuse a scene that reaches the faces of the truth cube (it would be clipped in renders)."""
    u = torch.linspace(-extent, extent, n)
    a, b = torch.meshgrid(u, u, indexing="ij")
    face = torch.stack([torch.full_like(a, extent), a, b], -1).reshape(-1, 3)
    shell = torch.cat([face[:, perm] * sign for perm in ([0, 1, 2], [1, 0, 2], [1, 2, 0]) for sign in (1.0, -1.0)])
    if (scene.sdf(shell) < 0).any():
        raise ValueError(f"scene {scene.name!r} does not fit inside |x|, |y|, |z| <= {SCENE_EXTENT}")


def register_scene(scene: Scene, replace: bool = False) -> Scene:
    """Add ``scene`` to ``SCENES`` (see the module docstring for an example)."""
    if not _NAME.match(scene.name):
        raise ValueError(f"scene name {scene.name!r}: use lowercase letters, digits, '_' or '-'")
    if scene.name in SCENES and not replace:
        raise ValueError(f"a scene called {scene.name!r} is already registered (pass replace=True)")
    _check_fits(scene)
    SCENES[scene.name] = scene
    return scene


def get_scene(name: str) -> Scene:
    if name not in SCENES:
        raise ValueError(f"unknown scene {name!r}; known scenes: {', '.join(SCENES)}")
    return SCENES[name]


for _build in (_mug, _snowman, _chair, _house, _duck, _car, _lamp, _penguin):
    register_scene(_build())


# ------------------------------------------------------------------------------------------------
# scenes derived from a scene: the sanity candidates of the metrics (benchmarks/testbed_sanity.py)


def _mirror_back(p: Tensor) -> Tensor:
    """(|x|, y, z): every point of the back half (x < 0) replaced by its mirror image in the front half."""
    return torch.cat([p[..., :1].abs(), p[..., 1:]], -1)


def janus_twin(scene: Scene) -> Scene:
    """``scene`` with its back replaced by its front: sdf'(x, y, z) = sdf(|x|, y, z), colour likewise.

    The scenes face +x (azimuth 0 is the front), so the twin is what a Janus failure makes of the
    object: seen from behind (azimuth 180° − φ) it shows the mirror image of its front seen from φ.
    It is built from the scene's own functions, so it exists for any registered scene. (|x|, y, z)
    is 1-Lipschitz, so the twin's SDF is still a lower bound of the distance and can be sphere
    traced; the twin fits wherever the scene fits.
    """
    def evaluate(p: Tensor) -> tuple[Tensor, Tensor]:
        return scene.sdf_and_colour(_mirror_back(p))

    return Scene(f"{scene.name}-janus", f"{scene.description} (front on both sides)",
                 lambda p: scene.sdf(_mirror_back(p)), lambda p: scene.colour(_mirror_back(p)), scene.version, evaluate)


# Gauss–Hermite rule for one axis of N(0, sigma²): nodes 0, ±√3·sigma with weights 2/3, 1/6, 1/6 (exact for
# polynomials of degree 5); the blur uses its 27-point product over the three axes.
_GH_NODES = (-math.sqrt(3.0), 0.0, math.sqrt(3.0))
_GH_WEIGHTS = (1.0 / 6.0, 2.0 / 3.0, 1.0 / 6.0)
# The blurred truth's sigma, in world units: a third of a pixel of a 32² evaluation view (0.0875 units a pixel
# at the object), the radius of the thinnest parts. Chosen on the sanity table (docs/testbed_sanity.md): at 0.02
# the blurred mug scored a higher PSNR than the mug's own 64-sample volume render (that render's sampling error
# is larger than such a blur); at 0.05 the chair's 0.07 slabs and most of the lamp eroded away (IoU 0.28 and
# 0.05), leaving little of the object to be partly right.
BLUR_SIGMA = 0.03
_BLUR_CHUNK = 2 ** 15  # query points per pass of the 27 taps: bounds the memory of a blurred scene


def blurred_scene(scene: Scene, sigma: float = BLUR_SIGMA) -> Scene:
    """``scene`` low-passed: its SDF and its colour each convolved with an isotropic Gaussian of
    standard deviation ``sigma`` (27-point Gauss–Hermite product rule).

    The right object with its detail removed: edges rounded, parts of radius up to about ``sigma``
    (the lamp's and the snowman's arms, eyes) eroded away, colour boundaries (the mug's logo, the
    penguin's belly) smeared, while the front stays the front. A weighted mean of 1-Lipschitz
    functions is 1-Lipschitz, so the blurred SDF of exact distances still bounds the distance from
    below (sphere tracing works). The blurred object reaches at most 3·sigma (the farthest tap)
    beyond the scene, and a convex part shrinks (the mean of a convex function is above its value).
    """
    if sigma <= 0:
        raise ValueError(f"the blur's sigma must be > 0, got {sigma}")
    grid = torch.tensor([[a, b, c] for a in _GH_NODES for b in _GH_NODES for c in _GH_NODES], dtype=torch.float64)
    taps = grid * sigma
    weights = torch.tensor([wa * wb * wc for wa in _GH_WEIGHTS for wb in _GH_WEIGHTS for wc in _GH_WEIGHTS],
                           dtype=torch.float64)

    def blur(p: Tensor, colour: bool) -> tuple[Tensor, Tensor | None]:
        flat = p.reshape(-1, 3)
        offsets, w = taps.to(flat), weights.to(flat)
        distances, colours = [], []
        for piece in flat.split(_BLUR_CHUNK):
            points = (piece[:, None, :] + offsets[None]).reshape(-1, 3)
            if colour:
                d, c = scene.sdf_and_colour(points)
                colours.append((c.to(flat).reshape(-1, len(w), 3) * w[None, :, None]).sum(1))
            else:
                d = scene.sdf(points)
            distances.append((d.to(flat).reshape(-1, len(w)) * w).sum(1))
        d = torch.cat(distances).reshape(p.shape[:-1]) if distances else p.new_zeros(p.shape[:-1])
        c = (torch.cat(colours) if colours else p.new_zeros(0, 3)).reshape(*p.shape[:-1], 3) if colour else None
        return d, c

    def evaluate(p: Tensor) -> tuple[Tensor, Tensor]:
        return blur(p, True)

    return Scene(f"{scene.name}-blurred", f"{scene.description} (blurred by {sigma:g})", lambda p: blur(p, False)[0],
                 lambda p: blur(p, True)[1], scene.version, evaluate)


# ------------------------------------------------------------------------------------------------
# rendering the truth


class SceneField(nn.Module):
    """A scene dressed as a ``Field`` for ``mvsdi.render.render``: ``cfg.bound``, ``forward``,
    ``with_normals``. ``rotation_deg`` turns the object about +z (counter-clockwise from above)."""

    def __init__(self, scene: Scene, bound: float = 1.0, sharpness: float = DENSITY_SHARPNESS,
                 rotation_deg: float = 0.0) -> None:
        super().__init__()
        self.scene, self.sharpness, self.rotation_deg = scene, sharpness, rotation_deg
        self.cfg = FieldConfig(bound=bound)

    def local(self, x: Tensor) -> Tensor:
        """World points in the scene's own frame (undoing ``rotation_deg``)."""
        return S.rotate_points_z(x, -self.rotation_deg) if self.rotation_deg else x

    def sdf_and_colour(self, x: Tensor, need_colour: bool = True):
        """(sdf, colour) at world points x, or only the sdf when ``need_colour`` is False."""
        return self.scene.sdf_and_colour(self.local(x)) if need_colour else self.scene.sdf(self.local(x))

    def _density(self, x: Tensor, distance: Tensor) -> Tensor:
        s = self.sharpness
        density = torch.sigmoid(-distance / s) / s
        return torch.where((x.abs() <= self.cfg.bound).all(-1), density, torch.zeros_like(density))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # The SDF is only evaluated near the object (inside the TRUTH_BOUND cube of its own frame):
        # most samples of a render lie in empty space, where density is 0 and the colour unused.
        near = (self.local(x).abs() <= TRUTH_BOUND).all(-1) & (x.abs() <= self.cfg.bound).all(-1)
        density = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)
        colour = torch.zeros_like(x)
        distance, albedo = self.sdf_and_colour(x[near])
        density[near] = self._density(x[near], distance)
        colour[near] = albedo.to(x.dtype).clamp(0.0, 1.0)
        return density, colour

    def with_normals(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normals are the normalised SDF gradient (outward); the truth carries no graph."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            distance, colour = self.sdf_and_colour(x)
            (grad,) = torch.autograd.grad(distance.sum(), x)
        x = x.detach()
        normals = F.normalize(grad, dim=-1, eps=1e-12)
        return self._density(x, distance.detach()), colour.detach().clamp(0.0, 1.0), normals

    def occupancy(self, x: Tensor) -> Tensor:
        return self.sdf_and_colour(x)[0] < 0


class ConstantBackground(nn.Module):
    """The testbed's sky: one grey for every direction (``BACKGROUND``)."""

    def __init__(self, value: float = BACKGROUND) -> None:
        super().__init__()
        self.value = value

    def forward(self, directions: Tensor) -> Tensor:
        return torch.full_like(directions, self.value)


def truth_bound(rotation_deg: float) -> float:
    """Half-side of a world cube that holds a scene turned by ``rotation_deg`` about z."""
    return TRUTH_BOUND if rotation_deg % 90.0 == 0.0 else TRUTH_BOUND * 2 ** 0.5


def sphere_trace(scene: Scene, origins: Tensor, directions: Tensor, max_steps: int = TRACE_STEPS,
                 rotation_deg: float = 0.0) -> tuple[Tensor, Tensor]:
    """First hit of each ray [R, 3] with the surface: (hit [R] bool, point [R, 3]).

    Steps by the SDF value (a lower bound of the distance, so the surface is never jumped over)
    from where the ray enters the ``TRUTH_BOUND`` cube; only rays still marching are evaluated.
    A ray hits when the SDF falls below ``HIT_EPS``; one still marching after ``max_steps``
    (a grazing ray) counts as a hit if it is within ``GRAZE_EPS`` of the surface.
    """
    field = SceneField(scene, rotation_deg=rotation_deg)
    near, far, _ = ray_box(origins, directions, truth_bound(rotation_deg))
    t, hit = near.clone(), torch.zeros_like(near, dtype=torch.bool)
    active = torch.nonzero(far > near).squeeze(-1)
    distance = torch.empty(0, device=origins.device)
    for _ in range(max_steps):
        if active.numel() == 0:
            break
        distance = field.sdf_and_colour(origins[active] + t[active, None] * directions[active], need_colour=False)
        landed = distance < HIT_EPS
        hit[active[landed]] = True
        t[active] = t[active] + distance.clamp_min(0.0)
        keep = ~landed & (t[active] < far[active])
        active, distance = active[keep], distance[keep]
    hit[active[distance < GRAZE_EPS]] = True
    return hit, origins + t[:, None] * directions


@torch.no_grad()
def render_truth(scene: Scene, cameras: Cameras, size: int, samples_per_ray: int | None = None,
                 rotation_deg: float = 0.0, max_points: int = 2 ** 22) -> Tensor:
    """[N, 3, size, size] albedo renders in [0, 1] over the constant grey ``BACKGROUND``.

    By default each pixel is the colour of the first surface point its ray meets (sphere tracing,
    exact silhouettes, ~5x cheaper than marching). With ``samples_per_ray`` the scene is volume
    rendered by ``mvsdi.render.render`` instead, as a learned field is, through the
    ``TRUTH_BOUND`` cube and in batches of at most ``max_points`` samples.
    """
    if samples_per_ray is None:
        return _traced(scene, cameras, size, rotation_deg)
    scene_field = SceneField(scene, bound=truth_bound(rotation_deg), rotation_deg=rotation_deg)
    per_batch = max(1, max_points // (size * size * samples_per_ray))
    images = []
    for start in range(0, len(cameras), per_batch):
        out = render(scene_field, ConstantBackground(), cameras[start:start + per_batch], size, size,
                     n_samples=samples_per_ray, shading="albedo", need_normals=False)
        images.append(out.rgb.permute(0, 3, 1, 2).clamp(0.0, 1.0))
    return torch.cat(images)


def _traced(scene: Scene, cameras: Cameras, size: int, rotation_deg: float, max_rays: int = 2 ** 20) -> Tensor:
    per_batch = max(1, max_rays // (size * size))
    images = []
    for start in range(0, len(cameras), per_batch):
        batch = cameras[start:start + per_batch]
        origins, directions = rays(batch, size, size)
        hit, points = sphere_trace(scene, origins.reshape(-1, 3), directions.reshape(-1, 3), rotation_deg=rotation_deg)
        rgb = torch.full_like(points, BACKGROUND)
        if hit.any():
            colour = SceneField(scene, rotation_deg=rotation_deg).sdf_and_colour(points[hit])[1]
            rgb[hit] = colour.clamp(0.0, 1.0).to(rgb)
        images.append(rgb.reshape(len(batch), size, size, 3).permute(0, 3, 1, 2))
    return torch.cat(images).contiguous()


def truth_mask(scene: Scene, cameras: Cameras, size: int, rotation_deg: float = 0.0) -> Tensor:
    """[N, size, size] bool: the pixels whose ray meets the object (the exact silhouette)."""
    origins, directions = rays(cameras, size, size)
    hit, _ = sphere_trace(scene, origins.reshape(-1, 3), directions.reshape(-1, 3), rotation_deg=rotation_deg)
    return hit.reshape(len(cameras), size, size)
