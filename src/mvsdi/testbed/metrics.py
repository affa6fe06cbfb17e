"""A distilled field measured against the truth of its testbed scene.

All image metrics use the evaluation views (``evaluation_cameras``: V evenly spaced azimuths from
the front, elevation 15°, distance 2, fovy 70°), albedo shading, images in [0, 1].

Alignment: the prior never learns where azimuth 0 is, so a correct object may come out turned
about the up axis. ``rotation_deg = θ`` means "the renders match the truth turned by θ about +z
(counter-clockwise seen from above)". The truth turned by θ, seen from azimuth φ, is the truth
seen from φ − θ; with V evenly spaced views and θ = k·360/V that is the view list shifted by k,
so the search over rotations is exact and costs V image comparisons.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mvsdi.cameras import evaluation_cameras, wrap_azimuth
from mvsdi.render import render
from mvsdi.testbed.scenes import ConstantBackground, Scene, get_scene, render_truth
from mvsdi.testbed.sdf import rotate_points_z

FRONT_DEG = 45.0  # |azimuth| below this is a front view
BACK_DEG = 135.0  # |azimuth| above this is a back view


def _scene(scene: Scene | str) -> Scene:
    return get_scene(scene) if isinstance(scene, str) else scene


def _nearest(queries: Tensor, keys: Tensor) -> Tensor:
    """Index of the nearest key (L2) of each query; rows are flattened images."""
    q, k = queries.flatten(1).double(), keys.flatten(1).double().to(queries.device)
    distances = q.square().sum(1, keepdim=True) - 2.0 * q @ k.T + k.square().sum(1)[None, :]
    return distances.argmin(1)


def view_r_precision(renders: Tensor, prior, scene: Scene | str) -> float:
    """Share of the renders whose nearest reference image (any pose, any scene) is of ``scene``."""
    name = scene if isinstance(scene, str) else scene.name
    images, labels = prior.union_references()
    queries = (prior.encode_images(renders.detach()) + 1.0) / 2.0  # at the prior's size, in [0, 1]
    nearest = labels[_nearest(queries, images)]
    return (nearest == prior.scene_names.index(name)).double().mean().item()


def _shift_mse(renders: Tensor, truth: Tensor) -> Tensor:
    """[V]: mean squared error of the renders against the truth shifted by k views, k = 0..V−1."""
    if renders.shape != truth.shape:
        raise ValueError(f"renders {tuple(renders.shape)} and truth {tuple(truth.shape)} must have one shape")
    r, t = renders.detach().flatten(1).double(), truth.detach().flatten(1).double().to(renders.device)
    # all V×V view distances in one product; shift k pairs render j with truth j − k
    pair = (r.square().sum(1)[:, None] - 2.0 * r @ t.T + t.square().sum(1)[None, :]).clamp_min(0.0)
    j = torch.arange(len(t), device=pair.device)
    shifts = (j[None, :] - j[:, None]) % len(t)  # [k, j] → truth index j − k
    return pair[j[None, :], shifts].sum(1) / r.numel()


def aligned_psnr(renders: Tensor, truth: Tensor) -> tuple[float, float]:
    """(PSNR in dB, rotation in degrees): PSNR against the truth turned by the best rotation."""
    mse = _shift_mse(renders, truth)
    k = int(mse.argmin())
    rotation = float(wrap_azimuth(torch.tensor(k * 360.0 / len(truth))))
    return 10.0 * math.log10(1.0 / max(float(mse[k]), 1e-12)), rotation


# Field occupancy level for the IoU: a slab of half a world unit (the scale of the objects) at this
# density has alpha 0.5. It does not depend on the grid: "alpha > 0.5 across one voxel" (ln 2 / voxel,
# 22 at 64³) is above the peak density of the Magic3D blob (10) that every run starts from, so
# both the initial blob and soft learned fields scored IoU 0. At 1.39 the blob's occupied ball
# (radius ≈ 0.45) matches its rendered silhouette.
OCCUPANCY_DENSITY = math.log(2.0) / 0.5


@torch.no_grad()
def iou_3d(field: nn.Module, scene: Scene | str, rotation_deg: float = 0.0, resolution: int = 64,
           chunk: int = 2 ** 18, threshold: float = OCCUPANCY_DENSITY) -> float:
    """Occupancy IoU on a resolution³ grid of voxel centres over the field's cube.

    The truth is occupied where sdf < 0; the field where density > ``threshold``. The field is compared as the truth turned by ``rotation_deg``:
    truth point y is looked up in the field at R(θ) y.
    """
    scene = _scene(scene)
    bound = float(field.cfg.bound)
    voxel = 2.0 * bound / resolution
    device = next(iter(field.parameters()), torch.empty(0)).device
    centres = torch.linspace(-bound + voxel / 2, bound - voxel / 2, resolution, device=device)
    grid = torch.stack(torch.meshgrid(centres, centres, centres, indexing="ij"), -1).reshape(-1, 3)
    both = either = 0
    for points in grid.split(chunk):
        truth = scene.sdf(points) < 0
        occupied = field(rotate_points_z(points, rotation_deg))[0] > threshold
        both += int((truth & occupied).sum())
        either += int((truth | occupied).sum())
    return both / either if either else 1.0


# A back view is evidence of a face on the back only when it is closer to the true front than to the
# true back by more than this share of the front-to-back distance (see ``janus_evidence``). Measured
# at 24² and 32² over the 8 scenes: the back views of the symmetric initial blob lie within ±0.04
# of the middle; those of each scene's own volume render lie at −0.09 (the car, 24², whose front and
# back differ little at that size) or below, mostly below −0.3.
JANUS_TIE = 0.1


def janus_evidence(views: Tensor, front: Tensor, back: Tensor) -> Tensor:
    """[N] in [−1, 1]: where each view lies between the true back (−1) and the true front (+1).

    (d_back − d_front) / ‖front* − back*‖, with d the L2 distance to the nearest true view of each
    set and front*, back* those nearest views. By the triangle inequality it is within [−1, 1]; it
    is +1 for a view equal to a true front, −1 for one equal to a true back, and near 0 for a view
    that looks like neither more than the other (e.g. any view of a featureless blob)."""
    v = views.detach().flatten(1).double()
    f, b = front.detach().flatten(1).double().to(v.device), back.detach().flatten(1).double().to(v.device)
    exact = "donot_use_mm_for_euclid_dist"  # the matrix-product shortcut loses the ±1 end points
    d_front, i_front = torch.cdist(v, f, compute_mode=exact).min(1)
    d_back, i_back = torch.cdist(v, b, compute_mode=exact).min(1)
    scale = (f[i_front] - b[i_back]).norm(dim=1).clamp_min(1e-12)
    return ((d_back - d_front) / scale).clamp(-1.0, 1.0)


def janus_score(renders: Tensor, truth: Tensor, rotation_deg: float = 0.0, azimuth_deg: Tensor | None = None,
                tie: float = JANUS_TIE) -> float:
    """Share of the back views that look like the true front; ties count as half (no evidence).

    After undoing the alignment rotation, each back view (|azimuth| > 135°) is placed between the
    true front views (|azimuth| < 45°) and the true back views by ``janus_evidence``: above ``tie``
    it counts 1 (a front on the back), below −``tie`` 0, in between ½. 0 for a correct object, 1
    when every back view shows a front, ½ for an object that shows no front/back difference (the
    symmetric initial blob). Without the tie rule the blob scored 1: all its identical back views
    picked the same nearest truth view, which happened to be a front."""
    v = len(truth)
    azimuth = wrap_azimuth(azimuth_deg if azimuth_deg is not None else evaluation_cameras(v).azimuth_deg).abs()
    k = round(rotation_deg / (360.0 / v))
    aligned = renders.detach().roll(-k, 0)  # aligned[j] is the render of what truth[j] shows
    back, front = azimuth > BACK_DEG, azimuth < FRONT_DEG
    if not back.any():
        return 0.0
    evidence = janus_evidence(aligned[back], truth[front], truth[back])
    votes = torch.where(evidence > tie, 1.0, torch.where(evidence < -tie, 0.0, 0.5))
    return votes.mean().item()


def diverged(renders: Tensor, opacity: Tensor, min_opacity: float = 0.02, max_opacity: float = 0.95,
             max_saturated: float = 0.9) -> tuple[bool, str]:
    """(True, reason) for a run that produced nothing usable: non-finite, empty, or saturated."""
    if not (torch.isfinite(renders).all() and torch.isfinite(opacity).all()):
        return True, "non-finite values in the renders"
    mean = float(opacity.mean())
    if mean < min_opacity:
        return True, f"empty: mean opacity {mean:.3f} < {min_opacity}"
    if mean > max_opacity:
        return True, f"saturated: mean opacity {mean:.3f} > {max_opacity} (the views are filled)"
    clipped = float(((renders <= 0.01) | (renders >= 0.99)).double().mean())
    if clipped > max_saturated:
        return True, f"saturated: {clipped:.0%} of the colour values are clipped at 0 or 1"
    return False, ""


@torch.no_grad()
def render_views(field: nn.Module, background: nn.Module, n_views: int, size: int, n_samples: int = 64,
                 batch: int = 5) -> tuple[Tensor, Tensor]:
    """Albedo renders [V, 3, s, s] and opacity [V, 1, s, s] of the evaluation views."""
    device = next(iter(field.parameters()), torch.empty(0)).device
    cameras = evaluation_cameras(n_views).to(device)
    rgb, opacity = [], []
    for start in range(0, n_views, batch):
        out = render(field, background, cameras[start:start + batch], size, size, n_samples=n_samples,
                     shading="albedo", need_normals=False)
        rgb.append(out.rgb.permute(0, 3, 1, 2))
        opacity.append(out.opacity.permute(0, 3, 1, 2))
    return torch.cat(rgb).cpu(), torch.cat(opacity).cpu()


def evaluate_field(field: nn.Module, background: nn.Module, scene: Scene | str, prior, *, n_views: int = 50,
                   size: int | None = None, n_samples: int = 64, truth_background: bool = True,
                   iou_resolution: int = 64) -> dict:
    """All testbed metrics of a field. With ``truth_background`` (default) the field is composited
    over the testbed's grey instead of its learned background, so the metrics judge the object."""
    sky = ConstantBackground() if truth_background else background
    renders, opacity = render_views(field, sky, n_views, size or prior.image_size, n_samples)
    return evaluate_renders(renders, opacity, field, scene, prior, iou_resolution)


def evaluate_renders(renders: Tensor, opacity: Tensor, field: nn.Module, scene: Scene | str, prior,
                     iou_resolution: int = 64) -> dict:
    """All testbed metrics from the field's evaluation-view renders (``render_views``) and the
    field itself (for the 3D IoU), so a caller that also needs the renders draws them once."""
    scene = _scene(scene)
    n_views, size = renders.shape[0], renders.shape[-1]
    bad, reason = diverged(renders, opacity)
    result = {"scene": scene.name, "views": n_views, "size": size, "mean_opacity": float(opacity.mean()),
              "diverged": bad, "diverged_reason": reason}
    if not torch.isfinite(renders).all():
        return {**result, "psnr": float("nan"), "rotation_deg": float("nan"), "r_precision": float("nan"),
                "janus": float("nan"), "iou": float("nan")}
    truth = render_truth(scene, evaluation_cameras(n_views), size)
    psnr, rotation = aligned_psnr(renders, truth)
    return {**result, "psnr": psnr, "rotation_deg": rotation,
            "r_precision": view_r_precision(renders, prior, scene.name),
            "janus": janus_score(renders, truth, rotation), "iou": iou_3d(field, scene, rotation, iou_resolution)}
