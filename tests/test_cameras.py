import dataclasses
import math

import pytest
import torch

from mvsdi.cameras import (SAMPLERS, CameraRanges, evaluation_cameras, random_axis_elevations, rays, sample_views,
                           spherical_to_cartesian, view_direction, wrap_azimuth)

RANGES = CameraRanges()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def angle_diff(a, b):
    return wrap_azimuth(a - b).abs()


@pytest.mark.parametrize("name,views", [("random", 1), ("random", 3), ("antipodal", 2), ("antipodal", 4),
                                        ("antipodal", 3), ("stratified", 4), ("mixed", 4), ("octahedral", 6),
                                        ("random_axis", 2), ("random_axis", 3)])
def test_every_sampler_stays_in_range_and_is_deterministic(name, views):
    a = sample_views(name, views, gen(3))
    b = sample_views(name, views, gen(3))
    c = sample_views(name, views, gen(4))
    assert len(a) == views
    for f in dataclasses.fields(a):
        assert torch.equal(getattr(a, f.name), getattr(b, f.name))
    assert not torch.equal(a.azimuth_deg, c.azimuth_deg)
    lo, hi = RANGES.elevation_deg
    assert (a.elevation_deg >= lo - 1e-5).all() and (a.elevation_deg <= hi + 1e-5).all()
    assert (a.azimuth_deg >= -180).all() and (a.azimuth_deg < 180).all()
    assert (a.distance >= 1.5).all() and (a.distance <= 2.0).all()
    assert (a.fovy_deg >= 40).all() and (a.fovy_deg <= 70).all()
    light_r = a.light_position.norm(dim=-1)
    assert (light_r >= 0.8 - 1e-5).all() and (light_r <= 1.5 + 1e-5).all()


def draws(name, views, seeds=200, ranges=RANGES):
    return [sample_views(name, views, gen(s), ranges) for s in range(seeds)]


@pytest.mark.parametrize("name,views", [("antipodal", 2), ("antipodal", 4), ("random_axis", 2), ("stratified", 2),
                                        ("mixed", 4), ("octahedral", 6)])
def test_distance_fovy_light_and_jitter_are_drawn_for_every_view(name, views):
    """The reference never shares them inside a pair or group; sharing made SDI's antipodal pairs
    near copies of one view."""
    for cams in draws(name, views, seeds=20):
        for f in ("distance", "fovy_deg"):
            assert len(set(getattr(cams, f).tolist())) == views, f
        for f in ("light_position", "eye_offset", "center", "up"):
            assert len({tuple(v) for v in getattr(cams, f).tolist()}) == views, f


def test_antipodal_pairs_are_views_i_and_i_plus_half_with_shared_elevation():
    for cams in draws("antipodal", 4, seeds=20):
        for i in (0, 1):
            assert angle_diff(cams.azimuth_deg[i] + 180, cams.azimuth_deg[i + 2]) < 1e-4
            assert cams.elevation_deg[i] == cams.elevation_deg[i + 2]
        assert angle_diff(cams.azimuth_deg[0], cams.azimuth_deg[1]) > 1e-3  # two independent pairs
        assert cams.elevation_deg[0] != cams.elevation_deg[1]


def test_odd_antipodal_k_adds_one_view_with_the_first_pairs_elevation():
    for cams in draws("antipodal", 3, seeds=20):
        assert angle_diff(cams.azimuth_deg[0] + 180, cams.azimuth_deg[1]) < 1e-4
        assert cams.elevation_deg[2] == cams.elevation_deg[0]
        assert angle_diff(cams.azimuth_deg[2], cams.azimuth_deg[0]) > 1e-3


def test_without_jitter_antipodal_eyes_are_mirrored_through_the_up_axis_at_their_own_distance():
    cams = sample_views("antipodal", 2, gen(1), RANGES.unperturbed())
    p = cams.position
    direction = p / p.norm(dim=-1, keepdim=True)
    assert torch.allclose(direction[0, :2], -direction[1, :2], atol=1e-5)
    assert torch.allclose(direction[0, 2], direction[1, 2], atol=1e-6)
    assert torch.allclose(p.norm(dim=-1), cams.distance)


def test_random_axis_flips_elevation():
    for cams in draws("random_axis", 2, seeds=20):
        assert angle_diff(cams.azimuth_deg[0] + 180, cams.azimuth_deg[1]) < 1e-4
        assert torch.isclose(cams.elevation_deg[0], -cams.elevation_deg[1])
        assert cams.elevation_deg.abs().max() <= 10 + 1e-5  # ±ε must both be inside [-10, 45]


def test_random_axis_falls_back_to_the_horizon_when_no_elevation_has_its_mirror_in_range():
    above = CameraRanges(elevation_deg=(5.0, 45.0))
    assert random_axis_elevations(above) == (0.0, 0.0)
    assert (sample_views("random_axis", 2, gen(0), above).elevation_deg == 0).all()
    assert random_axis_elevations(CameraRanges(elevation_deg=(-30.0, 10.0))) == (-10.0, 10.0)


