"""A trained field as a mesh (glb, obj, ply) or a turntable video (mp4, gif); ``mvsdi export`` is
``mvsdi.export_cli``.

Meshes: the density is sampled on a grid over the field's cube, marching cubes extracts the level
set at the *surface density* (see ``surface_density``), the albedo at the vertices gives the vertex
colours. A field without a surface is caught on a coarse grid first (seconds, not the minutes of a
fine one), and the error names a threshold that would mesh it. Files are written y-up with the
object's front towards +z (the glTF convention, and the default of most importers); the field's
own world is z-up with the front towards +x.

Turntables: RGB | normals | depth side by side, on the evaluation orbit. Every file is written
atomically.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from skimage.measure import marching_cubes
from torch import nn

from mvsdi.atomic_files import atomic_write_bytes
from mvsdi.cameras import evaluation_cameras
from mvsdi.images import to_uint8
from mvsdi.render import render

MESH_FORMATS = ("glb", "obj", "ply")
VIDEO_FORMATS = ("mp4", "gif")
DEFAULT_FRAMES = 60
DEFAULT_FPS = 25
DEFAULT_MIN_COMPONENT = 0.01
# A field with no surface shows it on a coarse grid first: 64³ took 6 s on a 2-core CPU where 256³
# took 189 s to find the same "no surface" (a barely trained run).
COARSE_RESOLUTION = 64
POINTS_PER_CHUNK = 2 ** 16  # field evaluations per call: ~0.2 GB of hash-grid intermediates on CPU


class EmptyMeshError(ValueError):
    """The field has no surface at the threshold: there is nothing to mesh."""


# ------------------------------------------------------------------------------------------------
# meshes


def surface_density(samples_per_ray: int, bound: float) -> float:
    """The density at which one render sample absorbs half the light: σ* = ln 2 / δ.

    δ is the renderer's sample spacing on a ray that crosses the cube [-bound, bound]³ face to face
    (``render.sample_distances`` splits the chord into ``samples_per_ray`` bins). A region denser than
    σ* is opaque to the renderer within one step, so this level set is where the renders see the
    surface of a converged (sharp) field; it follows the run's config instead of a tuned constant.
    """
    spacing = 2.0 * bound / samples_per_ray
    return math.log(2.0) / spacing


def grid_axis(bound: float, resolution: int) -> np.ndarray:
    """``resolution`` sample positions per axis spanning [-bound, bound], ends included."""
    return np.linspace(-bound, bound, resolution, dtype=np.float32)


@torch.no_grad()
def sample_density(field: nn.Module, resolution: int, device: torch.device | str = "cpu") -> np.ndarray:
    """Density [R, R, R] (index order x, y, z) on the grid of ``grid_axis``, in chunks of x-slabs.

    Only one slab of points exists at a time, so a 256³ grid needs ~70 MB for the result and the
    memory of one chunk, not of 16.7M points at once.
    """
    axis = torch.from_numpy(grid_axis(float(field.cfg.bound), resolution)).to(device)
    yz = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)  # [R², 2]
    slabs = max(1, POINTS_PER_CHUNK // len(yz))
    density = np.empty((resolution, resolution, resolution), dtype=np.float32)
    for start in range(0, resolution, slabs):
        xs = axis[start:start + slabs]
        points = torch.cat([xs.repeat_interleave(len(yz))[:, None], yz.repeat(len(xs), 1)], -1)
        density[start:start + len(xs)] = field(points)[0].reshape(len(xs), resolution, resolution).float().cpu().numpy()
    return density


@torch.no_grad()
def albedo_at(field: nn.Module, points: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """Albedo in [0, 1] [P, 3] at world points [P, 3], in chunks."""
    out = [field(torch.from_numpy(chunk).to(device))[1].float().cpu().numpy()
           for chunk in np.array_split(points.astype(np.float32), max(1, math.ceil(len(points) / POINTS_PER_CHUNK)))]
    return np.concatenate(out) if out else np.zeros((0, 3), dtype=np.float32)


def extract_surface(density: np.ndarray, threshold: float, bound: float) -> tuple[np.ndarray, np.ndarray]:
    """(vertices [V, 3] in world units, z-up; faces [F, 3] wound outwards) of {density = threshold}.

    Marching cubes runs on log density: a sharp surface (density jumping by orders of magnitude
    within a voxel) is nearly linear in log density, so the vertices interpolated along grid edges
    land on it; on raw density they shift outwards by most of a voxel (measured on a sphere at 32³:
    area +9 % raw, -0.6 % in log). The grid is padded with one layer of "empty" (the field is zero
    outside its cube), so a surface touching the cube's border still closes: the mesh is watertight.
    """
    require_surface(density, threshold)
    floor = threshold * 1e-6  # far below the level, so it never moves a vertex; keeps log(0) finite
    log_density = np.pad(np.log(np.maximum(density, floor)), 1, mode="constant", constant_values=math.log(floor))
    spacing = 2.0 * bound / (density.shape[0] - 1)
    # density grows inwards; with skimage's (x, y, z) index order "ascent" winds the faces outwards
    vertices, faces, _, _ = marching_cubes(log_density, level=math.log(threshold), spacing=(spacing,) * 3,
                                           gradient_direction="ascent")
    return vertices - (bound + spacing), faces


def require_surface(density: np.ndarray, threshold: float) -> None:
    """EmptyMeshError, saying what to do, unless some grid sample is denser than ``threshold``."""
    peak = float(density.max()) if density.size else 0.0
    if peak > threshold:
        return
    found = (f"the field has no surface: its densest point on a {density.shape[0]}³ grid has density {peak:.3g}, "
             f"not above the threshold {threshold:.3g} (--threshold; 'auto' is the density at which one render "
             "sample absorbs half the light). ")
    if not math.isfinite(peak):
        raise EmptyMeshError(found + "The density is not finite: the run diverged; train it again.")
    if peak <= 0:
        raise EmptyMeshError(found + "The field is empty everywhere, so no threshold gives a surface: the run "
                             "collapsed or never formed an object; train it again, or longer.")
    # half the peak: the samples above it form a closed level set around the densest region
    raise EmptyMeshError(found + "The run has not formed an opaque object (too short a budget, or it collapsed): "
                         f"train longer, or mesh its densest region with e.g. --threshold {peak / 2:.3g} "
                         "(half the densest point).")


def drop_small_components(mesh: trimesh.Trimesh, min_fraction: float) -> trimesh.Trimesh:
    """Keep the connected components with at least ``min_fraction`` of the faces (drops floaters)."""
    if min_fraction <= 0:
        return mesh
    parts = mesh.split(only_watertight=False)
    if len(parts) <= 1:
        return mesh
    keep = [p for p in parts if len(p.faces) >= min_fraction * len(mesh.faces)]
    return trimesh.util.concatenate(keep)


def z_up_to_y_up(points: np.ndarray) -> np.ndarray:
    """World (front +x, up +z) → file convention (front +z, up +y): a cyclic axis permutation, a rotation."""
    return points[:, [1, 2, 0]]


def field_mesh(field: nn.Module, resolution: int, threshold: float, device: torch.device | str = "cpu",
               min_component: float = DEFAULT_MIN_COMPONENT) -> trimesh.Trimesh:
    """The field's surface as a ``trimesh.Trimesh`` (y-up, vertex colours from the albedo)."""
    bound = float(field.cfg.bound)
    if resolution > COARSE_RESOLUTION:
        # seconds instead of minutes for the common failure. A coarse grid could in principle miss a
        # feature thinner than its voxel (2·bound / 63) that a fine one catches; a field that is
        # opaque anywhere has a dense core wider than that.
        require_surface(sample_density(field, COARSE_RESOLUTION, device), threshold)
    vertices, faces = extract_surface(sample_density(field, resolution, device), threshold, bound)
    colours = np.concatenate([albedo_at(field, vertices, device), np.ones((len(vertices), 1), np.float32)], 1)
    # process=True merges coincident vertices: a grid sample exactly at the level puts one vertex on
    # each of its edges at the same point, and unmerged they would open the mesh there
    mesh = trimesh.Trimesh(z_up_to_y_up(vertices), faces, vertex_colors=(colours * 255 + 0.5).astype(np.uint8),
                           process=True)
    return drop_small_components(mesh, min_component)


