"""Small signed-distance building blocks for the procedural scenes.

Convention: a distance function maps points ``p [..., 3]`` to ``[...]``, negative inside, in world
units. Primitives sit at the origin in a canonical pose; ``translate`` / ``rotate`` move the *shape*
(they apply the inverse transform to the query points). Booleans use min/max, which keeps the zero
set exact and the value a lower bound of the true distance: enough for rendering with a sharp
density and for normals by autograd.

Everything is plain torch and differentiable, so a scene works on any device and dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch
from torch import Tensor

SDF = Callable[[Tensor], Tensor]
Vec = Sequence[float]


def _vec(v: Vec, like: Tensor) -> Tensor:
    return torch.as_tensor(v, dtype=like.dtype, device=like.device)


# ------------------------------------------------------------------------------------------------
# primitives (canonical pose: centred at the origin, axis along z)


def sphere(radius: float) -> SDF:
    return lambda p: p.norm(dim=-1) - radius


def box(half: Vec, rounding: float = 0.0) -> SDF:
    """Axis-aligned box with half extents ``half``; ``rounding`` rounds its edges (same outer size)."""

    def f(p: Tensor) -> Tensor:
        q = p.abs() - (_vec(half, p) - rounding)
        outside = q.clamp_min(0.0).norm(dim=-1)
        inside = q.amax(-1).clamp_max(0.0)
        return outside + inside - rounding

    return f


def capsule(a: Vec, b: Vec, radius: float) -> SDF:
    """All points within ``radius`` of the segment a-b."""

    def f(p: Tensor) -> Tensor:
        a_, b_ = _vec(a, p), _vec(b, p)
        ab = b_ - a_
        h = (((p - a_) * ab).sum(-1) / (ab * ab).sum()).clamp(0.0, 1.0)
        return (p - a_ - h[..., None] * ab).norm(dim=-1) - radius

    return f


def cylinder(radius: float, half_height: float) -> SDF:
    """Capped cylinder around the z axis, |z| <= half_height (exact distance)."""

    def f(p: Tensor) -> Tensor:
        d = torch.stack([p[..., :2].norm(dim=-1) - radius, p[..., 2].abs() - half_height], -1)
        return d.clamp_min(0.0).norm(dim=-1) + d.amax(-1).clamp_max(0.0)

    return f


def torus(major: float, minor: float) -> SDF:
    """Ring in the xy plane around the z axis."""

    def f(p: Tensor) -> Tensor:
        ring = p[..., :2].norm(dim=-1) - major
        return torch.stack([ring, p[..., 2]], -1).norm(dim=-1) - minor

    return f


def ellipsoid(radii: Vec) -> SDF:
    """Axis-aligned ellipsoid; a close bound of the distance (exact on the surface)."""

    def f(p: Tensor) -> Tensor:
        r = _vec(radii, p)
        k0 = (p / r).norm(dim=-1)
        k1 = (p / (r * r)).norm(dim=-1).clamp_min(1e-9)
        return k0 * (k0 - 1.0) / k1

    return f


def half_space(normal: Vec, offset: float) -> SDF:
    """Points with n.p <= offset are inside (n is normalised here)."""
    n = torch.tensor(normal, dtype=torch.float64)
    n = (n / n.norm()).tolist()
    return lambda p: (p * _vec(n, p)).sum(-1) - offset


# ------------------------------------------------------------------------------------------------
# booleans and placement


def union(*parts: SDF) -> SDF:
    return lambda p: functools.reduce(torch.minimum, [f(p) for f in parts])


def intersect(*parts: SDF) -> SDF:
    return lambda p: functools.reduce(torch.maximum, [f(p) for f in parts])


def subtract(base: SDF, *cut: SDF) -> SDF:
    """``base`` with every shape of ``cut`` carved out."""
    return lambda p: functools.reduce(torch.maximum, [base(p)] + [-f(p) for f in cut])


def translate(shape: SDF, offset: Vec) -> SDF:
    return lambda p: shape(p - _vec(offset, p))


def rotation_matrix(axis: str, degrees: float) -> Tensor:
    """Right-handed rotation about the world ``axis`` ('x', 'y' or 'z'), float64 [3, 3]."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    m = torch.eye(3, dtype=torch.float64)
    m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
    return m


def rotate(shape: SDF, axis: str, degrees: float) -> SDF:
    """The shape turned by ``degrees`` about ``axis``: query points are turned back by the inverse."""
    m = rotation_matrix(axis, degrees)
    # p_local = R^T p, written as p @ R for row vectors
    return lambda p: shape(p @ m.to(p))


def rotate_points_z(p: Tensor, degrees: float) -> Tensor:
    """Points turned by ``degrees`` about +z (counter-clockwise seen from above)."""
    return p @ rotation_matrix("z", degrees).to(p).T
