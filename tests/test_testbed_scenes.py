"""Testbed scenes: registry, extent, asymmetry, and silhouettes against analytic ground truth."""

import math

import pytest
import torch

from mvsdi.cameras import Cameras, evaluation_cameras, rays
from mvsdi.render import render
from mvsdi.testbed import (SCENES, ConstantBackground, Scene, SceneField, get_scene, register_scene, render_truth, sdf,
                           truth_mask)
from mvsdi.testbed.scenes import SCENE_EXTENT, TRUTH_BOUND

CENTRE, RADIUS = (0.1, 0.2, -0.1), 0.4
BALL = Scene.from_parts("test-ball", "a ball", [(sdf.translate(sdf.sphere(RADIUS), CENTRE), (0.2, 0.3, 0.9))])


def cameras(azimuth, elevation=15.0, distance=1.8, fovy=50.0):
    az = torch.tensor(azimuth, dtype=torch.float32)
    n = len(az)
    full = lambda value: torch.full((n,), float(value))  # noqa: E731
    return Cameras(az, full(elevation), full(distance), full(fovy), torch.zeros(n, 3))


def analytic_ball_distance(cams, size):
    """Per pixel: closest approach of the ray to the ball's centre (the ray hits iff < RADIUS)."""
    origins, directions = rays(cams, size, size)
    to_centre = torch.tensor(CENTRE) - origins
    along = (to_centre * directions).sum(-1, keepdim=True)
    return (to_centre - along * directions).norm(dim=-1)


def test_registry_has_eight_distinct_scenes_that_fit():
    assert len(SCENES) >= 8
    u = torch.linspace(-1.0, 1.0, 41)
    grid = torch.stack(torch.meshgrid(u, u, u, indexing="ij"), -1).reshape(-1, 3)
    outside = grid[(grid.abs() > SCENE_EXTENT + 1e-6).any(-1)]
    for scene in SCENES.values():
        assert (scene.sdf(outside) > 0).all(), scene.name
        assert (scene.sdf(grid) < 0).any(), scene.name
        assert scene.description


def test_get_scene_unknown_lists_names():
    with pytest.raises(ValueError, match="known scenes: .*mug"):
        get_scene("teapot")


def test_register_scene_rules():
    parts = [(sdf.sphere(0.2), (1.0, 0.0, 0.0)), (sdf.translate(sdf.sphere(0.1), (0.3, 0, 0)), (0.0, 1.0, 0.0))]
    custom = Scene.from_parts("test-custom", "two balls", parts)
    try:
        register_scene(custom)
        assert get_scene("test-custom") is custom
        with pytest.raises(ValueError, match="already registered"):
            register_scene(custom)
        register_scene(custom, replace=True)
    finally:
        SCENES.pop("test-custom", None)
    with pytest.raises(ValueError, match="does not fit"):
        register_scene(Scene.from_parts("test-big", "too big", [(sdf.sphere(0.9), (1.0, 0.0, 0.0))]))
    with pytest.raises(ValueError, match="lowercase"):
        register_scene(Scene.from_parts("Bad Name", "x", [(sdf.sphere(0.1), (1.0, 0.0, 0.0))]))


def test_every_scene_looks_different_when_turned():
    """No symmetry about z: the front view differs from the views at 90°, 180° and 270°."""
    cams = cameras([0.0, 90.0, 180.0, 270.0], distance=1.6)
    for scene in SCENES.values():
        images = render_truth(scene, cams, 32)
        for k in (1, 2, 3):
            changed = (images[0] - images[k]).abs().amax(0) > 0.1
            assert changed.float().mean() > 0.02, (scene.name, k)
        # the front is visible: the front view is not the background
        assert (images[0] - 0.5).abs().amax(0).gt(0.05).float().mean() > 0.05, scene.name


def test_traced_silhouette_matches_the_projected_ball():
    cams = cameras([0.0, 50.0, 170.0], elevation=30.0)
    distance = analytic_ball_distance(cams, 48)
    mask = truth_mask(BALL, cams, 48)
    clear = (distance - RADIUS).abs() > 0.01  # pixels whose ray does not graze the ball
    assert torch.equal(mask[clear], (distance < RADIUS)[clear])
    assert (mask != (distance < RADIUS)).float().mean() < 0.003


def test_volume_rendered_ball_matches_analytic_silhouette():
    cams = cameras([0.0, 50.0, 170.0], elevation=30.0)
    distance = analytic_ball_distance(cams, 48)
    out = render(SceneField(BALL), ConstantBackground(), cams, 48, 48, n_samples=96, need_normals=False)
    solid = out.opacity[..., 0] > 0.5
    clear = (distance - RADIUS).abs() > 0.01
    assert torch.equal(solid[clear], (distance < RADIUS)[clear])


def test_volume_render_silhouettes_agree_with_tracing_for_every_scene():
    """96 samples through the truth cube are enough: < 1% of pixels differ from the traced mask."""
    cams = cameras([20.0, 110.0, 200.0, 290.0], elevation=25.0, distance=1.5, fovy=45.0)
    for scene in SCENES.values():
        out = render(SceneField(scene, bound=TRUTH_BOUND), ConstantBackground(), cams, 32, 32, n_samples=96,
                     need_normals=False)
        mismatch = ((out.opacity[..., 0] > 0.5) != truth_mask(scene, cams, 32)).float().mean()
        assert mismatch < 0.01, (scene.name, float(mismatch))


