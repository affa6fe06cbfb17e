"""``mvsdi export RUN``: a trained field as a mesh (glb, obj, ply) or a turntable video (mp4, gif).

Meshes: the density is sampled on a grid over the field's cube, marching cubes extracts the level
set at the *surface density* (see ``surface_density``), the albedo at the vertices gives the vertex
colours. A field without a surface is caught on a coarse grid first (seconds, not the minutes of a
fine one), and the error names a threshold that would mesh it. Files are written y-up with the
object's front towards +z (the glTF convention, and the default of most importers); the field's
own world is z-up with the front towards +x.

Turntables: RGB | normals | depth side by side, on the evaluation orbit.

``add_parser(subparsers)`` adds the subcommand; ``run(args)`` executes it and returns the exit code
(0 done, 2 a bad input, with the reason on stderr). Every file is written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MESH_FORMATS = ("glb", "obj", "ply")
VIDEO_FORMATS = ("mp4", "gif")
FORMATS = MESH_FORMATS + VIDEO_FORMATS
DEFAULT_MESH_RESOLUTION = 256
DEFAULT_VIDEO_RESOLUTION = 256
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
    from skimage.measure import marching_cubes

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


def drop_small_components(mesh, min_fraction: float):
    """Keep the connected components with at least ``min_fraction`` of the faces (drops floaters)."""
    if min_fraction <= 0:
        return mesh
    import trimesh

    parts = mesh.split(only_watertight=False)
    if len(parts) <= 1:
        return mesh
    keep = [p for p in parts if len(p.faces) >= min_fraction * len(mesh.faces)]
    return trimesh.util.concatenate(keep)


def z_up_to_y_up(points: np.ndarray) -> np.ndarray:
    """World (front +x, up +z) → file convention (front +z, up +y): a cyclic axis permutation, a rotation."""
    return points[:, [1, 2, 0]]


def field_mesh(field: nn.Module, resolution: int, threshold: float, device: torch.device | str = "cpu",
               min_component: float = DEFAULT_MIN_COMPONENT):
    """The field's surface as a ``trimesh.Trimesh`` (y-up, vertex colours from the albedo)."""
    import trimesh

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
    from mvsdi.rundir import to_uint8

    depths = depth_images([o.depth[0].cpu() for o in outs], [o.opacity[0].cpu() for o in outs])
    return [np.concatenate([to_uint8(o.rgb[0]), to_uint8(normal_image(o.normal[0], o.opacity[0])), to_uint8(depth)],
                           axis=1) for o, depth in zip(outs, depths)]


def turntable_frames(model, config, frames: int, resolution: int,
                     device: torch.device | str = "cpu") -> list[np.ndarray]:
    """``frames`` uint8 images [resolution, 3·resolution, 3] of RGB | normals | depth on the evaluation orbit.

    ``model`` has ``.field`` and ``.background`` (``mvsdi.distill.Model``); ``config`` is the run's
    ``RunConfig`` (its samples per ray are used, so the video shows what the renders showed).
    """
    from mvsdi.cameras import evaluation_cameras
    from mvsdi.render import render

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
    import imageio.v3 as iio

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
    from mvsdi.rundir import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path, video_bytes(frames, path.suffix.lstrip(".").lower(), fps))
    return path


# ------------------------------------------------------------------------------------------------
# the command


def check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"--{name} must be >= 1, got {value}")


def parse_threshold(text: str) -> float | None:
    """``auto`` → None (the run's ``surface_density``); otherwise a positive number."""
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--threshold {text!r}: write 'auto' or a positive density such as 5") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"--threshold {text!r}: the density must be a positive finite number (or 'auto')")
    return value


