"""A distilled field measured against the truth of its testbed scene.

All image metrics use the evaluation views (``evaluation_cameras``: V evenly spaced azimuths from
the front, elevation 15°, distance 2, fovy 70°), albedo shading, images in [0, 1]. The field's
renders (``render_views``) skip empty space with an occupancy grid of their own and take at least
``MIN_EVALUATION_SAMPLES`` samples per ray. ``SANITY_RULES`` is the order the metrics must give
candidates of known quality (docs/testbed_sanity.md).

Alignment: the prior never learns where azimuth 0 is, so a correct object may come out turned
about the up axis. ``rotation_deg = θ`` means "the renders match the truth turned by θ about +z
(counter-clockwise seen from above)". The truth turned by θ, seen from azimuth φ, is the truth
seen from φ − θ; with V evenly spaced views and θ = k·360/V that is the view list shifted by k,
so the search over rotations is exact and costs V image comparisons.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mvsdi.cameras import evaluation_cameras, wrap_azimuth
from mvsdi.occupancy import OccupancyGrid, density_function, density_threshold_for
from mvsdi.render import RenderConfig, render
from mvsdi.testbed.scenes import (BACKGROUND, BLUR_SIGMA, ConstantBackground, Scene, SceneField, blurred_scene,
                                  get_scene, janus_twin, render_truth)
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


# The gallery of view R-precision: each candidate scene's truth seen from this many evenly spaced azimuths
# at the evaluation views' elevation, distance and fovy (every 7.2°).
GALLERY_VIEWS = 50


@functools.lru_cache(maxsize=64)
def _gallery_of(scene: Scene, size: int, n_views: int = GALLERY_VIEWS) -> Tensor:
    """[n_views, 3, size, size]: the scene's traced truth at the evaluation cameras (cached: read only)."""
    return render_truth(scene, evaluation_cameras(n_views), size)


def r_precision_gallery(prior, size: int) -> tuple[Tensor, Tensor]:
    """(images [G, 3, s, s], labels [G]) of view R-precision: every scene the prior knows, seen from
    ``GALLERY_VIEWS`` azimuths, label = its index in ``prior.scene_names``, then the empty image
    (the constant grey, label −1: no object)."""
    names = list(prior.scene_names) if hasattr(prior, "scene_names") else list(prior)
    views = [_gallery_of(get_scene(name), size) for name in names]
    images = torch.cat([*views, torch.full_like(views[0][:1], BACKGROUND)])
    labels = torch.cat([torch.full((len(v),), i, dtype=torch.long) for i, v in enumerate(views)] +
                       [torch.full((1,), -1, dtype=torch.long)])
    return images, labels


def view_r_precision(renders: Tensor, prior, scene: Scene | str) -> float:
    """Share of the renders whose nearest gallery image (L2) shows ``scene``.

    The gallery (``r_precision_gallery``) holds every scene the prior knows (its prompts; ``prior``
    may also be a list of scene names) seen from 50 azimuths at the evaluation views' elevation,
    distance and fovy, and the empty image. Each render is matched on its own, so an object turned
    about the up axis still scores 1, and so does a Janus object whose every view looks like the
    scene from some side (the Janus score judges that). A render nearest to another scene or to the
    empty image counts 0: the study's initial blob is a nearly invisible grey ball, and against the
    prior's reference images (random training poses, larger in the image than the evaluation views)
    without the empty image it was nearest to the thin lamp in all 50 views, scoring 1.0 on the lamp."""
    name = scene if isinstance(scene, str) else scene.name
    names = list(prior.scene_names) if hasattr(prior, "scene_names") else list(prior)
    images, labels = r_precision_gallery(names, renders.shape[-1])
    nearest = labels[_nearest(renders.detach().cpu(), images)]
    return (nearest == names.index(name)).double().mean().item()


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