def mesh_bytes(mesh, fmt: str) -> bytes:
    data = mesh.export(file_type=fmt)
    return data.encode() if isinstance(data, str) else data


# ------------------------------------------------------------------------------------------------
# turntables


def normal_image(normal: torch.Tensor, opacity: torch.Tensor) -> torch.Tensor:
    """World normals [H, W, 3] as colours in [0, 1], faded to black where the render is empty."""
    return (F.normalize(normal, dim=-1) * 0.5 + 0.5) * opacity


def depth_images(depths: list[torch.Tensor], opacities: list[torch.Tensor]) -> list[torch.Tensor]:
    """Expected hit distance as grey [H, W, 3] (near white, far dark), one scale for the whole video.

    The range is taken over pixels with opacity > 0.5 of all frames, so that the shade of a point
    does not jump from frame to frame; empty pixels fade to black.
    """
    hit = [d / o.clamp_min(1e-6) for d, o in zip(depths, opacities)]
    solid = torch.cat([h[o > 0.5] for h, o in zip(hit, opacities)])
    near, far = (float(solid.min()), float(solid.max())) if solid.numel() else (0.0, 1.0)
    scale = max(far - near, 1e-6)
    return [((1.0 - (h - near) / scale).clamp(0, 1) * o).expand(*h.shape[:-1], 3) for h, o in zip(hit, opacities)]