def output_format(fmt: str | None, out: Path | None) -> str:
    """The format asked for, else the suffix of --out, else glb; a clear error for anything else."""
    suffix = out.suffix.lstrip(".").lower() if out is not None else ""
    chosen = (fmt or suffix or "glb").lower()
    if chosen not in FORMATS:
        raise ValueError(f"unknown format {chosen!r}; choose one of: {', '.join(FORMATS)} "
                         f"(meshes: {', '.join(MESH_FORMATS)}; turntable videos: {', '.join(VIDEO_FORMATS)})")
    if fmt and suffix and suffix != chosen:
        raise ValueError(f"--out {out} ends in .{suffix} but --format is {chosen}; make them agree")
    return chosen


def default_output(run: Path, fmt: str, frames: int) -> Path:
    return run / (f"mesh.{fmt}" if fmt in MESH_FORMATS else f"turntable_{frames}.{fmt}")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="write a run's field as a mesh (glb/obj/ply) or a turntable video (mp4/gif)",
        description="Export the trained field of RUN. Meshes: marching cubes at the density where one render "
                    "sample absorbs half the light, vertex colours from the albedo, y-up. Videos: RGB | normals "
                    "| depth side by side on the evaluation orbit.")
    p.add_argument("run", type=Path, metavar="RUN", help="a run directory written by `mvsdi generate`")
    p.add_argument("--format", help=f"one of: {', '.join(FORMATS)} (default: the suffix of --out, else glb)")
    p.add_argument("--resolution", type=int, help=f"mesh: grid samples per axis (default {DEFAULT_MESH_RESOLUTION}); "
                   f"video: pixels per side of each panel (default {DEFAULT_VIDEO_RESOLUTION})")
    p.add_argument("--threshold", default="auto", help="mesh: surface density; 'auto' = ln 2 / the renderer's "
                   "sample spacing for this run (default: %(default)s)")
    p.add_argument("--min-component", type=float, default=DEFAULT_MIN_COMPONENT,
                   help="mesh: drop connected pieces with fewer than this share of the faces; 0 keeps all "
                        "(default: %(default)s)")
    p.add_argument("--frames", type=int, default=DEFAULT_FRAMES,
                   help="video: number of frames, one orbit (default: %(default)s)")
    p.add_argument("--fps", type=int, default=DEFAULT_FPS, help="video: frames per second (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--out", type=Path, help="output file (default: RUN/mesh.FORMAT or RUN/turntable_FRAMES.FORMAT)")
    return p


def export(args: argparse.Namespace) -> Path:
    """Carry out one export; every bad input raises ValueError or RunDirectoryError before work starts."""
    from mvsdi.priors.loading import resolve_device
    from mvsdi.rundir import atomic_write_bytes, load_trained_model

    fmt = output_format(args.format, args.out)
    is_mesh = fmt in MESH_FORMATS
    resolution = args.resolution or (DEFAULT_MESH_RESOLUTION if is_mesh else DEFAULT_VIDEO_RESOLUTION)
    if is_mesh and resolution < 2:
        raise ValueError(f"--resolution must be >= 2 grid samples per axis for a mesh, got {resolution}")
    check_positive("resolution", resolution)
    check_positive("frames", args.frames)
    check_positive("fps", args.fps)
    threshold = parse_threshold(args.threshold)
    if not 0.0 <= args.min_component < 1.0:
        raise ValueError(f"--min-component must be in [0, 1), got {args.min_component}")
    device = resolve_device(args.device)
    config, model = load_trained_model(args.run, device)  # first: a run without a checkpoint says so
    out = args.out or default_output(args.run, fmt, args.frames)
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: the folder {out.parent} does not exist")
    if is_mesh:
        if threshold is None:
            threshold = surface_density(config.samples_per_ray, config.field.bound)
        mesh = field_mesh(model.field, resolution, threshold, device, args.min_component)
        atomic_write_bytes(out, mesh_bytes(mesh, fmt))
    else:
        write_video(turntable_frames(model, config, args.frames, resolution, device), out, args.fps)
    return out


def run(args: argparse.Namespace) -> int:
    from mvsdi.rundir import RunDirectoryError

    try:
        path = export(args)
    except (ValueError, RunDirectoryError, OSError) as exc:
        print(f"mvsdi: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