@functools.lru_cache(maxsize=4)
def _voxel_centres(bound: float, resolution: int) -> Tensor:
    """[resolution³, 3] voxel centres over [−bound, bound]³, x slowest, on the CPU (cached: read only)."""
    voxel = 2.0 * bound / resolution
    centres = torch.linspace(-bound + voxel / 2, bound - voxel / 2, resolution)
    return torch.stack(torch.meshgrid(centres, centres, centres, indexing="ij"), -1).reshape(-1, 3)


@functools.lru_cache(maxsize=64)
def _truth_occupancy(scene: Scene, bound: float, resolution: int, chunk: int) -> Tensor:
    """[resolution³] bool: sdf < 0 at the voxel centres (cached per scene: read only)."""
    return torch.cat([scene.sdf(points) < 0 for points in _voxel_centres(bound, resolution).split(chunk)])


@torch.no_grad()
def occupancy_overlap(field: nn.Module, scene: Scene | str, rotation_deg: float = 0.0, resolution: int = 64,
                      chunk: int = 2 ** 18, threshold: float = OCCUPANCY_DENSITY) -> tuple[int, int, int]:
    """Voxels (both, the field's only, the truth's only) on a resolution³ grid of voxel centres
    over the field's cube.

    The truth is occupied where sdf < 0; the field where density > ``threshold``. The field is compared as the
    truth turned by ``rotation_deg``: truth point y is looked up in the field at R(θ) y.
    """
    scene = _scene(scene)
    device = next(iter(field.parameters()), torch.empty(0)).device
    bound = float(field.cfg.bound)
    grid, inside = _voxel_centres(bound, resolution), _truth_occupancy(scene, bound, resolution, chunk)
    both = field_only = truth_only = 0
    for points, truth in zip(grid.split(chunk), inside.split(chunk)):
        points, truth = points.to(device), truth.to(device)
        occupied = field(rotate_points_z(points, rotation_deg))[0] > threshold
        both += int((truth & occupied).sum())
        field_only += int((occupied & ~truth).sum())
        truth_only += int((truth & ~occupied).sum())
    return both, field_only, truth_only


def iou_3d(field: nn.Module, scene: Scene | str, rotation_deg: float = 0.0, resolution: int = 64,
           chunk: int = 2 ** 18, threshold: float = OCCUPANCY_DENSITY) -> float:
    """Occupancy IoU (``occupancy_overlap``): voxels occupied in both over voxels occupied in either."""
    both, field_only, truth_only = occupancy_overlap(field, scene, rotation_deg, resolution, chunk, threshold)
    either = both + field_only + truth_only
    return both / either if either else 1.0


# A back view is evidence of a face on the back only when it is closer to the true front than to the
# true back by more than this share of the front-to-back distance (see ``janus_evidence``). Measured
# (docs/testbed_sanity.md) over the 8 scenes with the metric renders (64 samples per ray), the study's initial
# field of seeds 0–2: its back views lie within ±0.05 of the middle at 32² and ±0.07 at 64²; at 24² they reach
# +0.12 on the duck and the lamp, so below 32² the band no longer holds. Each scene's own volume render lies at
# −0.16 or below at 32², its Janus twin's back views at +0.08 or above (a few inside the band count ½).
JANUS_TIE = 0.1


def janus_evidence(views: Tensor, front: Tensor, back: Tensor, mirrored: bool = True) -> Tensor:
    """[N] in [−1, 1]: where each view lies between the true back (−1) and the true front (+1).

    (d_back − d_front) / ‖front* − back*‖, with d the L2 distance to the nearest true view of each
    set and front*, back* those nearest views. By the triangle inequality it is within [−1, 1]; it
    is +1 for a view equal to a true front, −1 for one equal to a true back, and near 0 for a view
    that looks like neither more than the other (e.g. any view of a featureless blob).

    With ``mirrored`` (default) each set also holds its views flipped left to right: a front seen on
    the back is a front, mirrored or not. An object whose back shows its front (``janus_twin``)
    shows it mirrored, and on a scene that is not left-right symmetric it is then further from the
    true fronts: the mug twin's weakest back view lay at +0.12 without the flips (32², 0.02 above
    the tie band), +0.29 with them; no truth, blob or twin score of the 8 scenes changed."""
    v = views.detach().flatten(1).double()
    if mirrored:
        front, back = torch.cat([front, front.flip(-1)]), torch.cat([back, back.flip(-1)])
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


