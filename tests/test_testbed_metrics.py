"""Testbed metrics: alignment, IoU, R-precision, Janus score, divergence, and the whole evaluation."""

import math

import pytest
import torch

from mvsdi.cameras import evaluation_cameras
from mvsdi.field import Background, Field, FieldConfig
from mvsdi.testbed import (SCENES, ConstantBackground, IdealDenoiserPrior, SceneField, aligned_psnr, diverged,
                           evaluate_field, iou_3d, janus_score, render_truth, view_r_precision)
from mvsdi.testbed.metrics import render_views

SIZE = 24
STEP = 360.0 / 50


@pytest.fixture(scope="module")
def truth():
    return render_truth(SCENES["chair"], evaluation_cameras(50), SIZE)


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    return IdealDenoiserPrior(scenes=["chair", "duck", "car", "penguin"], n_references=64, image_size=SIZE,
                              cache_dir=tmp_path_factory.mktemp("testbed-cache"))


def test_aligned_psnr_of_the_truth(truth):
    psnr, rotation = aligned_psnr(truth, truth)
    assert rotation == 0.0 and psnr >= 100.0


def test_aligned_psnr_is_invariant_to_rotating_the_truth(truth):
    noisy = (truth + 0.05 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    psnr, rotation = aligned_psnr(noisy, truth)
    assert rotation == 0.0 and 20.0 < psnr < 40.0
    for shift in (1, 7, 25, 43):
        turned_psnr, turned_rotation = aligned_psnr(noisy, truth.roll(shift, 0))
        assert turned_psnr == pytest.approx(psnr, abs=1e-9)
        expected = (-shift * STEP + 180.0) % 360.0 - 180.0
        assert turned_rotation == pytest.approx(expected, abs=1e-4)


def test_alignment_finds_a_physically_turned_object(truth):
    """Rendering the object turned by 36° gives renders that match the truth turned by 36°."""
    turned = render_truth(SCENES["chair"], evaluation_cameras(50), SIZE, rotation_deg=36.0)
    psnr, rotation = aligned_psnr(turned, truth)
    assert rotation == pytest.approx(36.0, abs=1e-4) and psnr > 30.0
    assert janus_score(turned, truth, rotation) == 0.0


def test_iou_3d():
    duck = SceneField(SCENES["duck"])
    assert iou_3d(duck, "duck", 0.0, resolution=32) > 0.95
    assert iou_3d(duck, "car", 0.0, resolution=32) < 0.5
    turned = SceneField(SCENES["car"], rotation_deg=36.0)
    assert iou_3d(turned, "car", 36.0, resolution=32) > 0.95
    assert iou_3d(turned, "car", 0.0, resolution=32) < iou_3d(turned, "car", 36.0, resolution=32) - 0.1


def test_occupancy_overlap_says_whether_a_field_overfills_or_underfills():
    from mvsdi.testbed import sdf
    from mvsdi.testbed.metrics import occupancy_overlap
    from mvsdi.testbed.scenes import Scene

    ball = SceneField(Scene.from_parts("ball", "a ball around everything", [(sdf.sphere(0.95), (1.0, 1.0, 1.0))]))
    both, ball_only, duck_only = occupancy_overlap(ball, "duck", resolution=32)
    assert duck_only == 0 and ball_only > both > 0  # every duck voxel is inside the ball, which holds far more
    assert iou_3d(ball, "duck", resolution=32) == both / (both + ball_only)
    both, field_only, truth_only = occupancy_overlap(SceneField(SCENES["duck"]), "duck", resolution=32)
    # the truth's own density is soft within ~1e-3 outside its surface: only voxel centres there differ
    assert truth_only == 0 and field_only <= 0.03 * both


def test_janus_score(truth):
    azimuth = evaluation_cameras(50).azimuth_deg
    assert janus_score(truth, truth) == 0.0
    fake = truth.clone()
    back = torch.nonzero(azimuth.abs() > 135.0).squeeze(-1)
    fake[back] = truth[(back + 25) % 50]  # every back view replaced by the view 180° away: a front
    assert janus_score(fake, truth) == 1.0
    assert janus_score(fake.roll(5, 0), truth, rotation_deg=5 * STEP) == 1.0  # measured after alignment
    noisy = (truth + 0.05 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert janus_score(noisy, truth) == 0.0


def test_janus_score_of_an_object_without_front_or_back_is_the_neutral_half(truth):
    """The symmetric initial blob shows no front/back difference: no evidence either way."""
    from mvsdi.testbed.metrics import janus_evidence

    torch.manual_seed(0)
    blob = Field(FieldConfig(n_levels=4, log2_table_size=10, base_resolution=4, per_level_scale=2.0, hidden_dim=8))
    renders, _ = render_views(blob, ConstantBackground(), 50, SIZE, n_samples=24)
    assert janus_score(renders, truth) == 0.5
    azimuth = evaluation_cameras(50).azimuth_deg.abs()
    evidence = janus_evidence(renders[azimuth > 135], truth[azimuth < 45], truth[azimuth > 135])
    assert evidence.abs().max() < 0.1  # near the middle, not merely inside the tie band
    assert janus_evidence(truth[azimuth < 45], truth[azimuth < 45], truth[azimuth > 135]).tolist() == pytest.approx(
        [1.0] * int((azimuth < 45).sum()))
    # halfway between a front and a back view is exactly a tie
    front, back = truth[azimuth < 45][:1], truth[azimuth > 135][:1]
    assert janus_evidence((front + back) / 2, front, back, mirrored=False).abs().item() < 1e-6  # float32 midpoint
    # a mirrored front is a front
    assert janus_evidence(front.flip(-1), front, back).item() == pytest.approx(1.0)
    assert janus_evidence(back.flip(-1), front, back).item() == pytest.approx(-1.0)


def test_view_r_precision(prior):
    cameras = evaluation_cameras(50)
    chair = render_truth(SCENES["chair"], cameras, SIZE)
    assert view_r_precision(chair, prior, "chair") > 0.8
    assert view_r_precision(chair, prior, "duck") < 0.2
    # the gallery is drawn at the renders' size; a turned object is matched view by view
    assert view_r_precision(render_truth(SCENES["car"], cameras[:10], 48), prior, "car") > 0.7
    turned = render_truth(SCENES["car"], cameras, SIZE, rotation_deg=100.0)
    assert view_r_precision(turned, prior, "car") > 0.8
    assert view_r_precision(turned, ["chair", "duck", "car"], "car") > 0.8  # a list of scene names works too


def test_view_r_precision_gives_nothing_for_an_empty_or_grey_render(prior):
    """The empty image is a candidate: a render that shows nothing (or the study's nearly invisible
    initial blob) is no evidence of any scene, however close some thin scene's views are to grey."""
    from mvsdi.testbed.metrics import r_precision_gallery

    empty = torch.full((50, 3, SIZE, SIZE), 0.5)
    names = list(SCENES)
    assert all(view_r_precision(empty, names, name) == 0.0 for name in names)
    images, labels = r_precision_gallery(names, SIZE)
    assert images.shape == (50 * len(names) + 1, 3, SIZE, SIZE) and labels[-1] == -1


def test_diverged(truth):
    opacity = torch.full((50, 1, SIZE, SIZE), 0.2)
    assert diverged(truth, opacity) == (False, "")
    bad, reason = diverged(truth, torch.zeros_like(opacity))
    assert bad and reason.startswith("empty")
    bad, reason = diverged(truth, torch.ones_like(opacity))
    assert bad and reason.startswith("saturated")
    bad, reason = diverged(torch.ones_like(truth), opacity)
    assert bad and "clipped" in reason
    broken = truth.clone()
    broken[0, 0, 0, 0] = math.nan
    assert diverged(broken, opacity)[0]


def test_evaluate_the_truth_itself(prior):
    result = evaluate_field(SceneField(SCENES["chair"]), Background(), "chair", prior, n_samples=64, iou_resolution=32)
    assert not result["diverged"] and result["rotation_deg"] == 0.0
    assert result["psnr"] > 25.0 and result["iou"] > 0.95
    assert result["janus"] == 0.0 and result["r_precision"] > 0.8


def test_evaluate_a_fresh_field_runs(prior):
    torch.manual_seed(0)
    field = Field(FieldConfig(n_levels=4, log2_table_size=12, hidden_dim=16))
    result = evaluate_field(field, Background(), "duck", prior, size=12, n_samples=16, iou_resolution=16)
    assert set(result) >= {"psnr", "rotation_deg", "iou", "janus", "r_precision", "diverged", "mean_opacity"}
    assert math.isfinite(result["psnr"]) and 0.0 <= result["iou"] <= 1.0


def test_the_initial_blob_overlaps_every_scene():
    """Guards the occupancy level: a level above the blob's peak density scored every run IoU 0."""
    from mvsdi.field import Field, FieldConfig
    from mvsdi.testbed.metrics import iou_3d
    from mvsdi.testbed.scenes import SCENES

    torch.manual_seed(0)
    blob = Field(FieldConfig(n_levels=4, log2_table_size=10, base_resolution=4, per_level_scale=2.0, hidden_dim=8))
    scores = [iou_3d(blob, name, resolution=32) for name in SCENES]
    assert all(0 < x < 0.9 for x in scores) and sum(scores) / len(scores) > 0.2  # the thin lamp overlaps least


# ------------------------------------------------------------------------------------------------
# the metrics order candidates of known order (docs/testbed_sanity.md), at the study's settings


def _study_candidates_rows(name: str, others: list[str], blob_views):
    """evaluate_field of each sanity candidate against ``name`` at the small study's settings (the
    blob's renders, the same for every scene, are drawn once: ``blob_views``)."""
    from mvsdi.testbed.metrics import evaluate_renders, sanity_candidates
    from mvsdi.testbed.settings import METHODS, SMALL, cell_config

    config = cell_config(SMALL, "sds", METHODS[0], name, 0)
    other = others[(others.index(name) + 1) % len(others)]
    rows = {}
    for candidate, field in sanity_candidates(name, blob_views[0], other).items():
        views = blob_views[1:] if candidate == "blob" else render_views(
            field, ConstantBackground(), config.eval_views, SMALL.image_size, config.samples_per_ray)
        rows[candidate] = evaluate_renders(*views, field, name, others)
    return rows


@pytest.fixture(scope="module")
def study_blob():
    """The initial field of the small study's cells (seed 0) and its evaluation renders."""
    from mvsdi.distill import Model
    from mvsdi.testbed.settings import METHODS, SMALL, cell_config

    config = cell_config(SMALL, "sds", METHODS[0], "mug", 0)
    blob = Model.create(config, torch.device("cpu")).field
    views = render_views(blob, ConstantBackground(), config.eval_views, SMALL.image_size, config.samples_per_ray)
    return (blob, *views)


@pytest.mark.parametrize("name", ["mug", "chair"])
def test_every_metric_orders_the_sanity_candidates_with_its_margin(name, study_blob):
    """Truth, Janus twin, blurred truth, the study's initial blob and another scene, at the study's
    32² and sample count: every rule of SANITY_RULES holds (the chair's truth scored Janus 0.69 when
    its metric renders took the 24 training samples per ray)."""
    from mvsdi.testbed.metrics import sanity_checks

    rows = _study_candidates_rows(name, list(SCENES), study_blob)
    failed = [(rule.metric, rule.text, round(slack, 3)) for rule, slack in sanity_checks(rows) if slack < 0]
    assert not failed, failed
    assert rows["blob"]["r_precision"] == 0.0 and rows["other"]["r_precision"] == 0.0


def owl():
    """A scene made by a user: an owl facing +x (face disc, beak, eyes in front; a tail behind)."""
    from mvsdi.testbed import Scene, sdf

    body = sdf.translate(sdf.ellipsoid((0.26, 0.24, 0.36)), (0.0, 0.0, -0.15))
    face = sdf.translate(sdf.ellipsoid((0.05, 0.17, 0.14)), (0.2, 0.0, 0.05))
    eyes = sdf.union(*[sdf.translate(sdf.sphere(0.05), (0.24, y, 0.09)) for y in (-0.07, 0.07)])
    beak = sdf.capsule((0.24, 0.0, 0.0), (0.32, 0.0, -0.04), 0.03)
    tail = sdf.translate(sdf.box((0.1, 0.12, 0.04), 0.02), (-0.3, 0.0, -0.45))
    return Scene.from_parts("test-owl", "a brown owl with a white face", [
        (body, (0.45, 0.3, 0.15)), (face, (0.95, 0.92, 0.85)), (eyes, (0.98, 0.75, 0.1)), (beak, (0.95, 0.55, 0.1)),
        (tail, (0.3, 0.18, 0.08))])


def test_a_registered_scene_gets_the_same_sanity(study_blob):
    """The Janus twin is built from the scene itself: a user's scene gets a high Janus score for its
    twin and a low one for its truth, and every rule holds as on the built-in scenes."""
    from mvsdi.testbed import register_scene
    from mvsdi.testbed.metrics import sanity_checks

    register_scene(owl())
    try:
        rows = _study_candidates_rows("test-owl", list(SCENES), study_blob)
    finally:
        SCENES.pop("test-owl", None)
    assert rows["janus_twin"]["janus"] >= 0.8 and rows["truth"]["janus"] <= 0.1
    failed = [(rule.metric, rule.text, round(slack, 3)) for rule, slack in sanity_checks(rows) if slack < 0]
    assert not failed, failed


# ------------------------------------------------------------------------------------------------
# metric renders skip empty space: within the renderer's error bound of the dense renders


def _dropped_weight(field, grid, n_views: int, size: int, n_samples: int, config) -> torch.Tensor:
    """[V, 1, s, s]: E of each pixel, the dense weight of every sample the skipping renderer may drop
    (in a cell the grid leaves empty, or with alpha <= the alpha threshold if there is one) plus the
    transmittance threshold (early termination drops at most that much); ``mvsdi.render``: |Δrgb| <= 2E."""
    from mvsdi.cameras import rays
    from mvsdi.render import composite_weights, ray_box, sample_distances

    origins, directions = rays(evaluation_cameras(n_views), size, size)
    near, far, _ = ray_box(origins, directions, field.cfg.bound)
    t, delta = sample_distances(near, far, n_samples, False, None)
    points = origins[..., None, :] + t[..., None] * directions[..., None, :]
    with torch.no_grad():
        density = field(points)[0]
    weights = composite_weights(density, delta)
    dropped = ~grid.occupied(points)
    if config.alpha_threshold > 0:
        dropped |= -torch.expm1(-density * delta) <= config.alpha_threshold
    return ((weights * dropped).sum(-1) + config.transmittance_threshold)[:, None]


def _structured_field():
    """The small field with its hash table drawn at unit scale: a lumpy, coloured, soft object."""
    torch.manual_seed(1)
    field = Field(FieldConfig(n_levels=4, log2_table_size=12, base_resolution=4, per_level_scale=2.0, hidden_dim=16))
    with torch.no_grad():
        field.encoding.embeddings.normal_(0.0, 1.0)
    return field


@pytest.mark.parametrize("which", ["structured", "chair"])
def test_skipping_metric_renders_equal_the_dense_ones_within_the_renderer_bound(which, prior):
    from mvsdi.render import DENSE
    from mvsdi.testbed.metrics import EVALUATION_RENDER, MIN_EVALUATION_SAMPLES, evaluation_grid

    field = _structured_field() if which == "structured" else SceneField(SCENES["chair"])
    n, size, samples = 50, 12, MIN_EVALUATION_SAMPLES
    rng = torch.random.get_rng_state()
    skipped, skipped_opacity = render_views(field, ConstantBackground(), n, size, samples)
    assert torch.equal(torch.random.get_rng_state(), rng)  # measuring draws nothing
    dense, dense_opacity = render_views(field, ConstantBackground(), n, size, samples, config=DENSE)
    bound = 2.0 * _dropped_weight(field, evaluation_grid(field, samples), n, size, samples, EVALUATION_RENDER)
    float32 = 1e-5  # composited in float32 (prefix sums in float64): a few ulps of values in [0, 1]
    assert ((skipped - dense).abs() <= bound + float32).all()
    assert ((skipped_opacity - dense_opacity).abs() <= bound / 2 + float32).all()
    # the metrics: PSNR moves by at most 20·log10(1 + δ/rmse) with δ the RMS of the bound (the RMS error
    # of every rotation moves by at most δ); IoU does not use the renders; the view decisions hold
    truth = render_truth(SCENES["chair"], evaluation_cameras(n), size)
    psnr_skip, rot_skip = aligned_psnr(skipped, truth)
    psnr_dense, rot_dense = aligned_psnr(dense, truth)
    delta = float((bound + float32).square().mean().sqrt())
    rmse = 10.0 ** (-max(psnr_skip, psnr_dense) / 20.0)
    assert abs(psnr_skip - psnr_dense) <= 20.0 * math.log10(1.0 + delta / rmse)
    assert abs(psnr_skip - psnr_dense) < 0.05 and rot_skip == rot_dense
    assert janus_score(skipped, truth, rot_skip) == janus_score(dense, truth, rot_dense)
    assert view_r_precision(skipped, prior, "chair") == view_r_precision(dense, prior, "chair")


def test_the_evaluation_grid_is_the_fields_own_and_dilated():
    from mvsdi.render import DENSE
    from mvsdi.testbed.metrics import evaluation_grid

    field = _structured_field()
    plain, dilated = evaluation_grid(field, 64, dilation=0), evaluation_grid(field, 64)
    assert evaluation_grid(field, 64, DENSE) is None
    pooled = torch.nn.functional.max_pool3d(plain.values[None, None], 3, stride=1, padding=1)[0, 0]
    assert torch.equal(dilated.values, pooled) and dilated.occupied_fraction >= plain.occupied_fraction