@torch.no_grad()
def turntable_panels(outs: list) -> list[np.ndarray]:
    """uint8 frames RGB | normals | depth of renders (``RenderOutput`` of one view each), depth on one scale."""
    depths = depth_images([o.depth[0].cpu() for o in outs], [o.opacity[0].cpu() for o in outs])
    return [np.concatenate([to_uint8(o.rgb[0]), to_uint8(normal_image(o.normal[0], o.opacity[0])), to_uint8(depth)],
                           axis=1) for o, depth in zip(outs, depths)]


def turntable_frames(model, config, frames: int, resolution: int,
                     device: torch.device | str = "cpu") -> list[np.ndarray]:
    """``frames`` uint8 images [resolution, 3·resolution, 3] of RGB | normals | depth on the evaluation orbit.

    ``model`` has ``.field`` and ``.background`` (``mvsdi.distill.Model``); ``config`` is the run's
    ``RunConfig`` (its samples per ray are used, so the video shows what the renders showed).
    """
    check_positive("frames", frames)
    check_positive("resolution", resolution)
    cameras = evaluation_cameras(frames)
    with torch.no_grad():  # one view at a time; only its images are kept, on the CPU
        outs = [ImageMaps.of(render(model.field, model.background, cameras[i].to(device), resolution, resolution,
                                     n_samples=config.samples_per_ray, shading="albedo", need_normals=True))
                for i in range(frames)]
    return turntable_panels(outs)


@dataclasses.dataclass(frozen=True)
class ImageMaps:
    """The image maps of one render, [1, H, W, C] each, detached and on the CPU: all that validation
    and the outputs read. Whatever else a ``RenderOutput`` carries (per-view penalties, statistics of
    its sampling) is left behind, so changes to the renderer's extras cannot break image writing."""

    rgb: torch.Tensor
    opacity: torch.Tensor
    depth: torch.Tensor
    normal: torch.Tensor

    @classmethod
    def of(cls, out: Any) -> "ImageMaps":
        return cls(*(getattr(out, name).detach().cpu() for name in ("rgb", "opacity", "depth", "normal")))


def video_bytes(frames: list[np.ndarray], fmt: str, fps: int = DEFAULT_FPS) -> bytes:
    """An mp4 (H.264 through imageio-ffmpeg) or a looping gif of the frames."""
    if fmt not in VIDEO_FORMATS:
        raise ValueError(f"unknown video format {fmt!r}; choose one of: {', '.join(VIDEO_FORMATS)}")
    stack = np.stack(frames)
    if fmt == "gif":
        return iio.imwrite("<bytes>", stack, extension=".gif", duration=1000.0 / fps, loop=0)
    # H.264 in yuv420p needs even sides: pad one black row/column rather than rescale the frames
    stack = np.pad(stack, ((0, 0), (0, stack.shape[1] % 2), (0, stack.shape[2] % 2), (0, 0)))
    return iio.imwrite("<bytes>", stack, extension=".mp4", fps=fps, codec="libx264", macro_block_size=1)


def write_video(frames: list[np.ndarray], path: str | Path, fps: int = DEFAULT_FPS) -> Path:
    """Write frames atomically as the video format named by ``path``'s suffix (.mp4 or .gif)."""
    path = Path(path)
    atomic_write_bytes(path, video_bytes(frames, path.suffix.lstrip(".").lower(), fps))
    return path


def check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"--{name} must be >= 1, got {value}")