# How the metric renders skip empty space: by the grid alone (``evaluation_grid``; the training renderer's 32³),
# with no alpha test and no early termination, so every sample in an occupied cell is evaluated once (with them,
# the renderer's selection pass evaluates the density of every such sample before evaluating the kept ones
# again). The grid is the only error: a sample it drops had, by the grid's estimate, alpha <= GRID_ALPHA.
# On a trained small-study cell (SDS K1, mug) at 64 samples: 13.0 field evaluations per ray instead of 62.3
# dense, renders within 4.5e-4 of the dense ones; with the training renderer's alpha test at 0.01 the thin haze
# of the field went missing (up to 0.055 per pixel, +0.17 dB of PSNR). ``DENSE`` renders every sample.
EVALUATION_RENDER = RenderConfig(alpha_threshold=0.0, transmittance_threshold=0.0)
GRID_ALPHA = 1e-3  # the grid's level: the density at which a sample of the longest step has this alpha
GRID_DILATION = 1  # cells: an evaluation grid marks every neighbour of an occupied cell occupied too
# Samples per ray of the metric renders, at least. The evaluation rays cross the field's cube over up to 3.0
# units, so 24 samples (the small study's training count) step up to 0.12, wider than the thinnest parts (the
# chair's back rest is 0.07 thick, the lamp's arms 0.06): the truth's own renders lost them, and the chair's
# truth scored Janus 0.69 and R-precision 0.40 (with the prior's references). At 64 the step is at most 0.047.
MIN_EVALUATION_SAMPLES = 64


@torch.no_grad()
def evaluation_grid(field: nn.Module, n_samples: int, config: RenderConfig = EVALUATION_RENDER,
                    dilation: int = GRID_DILATION, level_alpha: float = GRID_ALPHA) -> OccupancyGrid | None:
    """An occupancy grid of ``field`` for its metric renders alone (None when ``config`` has no grid).

    Built from the field being measured, never the training grid, so measuring changes no state and
    does not depend on when the training grid was refreshed. A cell is occupied when its estimate
    exceeds ``density_threshold_for(level_alpha, n_samples, bound)``. ``OccupancyGrid.initialise``
    takes each cell's density at 9 points; a sharp thin part (a 0.03-radius lamp arm of a truth
    ``SceneField``) can slip between them, so the estimate is then max-pooled over ``dilation``
    cells around each cell: a part missed in its own cell is kept if a neighbouring cell sees it
    (without it the lamp's truth renders lost parts, up to 0.4 per pixel). Deterministic: no random
    draw.
    """
    if not config.occupancy_grid:
        return None
    device = next(iter(field.parameters()), torch.empty(0)).device
    bound = float(field.cfg.bound)
    grid = OccupancyGrid(config.grid_resolution, bound, density_threshold_for(level_alpha, n_samples, bound),
                         config.grid_decay, device)
    grid.initialise(density_function(field))
    if dilation > 0:
        k = 2 * dilation + 1
        pooled = F.max_pool3d(grid.values[None, None], k, stride=1, padding=dilation)[0, 0]
        grid.load_state_dict({"values": pooled, "period": grid.period})
    return grid


