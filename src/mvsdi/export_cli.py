"""``mvsdi export RUN``: a run's trained field as a mesh or a turntable video (``mvsdi.export``).

``add_parser(subparsers)`` adds the subcommand; ``run(args)`` executes it and returns the exit code
(0 done, 2 a bad input, with the reason on stderr; 130 interrupted).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from mvsdi.atomic_files import atomic_write_bytes
from mvsdi.commands import run_command
from mvsdi.export import (DEFAULT_FPS, DEFAULT_FRAMES, DEFAULT_MIN_COMPONENT, MESH_FORMATS, VIDEO_FORMATS,
                          check_positive, field_mesh, mesh_bytes, surface_density, turntable_frames, write_video)
from mvsdi.priors.loading import resolve_device
from mvsdi.rundir import load_trained_model

FORMATS = MESH_FORMATS + VIDEO_FORMATS
DEFAULT_MESH_RESOLUTION = 256
DEFAULT_VIDEO_RESOLUTION = 256


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
    def export_and_say() -> int:
        print(f"wrote {export(args)}")
        return 0

    return run_command(export_and_say)