def test_stratified_puts_one_view_in_each_stratum_with_its_own_offset():
    for views in (1, 3, 4, 7):
        for cams in draws("stratified", views, seeds=10):
            strata = torch.floor((cams.azimuth_deg + 180) / (360 / views)).long().sort().values
            assert torch.equal(strata, torch.arange(views))
    # an offset per view: at K=2 the two views are not antipodal (a shared offset would make them so)
    gaps = torch.tensor([float(angle_diff(c.azimuth_deg[0], c.azimuth_deg[1])) for c in draws("stratified", 2)])
    assert gaps.std() > 30 and gaps.min() < 120


def test_stratified_covers_the_whole_range_over_draws():
    az = torch.cat([c.azimuth_deg for c in draws("stratified", 2, seeds=400)])
    hist = torch.histc(az, bins=12, min=-180, max=180)
    assert hist.min() > 0.5 * hist.mean()


def test_mixed_and_octahedral_layouts():
    for m in draws("mixed", 4, seeds=10):
        assert angle_diff(m.azimuth_deg[0] + 180, m.azimuth_deg[1]) < 1e-4
        assert m.elevation_deg[0] == m.elevation_deg[1]
        assert m.azimuth_deg[2] == m.azimuth_deg[3] and m.elevation_deg[2] == 45 and m.elevation_deg[3] == -10
    assert len({round(float(angle_diff(m.azimuth_deg[2], m.azimuth_deg[0]))) for m in draws("mixed", 4, 20)}) > 10
    for o in draws("octahedral", 6, seeds=10):
        ring = o.azimuth_deg[:4]
        for i in range(4):
            assert angle_diff(ring[i] + 90, ring[(i + 1) % 4]) < 1e-4
        assert (o.elevation_deg[:4] == 0).all() and o.elevation_deg[4] == 45 and o.elevation_deg[5] == -10
        assert angle_diff(o.azimuth_deg[4], o.azimuth_deg[5]) > 1e-3  # each extreme at its own azimuth


def test_elevation_is_uniform_in_degrees_or_on_the_sphere_by_one_coin_per_step():
    """Uniform on the sphere puts fewer views near the top of [-10°, 45°] than uniform in degrees."""
    in_degrees = CameraRanges(sphere_elevation_prob=0.0)
    on_sphere = CameraRanges(sphere_elevation_prob=1.0)
    high = lambda ranges: sum(int((c.elevation_deg > 35).sum()) for c in draws("random", 4, 500, ranges))  # noqa: E731
    # expected fractions above 35°: 10/55 = 0.18 in degrees; (sin 45° − sin 35°)/(sin 45° + sin 10°) = 0.15
    assert high(in_degrees) > 1.1 * high(on_sphere)
    assert high(in_degrees) > high(RANGES) > high(on_sphere)  # the default mixes both, half and half


def test_jitter_follows_the_reference_magnitudes():
    cams = sample_views("random", 4000, gen(0))
    nominal = spherical_to_cartesian(cams.azimuth_deg, cams.elevation_deg, cams.distance)
    offset = cams.position - nominal
    assert offset.abs().max() <= 0.1 + 1e-6 and offset.abs().max() > 0.09  # U[-0.1, 0.1]^3
    assert abs(float(cams.center.std()) - 0.2) < 0.01  # N(0, 0.2²)
    assert abs(float((cams.up - torch.tensor([0.0, 0.0, 1.0])).std()) - 0.02) < 0.002  # N(0, 0.02²)
    still = sample_views("random", 8, gen(0), RANGES.unperturbed())
    assert (still.center == 0).all() and (still.eye_offset == 0).all()


@pytest.mark.parametrize("name,views,needs", [("antipodal", 1, ">= 2"), ("mixed", 2, "K = 4"),
                                              ("octahedral", 4, "K = 6"), ("random", 0, ">= 1"),
                                              ("random_axis", 1, ">= 2")])
def test_invalid_k_is_an_error_that_says_what_works(name, views, needs):
    with pytest.raises(ValueError, match=needs):
        sample_views(name, views, gen())


def test_unknown_sampler_lists_the_known_ones():
    with pytest.raises(ValueError, match="antipodal"):
        sample_views("spiral", 2, gen())


def test_camera_looks_at_its_centre_and_rays_pass_through_it():
    cams = sample_views("random", 3, gen(7))
    origins, dirs = rays(cams, 9, 9)
    centre_o, centre_d = origins[:, 4, 4], dirs[:, 4, 4]
    # the centre pixel's ray points at the (jittered) look-at point
    assert torch.allclose(centre_d, torch.nn.functional.normalize(cams.center - centre_o, dim=-1), atol=1e-5)
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