@torch.no_grad()
def render_views(field: nn.Module, background: nn.Module, n_views: int, size: int,
                 n_samples: int = MIN_EVALUATION_SAMPLES, batch: int | None = None,
                 config: RenderConfig = EVALUATION_RENDER, min_samples: int = MIN_EVALUATION_SAMPLES,
                 stats: dict | None = None) -> tuple[Tensor, Tensor]:
    """Albedo renders [V, 3, s, s] and opacity [V, 1, s, s] of the evaluation views.

    With ``max(n_samples, min_samples)`` samples per ray: callers pass their training count, and
    below 64 the metric renders miss thin parts (see ``MIN_EVALUATION_SAMPLES``).

    Empty space is skipped as ``config`` says, with a grid of the field's own (``evaluation_grid``);
    ``DENSE`` evaluates every sample. Per pixel the skipped render differs from the dense one by at
    most 2E, E the dense weight of the samples it drops: those in cells the grid leaves empty (and,
    if ``config`` sets them, those with alpha <= its alpha threshold, plus its transmittance
    threshold); ``mvsdi.render``'s error bound, checked with the metrics in
    ``tests/test_testbed_metrics.py``.
    ``batch`` views go to the renderer at a time (default: all of them; the renderer bounds its own
    memory by ``config.chunk_samples``). A ``stats`` dict receives the field evaluations per ray
    (``samples_per_ray``: colour and density; ``density_samples_per_ray``: the selection pass), the
    samples per ray used and the grid's occupied fraction.
    """
    device = next(iter(field.parameters()), torch.empty(0)).device
    cameras = evaluation_cameras(n_views).to(device)
    n_samples = max(int(n_samples), int(min_samples))
    grid = evaluation_grid(field, n_samples, config)
    rgb, opacity = [], []
    step = batch or n_views
    for start in range(0, n_views, step):
        out = render(field, background, cameras[start:start + step], size, size, n_samples=n_samples,
                     shading="albedo", need_normals=False, occupancy=grid, alpha_threshold=config.alpha_threshold,
                     transmittance_threshold=config.transmittance_threshold, chunk_samples=config.chunk_samples)
        rgb.append(out.rgb.permute(0, 3, 1, 2))
        opacity.append(out.opacity.permute(0, 3, 1, 2))
        if stats is not None:
            share = len(cameras[start:start + step]) / n_views
            for key in ("samples_per_ray", "density_samples_per_ray"):
                stats[key] = stats.get(key, 0.0) + share * out.stats.get(key, 0.0)
    if stats is not None:
        stats.update(n_samples=n_samples, occupied_fraction=grid.occupied_fraction if grid is not None else 1.0)
    return torch.cat(rgb).cpu(), torch.cat(opacity).cpu()


def evaluate_field(field: nn.Module, background: nn.Module, scene: Scene | str, prior, *, n_views: int = 50,
                   size: int | None = None, n_samples: int = MIN_EVALUATION_SAMPLES, truth_background: bool = True,
                   iou_resolution: int = 64, render_config: RenderConfig = EVALUATION_RENDER) -> dict:
    """All testbed metrics of a field. With ``truth_background`` (default) the field is composited
    over the testbed's grey instead of its learned background, so the metrics judge the object.
    ``render_config``: how the evaluation views skip empty space (``render_views``)."""
    sky = ConstantBackground() if truth_background else background
    renders, opacity = render_views(field, sky, n_views, size or prior.image_size, n_samples, config=render_config)
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
    truth = _gallery_of(scene, size, n_views)  # the truth at the evaluation views (cached)
    psnr, rotation = aligned_psnr(renders, truth)
    return {**result, "psnr": psnr, "rotation_deg": rotation,
            "r_precision": view_r_precision(renders, prior, scene.name),
            "janus": janus_score(renders, truth, rotation), "iou": iou_3d(field, scene, rotation, iou_resolution)}


# ------------------------------------------------------------------------------------------------
# sanity of the metrics: candidates whose order is known (benchmarks/testbed_sanity.py, docs/testbed_sanity.md)

SANITY_CANDIDATES = ("truth", "janus_twin", "blurred", "blob", "other")


