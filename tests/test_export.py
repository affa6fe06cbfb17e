"""`mvsdi export`: meshes of a known field, turntables, and the command's errors."""

import math
import re

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import trimesh
from torch import nn

from mvsdi import export
from mvsdi.cli import main
from mvsdi.field import FieldConfig
from mvsdi.render import composite_weights, ray_box, sample_distances


class Spheres(nn.Module):
    """Field interface over balls with sigmoid edges: the level set density = level is a known sphere.

    Albedo is a function of position, (x + 1) / 2 per channel, so vertex colours can be checked.
    """

    def __init__(self, balls, peak: float, edge: float = 0.01, bound: float = 1.0):
        super().__init__()
        self.cfg = FieldConfig(bound=bound)
        self.balls, self.peak, self.edge = balls, peak, edge

    def level_radius(self, radius: float, level: float) -> float:
        """Radius where peak·sigmoid((radius - r) / edge) = level."""
        p = level / self.peak
        return radius - self.edge * math.log(p / (1.0 - p))

    def forward(self, x):
        inside = torch.stack([(r - (x - torch.tensor(c)).norm(dim=-1)) / self.edge for c, r in self.balls]).amax(0)
        return self.peak * torch.sigmoid(inside), ((x + 1.0) / 2.0).clamp(0.0, 1.0)


LEVEL = export.surface_density(samples_per_ray=64, bound=1.0)


def test_surface_density_is_where_one_render_step_absorbs_half_the_light():
    # an axis-aligned ray crossing the cube face to face, split as the renderer splits it
    near, far, _ = ray_box(torch.tensor([[-3.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]]), 1.0)
    _, delta = sample_distances(near, far, 64, perturb=False, generator=None)
    weights = composite_weights(torch.tensor([[LEVEL]]), delta)
    assert weights.item() == pytest.approx(0.5, abs=1e-6)


def test_sphere_mesh_has_the_area_volume_colours_and_orientation_of_the_sphere():
    centre, radius = (0.1, 0.0, 0.2), 0.5
    field = Spheres([(centre, radius)], peak=100 * LEVEL)
    mesh = export.field_mesh(field, resolution=40, threshold=LEVEL)
    r = field.level_radius(radius, LEVEL)
    assert mesh.is_watertight and mesh.is_winding_consistent
    # log-density marching cubes at 40³ (voxel 0.05): within 2 % (raw density would be ~+7 %)
    assert mesh.area == pytest.approx(4 * math.pi * r ** 2, rel=0.02)
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * r ** 3, rel=0.02)  # positive: faces wound outwards
    # file frame is y-up with the front (+x) towards +z: world (x, y, z) -> (y, z, x)
    assert mesh.centroid == pytest.approx([0.0, 0.2, 0.1], abs=0.01)
    # red = (world x + 1) / 2 and world x is the file's z
    red = mesh.visual.vertex_colors[:, 0] / 255.0
    assert np.abs(red - (mesh.vertices[:, 2] + 1) / 2).max() < 2.5 / 255


def test_surface_cut_by_the_cube_is_closed():
    field = Spheres([((0.0, 0.0, 0.0), 1.3)], peak=100 * LEVEL)  # pokes out of every face of the cube
    mesh = export.field_mesh(field, resolution=20, threshold=LEVEL)
    assert mesh.is_watertight
    assert 6.0 < mesh.volume <= 8.0 + 1e-6  # most of the [-1, 1]³ cube


def test_small_floaters_are_dropped_only_when_asked():
    field = Spheres([((0.0, 0.0, 0.0), 0.5), ((0.75, 0.75, 0.75), 0.12)], peak=100 * LEVEL)
    assert len(export.field_mesh(field, 24, LEVEL, min_component=0.0).split(only_watertight=False)) == 2
    kept = export.field_mesh(field, 24, LEVEL, min_component=0.1)
    assert len(kept.split(only_watertight=False)) == 1
    assert kept.volume == pytest.approx(4 / 3 * math.pi * field.level_radius(0.5, LEVEL) ** 3, rel=0.05)


def test_field_without_a_surface_is_an_error_not_an_empty_mesh():
    fog = Spheres([((0.0, 0.0, 0.0), 0.5)], peak=0.9 * LEVEL)
    with pytest.raises(export.EmptyMeshError, match="no surface"):
        export.field_mesh(fog, 16, LEVEL)


def test_no_surface_is_found_on_the_coarse_grid_first_and_the_message_gives_a_threshold_that_meshes(monkeypatch):
    """A barely trained run spent 189 s on a 256³ grid to find no surface, which 64³ finds in 6 s."""
    sampled = []
    sample = export.sample_density
    monkeypatch.setattr(export, "sample_density", lambda field, r, device="cpu": sampled.append(r) or sample(field, r))
    peak = 0.9 * LEVEL
    fog = Spheres([((0.0, 0.0, 0.0), 0.5)], peak=peak)
    with pytest.raises(export.EmptyMeshError) as error:
        export.field_mesh(fog, 256, LEVEL)
    assert sampled == [export.COARSE_RESOLUTION]  # the 256³ grid was never sampled
    message = str(error.value)
    assert f"has density {peak:.3g}" in message and f"threshold {LEVEL:.3g}" in message
    suggested = float(re.search(r"--threshold ([0-9.e+-]+)", message).group(1))
    assert 0 < suggested < peak and len(export.field_mesh(fog, 16, suggested).faces) > 0
    sampled.clear()
    export.field_mesh(Spheres([((0.0, 0.0, 0.0), 0.5)], peak=100 * LEVEL), 72, LEVEL)
    assert sampled == [export.COARSE_RESOLUTION, 72]  # a surface: the coarse look, then the grid asked for