def test_truth_images_agree_between_tracing_and_volume_rendering():
    cams = evaluation_cameras(4)
    traced = render_truth(SCENES["duck"], cams, 32)
    marched = render_truth(SCENES["duck"], cams, 32, samples_per_ray=128)
    assert traced.shape == (4, 3, 32, 32) and 0.0 <= traced.min() and traced.max() <= 1.0
    assert ((traced - marched).abs().amax(1) > 0.1).float().mean() < 0.02
    assert (traced[:, :, 0, 0] == 0.5).all()  # the corners are the constant grey background


def test_rotated_scene_seen_from_turned_camera_is_the_same_image():
    scene = SCENES["car"]
    front = render_truth(scene, cameras([0.0]), 32)
    turned = render_truth(scene, cameras([90.0]), 32, rotation_deg=90.0)
    assert ((front - turned).abs() > 0.1).float().mean() < 0.005


def test_scene_field_quacks_like_a_field():
    field = SceneField(BALL)
    assert field.cfg.bound == 1.0
    centre = torch.tensor(CENTRE)
    direction = torch.nn.functional.normalize(torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 1.0]]), dim=-1)
    surface = centre + RADIUS * direction
    density, albedo, normals = field.with_normals(surface)
    assert torch.allclose(normals, direction, atol=1e-5)
    assert torch.allclose(albedo, torch.tensor([0.2, 0.3, 0.9]).expand(2, 3))
    inside, outside = centre + 0.5 * RADIUS * direction, centre + 1.5 * RADIUS * direction
    d_in, _ = field(inside)
    d_out, _ = field(outside)
    assert (d_in > 100).all() and (d_out < 1e-6).all()
    assert field.occupancy(inside).all() and not field.occupancy(outside).any()
    assert math.isclose(float(field(torch.tensor([[1.01, 0.0, 0.0]]))[0]), 0.0)


# ------------------------------------------------------------------------------------------------
# scenes derived from a scene: the Janus twin and the blurred truth


def test_the_janus_twin_is_the_front_half_mirrored_onto_the_back():
    from mvsdi.testbed.scenes import janus_twin

    points = torch.rand(4096, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.5 - 0.75
    for scene in [*SCENES.values(), BALL]:
        twin = janus_twin(scene)
        assert twin.name == f"{scene.name}-janus"
        front = points[:, 0] >= 0
        d, c = twin.sdf_and_colour(points)
        d0, c0 = scene.sdf_and_colour(points)
        assert torch.equal(d[front], d0[front]) and torch.equal(c[front], c0[front])  # the front half is the scene's
        mirrored = points * torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
        assert torch.equal(twin.sdf(points), twin.sdf(mirrored))  # and the back half its mirror image
        assert torch.equal(twin.colour(points), twin.colour(mirrored))


def test_the_janus_twin_renders_its_front_from_behind():
    """Seen from azimuth 180°, the twin shows the mirror image of the scene seen from 0°."""
    from mvsdi.testbed.scenes import janus_twin

    twin = janus_twin(SCENES["penguin"])
    front = render_truth(SCENES["penguin"], cameras([0.0]), 32)
    back = render_truth(twin, cameras([180.0]), 32)
    assert ((back - front.flip(-1)).abs() > 0.1).float().mean() < 0.01
    try:
        register_scene(twin)  # a twin fits wherever its scene fits
    finally:
        SCENES.pop(twin.name, None)


def test_the_blur_is_a_gaussian_convolution():
    """The 27-point Gauss–Hermite rule is exact for polynomials of degree <= 5 in each coordinate:
    a linear function is unchanged, |p|² gains 3σ², a constant colour stays."""
    from mvsdi.testbed.scenes import blurred_scene

    sigma = 0.04
    points = torch.rand(1000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5
    plane = Scene("test-plane", "a plane", lambda p: p @ torch.tensor([0.3, -0.5, 0.8], dtype=p.dtype) - 0.1,
                  lambda p: torch.full_like(p, 0.25))
    blurred = blurred_scene(plane, sigma)
    assert torch.allclose(blurred.sdf(points), plane.sdf(points), rtol=0, atol=1e-15)
    assert torch.allclose(blurred.colour(points), torch.full_like(points, 0.25), rtol=0, atol=1e-15)
    bowl = Scene("test-bowl", "a paraboloid", lambda p: p.square().sum(-1), lambda p: p.abs())
    assert torch.allclose(blurred_scene(bowl, sigma).sdf(points), bowl.sdf(points) + 3 * sigma ** 2, rtol=0, atol=1e-15)
    d, c = blurred_scene(bowl, sigma).sdf_and_colour(points.reshape(10, 100, 3))  # any leading shape
    assert d.shape == (10, 100) and c.shape == (10, 100, 3)
    with pytest.raises(ValueError):
        blurred_scene(plane, 0.0)


def test_the_blurred_scene_loses_thin_parts_and_keeps_the_body():
    from mvsdi.testbed.scenes import blurred_scene

    lamp = SCENES["lamp"]
    blurred = blurred_scene(lamp, 0.03)
    arm_middle = torch.tensor([[-0.15, 0.0, -0.235]])  # on the lower arm's axis (radius 0.03)
    assert lamp.sdf(arm_middle) < 0 < blurred.sdf(arm_middle)
    base = torch.tensor([[-0.1, 0.0, -0.55]])
    assert blurred.sdf(base) < 0
    try:
        register_scene(blurred)  # still a scene: fits, renders, sphere traces
    finally:
        SCENES.pop(blurred.name, None)
    image = render_truth(blurred, cameras([30.0]), 24)
    assert image.shape == (1, 3, 24, 24) and ((image - 0.5).abs() > 0.05).any()
