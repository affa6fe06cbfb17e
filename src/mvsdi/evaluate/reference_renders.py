"""The reference protocol's scored views of a run: found in ``RUN/renders_reference/`` or rendered
from the run's checkpoint.

Rendered as ``mvsdi generate`` renders its own evaluation views (``generate.evaluation_renders``):
the field and background of ``checkpoint.pt``, albedo shading, the run's samples per ray and
evaluation resolution, empty-space skipping with the occupancy grid saved in the checkpoint. Only
the cameras differ (``reference_cameras``). Each view is ``NNN.png``, NNN its index on the
reference's 120-view turntable; only the 50 scored views are rendered (the other 70 would never
be read). ``views.json`` records what the views were rendered for (cameras, resolution, samples,
the run's step count), so a run trained further gets them rendered again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import imageio.v3 as iio
import torch

from mvsdi.atomic_files import atomic_write_bytes, atomic_write_json
from mvsdi.cameras import Cameras, spherical_to_cartesian, wrap_azimuth
from mvsdi.config import RunConfig
from mvsdi.distill import Model
from mvsdi.evaluate.protocol import (REFERENCE, REFERENCE_DISTANCE, REFERENCE_ELEVATION_DEG, REFERENCE_FOVY_DEG,
                                     REFERENCE_TURNTABLE_VIEWS, reference_turntable_azimuths, reference_view_indices)
from mvsdi.evaluate.run_folder import RunError
from mvsdi.images import to_uint8
from mvsdi.occupancy import OccupancyGrid, density_function, density_threshold_for
from mvsdi.render import render
from mvsdi.rundir import CHECKPOINT, CONFIG, SUMMARY, read_checkpoint, read_json

MANIFEST = "views.json"


def reference_cameras(indices: Sequence[int]) -> Cameras:
    """The turntable cameras at ``indices``: built like ``evaluation_cameras`` (light at the camera,
    no jitter), at the reference's azimuths."""
    azimuth = wrap_azimuth(reference_turntable_azimuths()[list(indices)])
    n = len(azimuth)
    elevation = torch.full((n,), REFERENCE_ELEVATION_DEG)
    distance = torch.full((n,), REFERENCE_DISTANCE)
    eye = spherical_to_cartesian(azimuth, elevation, distance)
    return Cameras(azimuth, elevation, distance, torch.full((n,), REFERENCE_FOVY_DEG), eye.clone())


def view_paths(run_path: Path) -> list[tuple[int, Path]]:
    """(turntable index, file) of every scored view."""
    folder = Path(run_path) / REFERENCE.renders
    return [(i, folder / f"{i:03d}.png") for i in reference_view_indices()]


def wanted_views(run_path: Path) -> dict[str, Any]:
    """What the views must have been rendered for to be reused: cameras, render settings, the run's state."""
    config, summary = read_json(run_path / CONFIG, {}), read_json(run_path / SUMMARY, {})
    indices = reference_view_indices()
    return {"turntable_views": REFERENCE_TURNTABLE_VIEWS, "indices": indices,
            "azimuth_deg": [round(float(a), 6) for a in reference_turntable_azimuths()[indices]],
            "elevation_deg": REFERENCE_ELEVATION_DEG, "distance": REFERENCE_DISTANCE, "fovy_deg": REFERENCE_FOVY_DEG,
            "resolution": config.get("eval_resolution"), "samples_per_ray": config.get("samples_per_ray"),
            # a resumed run has more steps: its field changed, so its views must be rendered again
            "run_state": {k: summary.get(k) for k in ("status", "steps", "guidance_evaluations")}}


def availability_problem(run_path: Path) -> str | None:
    """Why the reference views can be neither found nor rendered (None: they can)."""
    run_path = Path(run_path)
    if (run_path / CHECKPOINT).is_file() or all(p.is_file() for _, p in view_paths(run_path)):
        return None
    return (f"{run_path} holds neither the reference protocol's 50 views ({REFERENCE.renders}/NNN.png, NNN the "
            f"turntable index) nor a {CHECKPOINT} to render them from. Regenerate the run with `mvsdi generate`, "
            "or evaluate its own renders with --protocol ours")


def find_or_render(run_path: Path, device: torch.device | str) -> tuple[list[tuple[int, Path]], str]:
    """The scored views' (index, file), rendering them first when needed; and where they came from."""
    run_path = Path(run_path)
    views = view_paths(run_path)
    complete = all(p.is_file() for _, p in views)
    wanted = wanted_views(run_path)
    if complete and read_json(run_path / REFERENCE.renders / MANIFEST, {}).get("views") == wanted:
        return views, f"{REFERENCE.renders}/ (rendered earlier for this state of the run)"
    if (run_path / CHECKPOINT).is_file():
        render_views(run_path, [i for i, _ in views], wanted, device)
        return views, f"{REFERENCE.renders}/ (rendered now from {CHECKPOINT})"
    if complete:  # e.g. the reference's own test renders copied in: nothing to check them against
        return views, f"{REFERENCE.renders}/ (found; no {CHECKPOINT} to check or render them)"
    raise RunError(availability_problem(run_path))


# ---------------------------------------------------------------------------------------------
# rendering from the checkpoint


def saved_grid(config: RunConfig, state: dict[str, Any] | None, field, device: torch.device) -> OccupancyGrid | None:
    """The run's occupancy grid as its checkpoint saved it (None: the run renders densely); built
    from the field when the checkpoint has none, as ``Distiller.current_grid`` does."""
    r = config.render
    if not r.occupancy_grid:
        return None
    threshold = density_threshold_for(r.alpha_threshold, config.samples_per_ray, config.field.bound)
    grid = OccupancyGrid(r.grid_resolution, config.field.bound, threshold, r.grid_decay, device)
    grid.load_state_dict(state)
    if not grid.ready:
        grid.initialise(density_function(field))
    return grid


def _png(image: torch.Tensor) -> bytes:
    return iio.imwrite("<bytes>", to_uint8(image), extension=".png")


@torch.no_grad()
def render_views(run_path: Path, indices: Sequence[int], wanted: dict[str, Any], device: torch.device | str) -> None:
    """Render the turntable views ``indices`` of the run's checkpoint into ``renders_reference/``."""
    device = torch.device(device)
    started = time.perf_counter()
    checkpoint = read_checkpoint(run_path)
    config = RunConfig.from_dict(checkpoint["config"])
    model = Model.create(config, device)
    model.load_state_dict(checkpoint["model"])
    model.field.eval()
    grid = saved_grid(config, checkpoint.get("occupancy"), model.field, device)
    r, size = config.render, wanted["resolution"] or config.eval_resolution
    folder = Path(run_path) / REFERENCE.renders
    folder.mkdir(exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)  # the folder is trusted again only once every view is rewritten
    cameras = reference_cameras(indices)
    for k, index in enumerate(indices):
        out = render(model.field, model.background, cameras[k].to(device), size, size,
                     n_samples=wanted["samples_per_ray"] or config.samples_per_ray, shading="albedo",
                     need_normals=False, occupancy=grid, alpha_threshold=r.alpha_threshold,
                     transmittance_threshold=r.transmittance_threshold, chunk_samples=r.chunk_samples)
        atomic_write_bytes(folder / f"{index:03d}.png", _png(out.rgb[0]))
    atomic_write_json(folder / MANIFEST, {"views": wanted, "rendered": {
        "device": str(device), "seconds": round(time.perf_counter() - started, 3)}})