def test_an_empty_field_is_told_that_no_threshold_helps():
    with pytest.raises(export.EmptyMeshError, match="no threshold gives a surface"):
        export.require_surface(np.zeros((4, 4, 4), np.float32), 1.0)


def test_density_grid_in_chunks_equals_one_pass(monkeypatch):
    field = Spheres([((0.1, -0.2, 0.3), 0.5)], peak=100.0, edge=0.2)
    monkeypatch.setattr(export, "POINTS_PER_CHUNK", 50)  # smaller than one x-slab: one slab per call
    chunked = export.sample_density(field, 9)
    axis = torch.from_numpy(export.grid_axis(1.0, 9))
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1)
    assert np.allclose(chunked, field(grid)[0].numpy(), rtol=1e-6)


def test_depth_images_share_one_scale_near_white_far_dark_empty_black():
    depth = [torch.full((2, 2, 1), 1.0), torch.full((2, 2, 1), 3.0)]
    opacity = [torch.ones(2, 2, 1), torch.ones(2, 2, 1)]
    opacity[1][0, 0] = 0.0
    near, far = export.depth_images(depth, opacity)
    assert near.shape == (2, 2, 3)
    assert torch.all(near == 1.0)
    assert far[0, 0].eq(0.0).all() and far[1, 1].eq(0.0).all()  # empty pixel and farthest hit: both black


# ------------------------------------------------------------------------------------------------
# the command, on a real (tiny) run directory


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    assert main(["generate", "a mug", "--model", "tiny", "--budget", "4", "--resolution", "16", "--samples-per-ray",
                 "8", "--eval-views", "4", "--eval-resolution", "16", "--out", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    return out


@pytest.mark.parametrize("fmt", export.MESH_FORMATS)
def test_export_mesh_formats_read_back(run_dir, fmt):
    assert main(["export", str(run_dir), "--format", fmt, "--resolution", "24", "--device", "cpu"]) == 0
    mesh = trimesh.load(run_dir / f"mesh.{fmt}", force="mesh")
    assert len(mesh.faces) > 100 and mesh.is_watertight  # the start blob survives 4 steps: a closed ball
    assert mesh.visual.kind == "vertex" and len(mesh.visual.vertex_colors) == len(mesh.vertices)
    assert not list(run_dir.glob(".*.tmp"))  # written through a temporary file, nothing left behind


@pytest.mark.parametrize("fmt", export.VIDEO_FORMATS)
def test_turntable_has_the_asked_frames_and_size(run_dir, tmp_path, fmt):
    out = tmp_path / f"spin.{fmt}"  # the format follows --out's suffix
    assert main(["export", str(run_dir), "--out", str(out), "--frames", "5", "--resolution", "16",
                 "--device", "cpu"]) == 0
    frames = iio.imread(out, index=None)
    assert frames.shape == (5, 16, 3 * 16, 3)
    assert frames.std() > 1.0  # RGB | normals | depth, not a blank video


def test_turntable_frames_panels(run_dir):
    from mvsdi.rundir import load_trained_model

    config, model = load_trained_model(run_dir)
    frames = export.turntable_frames(model, config, frames=2, resolution=12, device="cpu")
    assert len(frames) == 2 and frames[0].shape == (12, 36, 3) and frames[0].dtype == np.uint8
    rgb, normals, depth = np.split(frames[0].astype(int), 3, axis=1)
    corner = (0, 0)  # the corner ray misses the blob: the sky in RGB, black in normals and depth
    assert normals[corner].sum() == 0 and depth[corner].sum() == 0 and rgb[corner].sum() > 0
    centre = (6, 6)
    assert depth[centre].min() > 0 and normals[centre].sum() > 0


def test_export_writes_no_file_for_a_run_without_surface(run_dir, tmp_path, capsys):
    out = tmp_path / "m.glb"
    assert main(["export", str(run_dir), "--out", str(out), "--threshold", "1e6", "--resolution", "8",
                 "--device", "cpu"]) == 2
    assert "no surface" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--format", "stl"], "glb, obj, ply, mp4, gif"),
    (["--format", "gif", "--frames", "0"], "--frames must be >= 1"),
    (["--format", "glb", "--resolution", "1"], "--resolution must be >= 2"),
    (["--threshold", "-3"], "positive"),
    (["--format", "obj", "--out", "x.glb"], "make them agree"),
    (["--out", "/nonexistent-folder/m.ply"], "does not exist"),
])
def test_bad_arguments_exit_2_with_the_reason(run_dir, capsys, argv, message):
    assert main(["export", str(run_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mvsdi: error:") and message in err


def test_run_without_checkpoint_exits_2(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["export", str(tmp_path), "--format", "glb"]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err
    assert not (tmp_path / "mesh.glb").exists()
