import math

import pytest
import torch

from mvsdi.cameras import (SAMPLERS, CameraRanges, evaluation_cameras, rays, sample_views, view_direction,
                           wrap_azimuth)

RANGES = CameraRanges()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def angle_diff(a, b):
    return wrap_azimuth(a - b).abs()


@pytest.mark.parametrize("name,k", [("random", 1), ("random", 3), ("antipodal", 2), ("antipodal", 4),
                                    ("stratified", 4), ("mixed", 4), ("octahedral", 6), ("random_axis", 2)])
def test_every_sampler_stays_in_range_and_is_deterministic(name, k):
    a = sample_views(name, k, gen(3))
    b = sample_views(name, k, gen(3))
    c = sample_views(name, k, gen(4))
    assert len(a) == k
    for field in ("azimuth_deg", "elevation_deg", "distance", "fovy_deg", "light_position"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.azimuth_deg, c.azimuth_deg)
    lo, hi = RANGES.elevation_deg
    assert (a.elevation_deg >= lo - 1e-5).all() and (a.elevation_deg <= hi + 1e-5).all()
    assert (a.azimuth_deg >= -180).all() and (a.azimuth_deg < 180).all()
    assert (a.distance >= 1.5).all() and (a.distance <= 2.0).all()
    assert (a.fovy_deg >= 40).all() and (a.fovy_deg <= 70).all()
    light_r = a.light_position.norm(dim=-1)
    assert (light_r >= 0.8 - 1e-5).all() and (light_r <= 1.5 + 1e-5).all()


def test_antipodal_pairs_are_opposite_with_equal_elevation():
    for seed in range(20):
        cams = sample_views("antipodal", 4, gen(seed))
        for i in (0, 2):
            assert angle_diff(cams.azimuth_deg[i] + 180, cams.azimuth_deg[i + 1]) < 1e-4
            assert cams.elevation_deg[i] == cams.elevation_deg[i + 1]
            assert cams.distance[i] == cams.distance[i + 1]
        # the two pairs are independent draws
        assert angle_diff(cams.azimuth_deg[0], cams.azimuth_deg[2]) > 1e-3


def test_antipodal_positions_are_mirrored_through_the_up_axis():
    cams = sample_views("antipodal", 2, gen(1))
    p = cams.position
    assert torch.allclose(p[0, :2], -p[1, :2], atol=1e-5) and torch.allclose(p[0, 2], p[1, 2])


def test_random_axis_flips_elevation():
    cams = sample_views("random_axis", 2, gen(5))
    assert angle_diff(cams.azimuth_deg[0] + 180, cams.azimuth_deg[1]) < 1e-4
    assert torch.isclose(cams.elevation_deg[0], -cams.elevation_deg[1])
    assert cams.elevation_deg.abs().max() <= 10 + 1e-5  # ±ε must both be inside [-10, 45]


def test_stratified_puts_one_view_in_each_stratum():
    for k in (1, 3, 4, 7):
        for seed in range(10):
            az = sample_views("stratified", k, gen(seed)).azimuth_deg
            strata = torch.floor((az + 180) / (360 / k)).long().sort().values
            assert torch.equal(strata, torch.arange(k))
            if k == 1:
                continue
            gaps = angle_diff(az.sort().values.roll(-1), az.sort().values)
            assert torch.allclose(gaps, torch.full_like(gaps, 360 / k), atol=1e-3)


def test_stratified_covers_the_whole_range_over_draws():
    az = torch.cat([sample_views("stratified", 2, gen(s)).azimuth_deg for s in range(400)])
    hist = torch.histc(az, bins=12, min=-180, max=180)
    assert hist.min() > 0.5 * hist.mean()


def test_mixed_and_octahedral_layouts():
    m = sample_views("mixed", 4, gen(2))
    assert angle_diff(m.azimuth_deg[0] + 180, m.azimuth_deg[1]) < 1e-4
    assert m.elevation_deg[0] == m.elevation_deg[1]
    assert m.elevation_deg[2] == 45 and m.elevation_deg[3] == -10
    o = sample_views("octahedral", 6, gen(2))
    ring = o.azimuth_deg[:4]
    for i in range(4):
        assert angle_diff(ring[i] + 90, ring[(i + 1) % 4]) < 1e-4
    assert (o.elevation_deg[:4] == 0).all() and o.elevation_deg[4] == 45 and o.elevation_deg[5] == -10


@pytest.mark.parametrize("name,k,needs", [("antipodal", 3, "even"), ("antipodal", 1, "even"), ("mixed", 2, "K = 4"),
                                          ("octahedral", 4, "K = 6"), ("random", 0, ">= 1"), ("random_axis", 5, "even")])
def test_invalid_k_is_an_error_that_says_what_works(name, k, needs):
    with pytest.raises(ValueError, match=needs):
        sample_views(name, k, gen())


def test_unknown_sampler_lists_the_known_ones():
    with pytest.raises(ValueError, match="antipodal"):
        sample_views("spiral", 2, gen())


def test_camera_looks_at_origin_and_rays_pass_near_it():
    cams = sample_views("random", 3, gen(7))
    origins, dirs = rays(cams, 9, 9)
    centre_o, centre_d = origins[:, 4, 4], dirs[:, 4, 4]
    # centre pixel's ray points at the origin
    assert torch.allclose(centre_d, torch.nn.functional.normalize(-centre_o, dim=-1), atol=1e-5)
    c2w = cams.camera_to_world()
    rot = c2w[:, :3, :3]
    assert torch.allclose(rot.transpose(1, 2) @ rot, torch.eye(3).expand(3, 3, 3), atol=1e-5)
    # image top is up: the top row's rays point higher (in z) than the bottom row's
    assert (dirs[:, 0, 4, 2] > dirs[:, 8, 4, 2]).all()


def test_ray_spread_matches_fovy():
    cams = evaluation_cameras(1, fovy_deg=60.0)
    _, dirs = rays(cams, 2, 2)
    # pixel centres at ±0.5 px of a 2-px image are at half the half-angle's tangent
    half = math.atan(0.5 * math.tan(math.radians(30)))
    up = torch.tensor([0.0, 0.0, 1.0])
    top = torch.nn.functional.normalize(dirs[0, 0].mean(0), dim=-1)
    centre = torch.nn.functional.normalize(-cams.position[0], dim=-1)
    assert math.isclose(math.acos(float(top @ centre)), half, rel_tol=1e-3)
    assert float(top @ up) > float(centre @ up)


def test_evaluation_cameras_match_the_protocol():
    cams = evaluation_cameras()
    assert len(cams) == 50
    assert (cams.elevation_deg == 15).all() and (cams.distance == 2).all() and (cams.fovy_deg == 70).all()
    assert torch.allclose(wrap_azimuth(cams.azimuth_deg[1:] - cams.azimuth_deg[:-1]), torch.full((49,), 7.2))
    assert cams.azimuth_deg[0] == 0


def test_view_direction_words():
    az = torch.tensor([0.0, 30.0, 90.0, -90.0, 170.0, -150.0, 0.0])
    el = torch.tensor([0.0, 0.0, 0.0, 10.0, 0.0, 0.0, 70.0])
    assert view_direction(az, el) == ["front", "front", "side", "side", "back", "back", "overhead"]


def test_bad_ranges_are_refused():
    with pytest.raises(ValueError):
        CameraRanges(elevation_deg=(-10.0, 95.0))
    with pytest.raises(ValueError):
        CameraRanges(distance=(2.0, 1.0))
    assert set(SAMPLERS) == {"random", "antipodal", "stratified", "mixed", "octahedral", "random_axis"}