def sanity_candidates(scene: Scene | str, blob: nn.Module, other: Scene | str,
                      blur_sigma: float = BLUR_SIGMA) -> dict[str, nn.Module]:
    """The fields measured against ``scene``: its own volume field, its Janus twin (back replaced
    by front), its blurred version, the study's initial field ``blob``, and ``other`` scene."""
    scene, other = _scene(scene), _scene(other)
    return {"truth": SceneField(scene), "janus_twin": SceneField(janus_twin(scene)),
            "blurred": SceneField(blurred_scene(scene, blur_sigma)), "blob": blob, "other": SceneField(other)}


@dataclass(frozen=True)
class SanityRule:
    """``slack(rows) >= 0`` must hold: rows maps a candidate to its metrics (``evaluate_field``)."""
    metric: str
    text: str
    slack: Callable[[dict[str, dict]], float]


def _wrong(rows: dict[str, dict], metric: str) -> float:
    """The better of the two wrong objects (the blob and the other scene)."""
    return max(rows["blob"][metric], rows["other"][metric])


# The intended order, metric by metric, with its margin. R-precision: the views look like the scene (from some
# side: blind to Janus by design). PSNR: pixel agreement, so the blurred truth lies between the truth and the
# wrong objects; a twin loses half its views (whether it beats the empty-looking blob depends on colours: the
# penguin twin's white back is further from the black back than grey is). IoU: geometry only (the mug's twin has
# the mug's shape, the logo is colour), so the twin is at most the truth. Janus: the twin shows a front on its
# back, the blob has neither (the neutral ½), the truth and the blurred truth have the right back; the other
# scene has no front of this scene to show, so its Janus score means nothing and is not ordered.
SANITY_RULES = (
    SanityRule("r_precision", "truth ≥ 0.9", lambda r: r["truth"]["r_precision"] - 0.9),
    SanityRule("r_precision", "truth − max(blob, other) ≥ 0.5",
               lambda r: r["truth"]["r_precision"] - _wrong(r, "r_precision") - 0.5),
    SanityRule("psnr", "truth − blurred ≥ 0.5 dB", lambda r: r["truth"]["psnr"] - r["blurred"]["psnr"] - 0.5),
    SanityRule("psnr", "truth − twin ≥ 0.5 dB", lambda r: r["truth"]["psnr"] - r["janus_twin"]["psnr"] - 0.5),
    SanityRule("psnr", "blurred − max(blob, other) ≥ 0.5 dB",
               lambda r: r["blurred"]["psnr"] - _wrong(r, "psnr") - 0.5),
    SanityRule("iou", "truth ≥ 0.9", lambda r: r["truth"]["iou"] - 0.9),
    SanityRule("iou", "truth − blurred ≥ 0.02", lambda r: r["truth"]["iou"] - r["blurred"]["iou"] - 0.02),
    SanityRule("iou", "truth ≥ twin", lambda r: r["truth"]["iou"] - r["janus_twin"]["iou"]),
    SanityRule("iou", "blurred − max(blob, other) ≥ 0.05", lambda r: r["blurred"]["iou"] - _wrong(r, "iou") - 0.05),
    SanityRule("janus", "twin ≥ 0.8", lambda r: r["janus_twin"]["janus"] - 0.8),
    SanityRule("janus", "abs(blob − ½) ≤ 0.1", lambda r: 0.1 - abs(r["blob"]["janus"] - 0.5)),
    SanityRule("janus", "truth ≤ 0.1", lambda r: 0.1 - r["truth"]["janus"]),
    SanityRule("janus", "blurred ≤ 0.2", lambda r: 0.2 - r["blurred"]["janus"]),
)


def sanity_checks(rows: dict[str, dict],
                  rules: tuple[SanityRule, ...] = SANITY_RULES) -> list[tuple[SanityRule, float]]:
    """(rule, slack) for every rule; the ordering holds where every slack is >= 0."""
    return [(rule, float(rule.slack(rows))) for rule in rules]
