"""Testbed metrics: alignment, IoU, R-precision, Janus score, divergence, and the whole evaluation."""

import math

import pytest
import torch

from mvsdi.cameras import evaluation_cameras
from mvsdi.field import Background, Field, FieldConfig
from mvsdi.testbed import (ConstantBackground, IdealDenoiserPrior, SCENES, SceneField, aligned_psnr, diverged,
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
    assert janus_evidence((front + back) / 2, front, back).abs().item() < 1e-6  # float32 midpoint


def test_view_r_precision(prior):
    cameras = evaluation_cameras(50)
    chair = render_truth(SCENES["chair"], cameras, SIZE)
    assert view_r_precision(chair, prior, "chair") > 0.8
    assert view_r_precision(chair, prior, "duck") < 0.2
    # renders at another size are resized to the prior's first
    assert view_r_precision(render_truth(SCENES["car"], cameras[:10], 48), prior, "car") > 0.7


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
