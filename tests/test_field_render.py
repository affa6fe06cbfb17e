"""Field (hash grid, blob, normals, background) and volume renderer, against hand-computed truths."""


from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from mvsdi.cameras import Cameras, rays
from mvsdi.field import Background, Field, FieldConfig, HashGridEncoding
from mvsdi.render import ShadingConfig, ray_box, render

TINY = FieldConfig(n_levels=4, log2_table_size=10, base_resolution=4, per_level_scale=2.0, hidden_dim=16)
ALBEDO = torch.tensor([0.2, 0.4, 0.6])
RADIUS = 0.5


def camera(fovy: float = 40.0, distance: float = 2.0, light=None) -> Cameras:
    """One camera on +x looking at the origin, point light at the camera unless given."""
    eye = torch.tensor([[distance, 0.0, 0.0]])
    return Cameras(torch.zeros(1), torch.zeros(1), torch.tensor([distance]), torch.tensor([fovy]),
                   eye if light is None else torch.tensor([light], dtype=torch.float32))


class Sphere(Field):
    """Hard sphere of radius 0.5, constant albedo, analytic normals (optionally flipped inwards)."""

    def __init__(self, flip: bool = False) -> None:
        # finite_difference routes with_normals() through the analytic normals() below
        super().__init__(dataclasses.replace(TINY, normal_type="finite_difference"))
        self.flip = flip

    def forward(self, x):
        density = torch.where(x.norm(dim=-1) < RADIUS, 1e4, 0.0)
        return density, ALBEDO.expand(*x.shape[:-1], 3)

    def normals(self, x):
        n = F.normalize(x, dim=-1)
        return -n if self.flip else n


@pytest.fixture
def torch_seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------------
# hash grid


def test_level_layout():
    enc = HashGridEncoding(4, 2, 10, 4, 2.0)
    assert enc.resolutions == [4, 8, 16, 32]
    assert enc.table_sizes == [64, 512, 1024, 1024]  # dense while res^3 fits 2^10, hashed after
    assert enc(torch.rand(5, 7, 3)).shape == (5, 7, 8)


def test_dense_level_is_trilinear_interpolation(torch_seed):
    enc = HashGridEncoding(4, 2, 10, 4, 2.0)
    with torch.no_grad():
        enc.embeddings.normal_()
    table = enc.level_table(0).detach()  # res 4, row = i + 4 j + 16 k
    at = lambda i, j, k: table[i + 4 * j + 16 * k]  # noqa: E731
    vertex = torch.tensor([1.0, 2.0, 3.0]) / 3.0  # vertex (1, 2, 3)
    assert torch.allclose(enc(vertex)[:2], at(1, 2, 3), atol=1e-6)
    centre = torch.tensor([1.5, 0.5, 2.5]) / 3.0  # centre of the cell with low corner (1, 0, 2)
    mean = sum(at(1 + a, b, 2 + c) for a in (0, 1) for b in (0, 1) for c in (0, 1)) / 8
    assert torch.allclose(enc(centre)[:2], mean, atol=1e-6)
    # anywhere: grid_sample on the dense volume (x fastest -> [D=k, H=j, W=i]) is an independent oracle
    x = torch.rand(50, 3)
    volume = table.T.reshape(1, 2, 4, 4, 4)
    ref = F.grid_sample(volume, (x * 2 - 1).view(1, 50, 1, 1, 3), align_corners=True).view(2, 50).T
    assert torch.allclose(enc(x)[:, :2], ref, atol=1e-5)


def test_far_corner_stays_inside_every_table(torch_seed):
    enc = HashGridEncoding(2, 2, 10, 4, 2.0)  # both levels dense: a corner past the end would be out of range
    with torch.no_grad():
        enc.embeddings.normal_()
    out = enc(torch.ones(3))
    assert torch.allclose(out[:2], enc.level_table(0)[-1]) and torch.allclose(out[2:], enc.level_table(1)[-1])


def test_hashed_level_uses_instant_ngp_hash(torch_seed):
    enc = HashGridEncoding(4, 2, 10, 4, 2.0)
    with torch.no_grad():
        enc.embeddings.normal_()
    i, j, k = 7, 13, 2  # a vertex of level 2 (res 16, hashed)
    row = (i * 1 ^ j * 2654435761 ^ k * 805459861) % 1024
    x = torch.tensor([i, j, k], dtype=torch.float32) / 15.0
    assert torch.allclose(enc(x)[4:6], enc.level_table(2)[row], atol=1e-6)


def test_masked_levels_give_zero_features_and_zero_grad(torch_seed):
    field = Field(TINY)
    field.set_active_levels(2)
    assert field.active_levels == 2
    feats = field.encoding(torch.rand(100, 3))
    assert feats[:, 4:].abs().max() == 0 and feats[:, :4].abs().max() > 0
    (feats * torch.randn_like(feats)).sum().backward()
    grad = field.encoding.embeddings.grad
    enc = field.encoding
    assert grad[enc.offsets[2]:].abs().max() == 0
    assert grad[:enc.offsets[2]].abs().max() > 0
    field.set_active_levels(99)
    assert field.active_levels == 4
    field.set_active_levels(0)
    assert field.active_levels == 1


def test_table_init_range():
    emb = Field(FieldConfig()).encoding.embeddings
    assert emb.abs().max() <= 1e-4 and emb.shape[1] == 2


# ------------------------------------------------------------------------------------------------
# field


def blob_only() -> Field:
    field = Field(TINY)
    with torch.no_grad():
        field.mlp[-1].weight.zero_()
        field.mlp[-1].bias.zero_()
    return field


def test_blob_density_and_zero_outside():
    field = blob_only()
    x = torch.tensor([[0.0, 0.0, 0.0], [0.3, -0.2, 0.1], [0.9, 0.9, -0.9], [1.2, 0.0, 0.0], [0.0, -0.5, 1.01]])
    density, albedo = field(x)
    expected = F.softplus(10.0 * (1 - x.norm(dim=-1) / 0.5))
    assert torch.allclose(density[:3], expected[:3], rtol=1e-5)
    assert torch.equal(density[3:], torch.zeros(2))
    assert torch.allclose(albedo, torch.full_like(albedo, 0.5))


def test_blob_normals_point_outwards(torch_seed):
    x = F.normalize(torch.randn(200, 3), dim=-1) * (0.1 + 0.6 * torch.rand(200, 1))
    n = blob_only().normals(x)
    assert torch.allclose(n.norm(dim=-1), torch.ones(200), atol=1e-4)
    assert (n * F.normalize(x, dim=-1)).sum(-1).min() > 0.999


def test_normals_are_differentiable(torch_seed):
    field = Field(TINY)
    field.normals(torch.rand(20, 3) - 0.5).sum().backward()
    assert field.mlp[0].weight.grad.abs().max() > 0


def test_background_starts_grey(torch_seed):
    bg = Background()
    c = bg(torch.randn(100, 3))
    assert c.shape == (100, 3) and (c - 0.5).abs().max() < 0.05


# ------------------------------------------------------------------------------------------------
# renderer on an analytic sphere


def test_sphere_centre_depth_and_missed_rays():
    bg = Background()
    out = render(Sphere(), bg, camera(), 33, 33, n_samples=64)
    bin_width = 2.0 / 64  # the ray through the centre crosses the cube from x=1 to x=-1
    assert out.rgb.shape == (1, 33, 33, 3) and out.opacity.shape == (1, 33, 33, 1)
    assert out.opacity[0, 16, 16, 0] > 0.999
    assert 1.5 <= out.depth[0, 16, 16, 0] <= 1.5 + bin_width
    assert torch.allclose(out.rgb[0, 16, 16], ALBEDO, atol=1e-3)
    # corner of a 40° view passes beside the sphere: nothing but background
    _, d = rays(camera(), 33, 33)
    assert out.opacity[0, 0, 0, 0] < 1e-6
    assert torch.allclose(out.rgb[0, 0, 0], bg(d[0, 0, 0]), atol=1e-6)
    # with a 120° view the corner ray misses the cube itself: exactly zero weight
    wide = render(Sphere(), bg, camera(fovy=120.0), 33, 33, n_samples=16)
    assert wide.opacity[0, 0, 0, 0] == 0 and wide.depth[0, 0, 0, 0] == 0


@pytest.mark.parametrize("fovy", [40.0, 60.0])
def test_silhouette_matches_projected_disc(fovy):
    h = 64
    out = render(Sphere(), Background(), camera(fovy=fovy), h, h, n_samples=64, need_normals=False)
    area = (out.opacity > 0.5).float().mean().item()
    focal = 0.5 * h / math.tan(math.radians(fovy) / 2)
    disc_radius_px = focal * math.tan(math.asin(RADIUS / 2.0))
    expected = math.pi * disc_radius_px ** 2 / h ** 2
    assert abs(area - expected) / expected < 0.03


def test_textureless_and_diffuse_shading():
    cfg = ShadingConfig()
    assert (cfg.ambient, cfg.diffuse) == (0.1, 0.9)
    bg = Background()
    cams = Cameras.cat([camera(), camera(), camera()])
    out = render(Sphere(), bg, cams, 33, 33, n_samples=64, shading=["textureless", "albedo", "diffuse"])
    centre = out.rgb[:, 16, 16]
    assert torch.allclose(centre[0], torch.full((3,), cfg.ambient + cfg.diffuse), atol=0.02)
    assert torch.allclose(centre[1], ALBEDO, atol=1e-3)
    assert torch.allclose(centre[2], ALBEDO * (cfg.ambient + cfg.diffuse), atol=0.02)
    # along the middle row, covered pixels get darker towards the silhouette (n.l falls off)
    row = out.rgb[0, 16, :, 0]
    covered = out.opacity[0, 16, :, 0] > 0.999
    inner = row[covered]
    half = inner[len(inner) // 2:]
    assert (half[1:] <= half[:-1] + 1e-4).all() and half[-1] < half[0] - 0.3
    # light behind the object: the visible face only gets ambient light
    dark = render(Sphere(), bg, camera(light=[-3.0, 0.0, 0.0]), 33, 33, shading="textureless")
    assert torch.allclose(dark.rgb[0, 16, 16], torch.full((3,), cfg.ambient), atol=1e-3)


def test_orientation_penalty_sees_flipped_normals():
    good = render(Sphere(), Background(), camera(), 32, 32, n_samples=32)
    bad = render(Sphere(flip=True), Background(), camera(), 32, 32, n_samples=32)
    assert good.orientation.shape == (1,)
    assert good.orientation.item() < 1e-6
    assert bad.orientation.item() > 0.3  # about E[cos^2] over the disc: 0.5-ish
    # normal map: centre pixel's normal points at the camera (+x)
    assert torch.allclose(good.normal[0, 16, 16], torch.tensor([1.0, 0.0, 0.0]), atol=0.05)


def test_z_variance_small_for_hard_surface_large_for_fog():
    hard = render(Sphere(), Background(), camera(), 16, 16, n_samples=64)
    assert hard.z_variance.item() < (2.0 / 64) ** 2

    class Fog(Sphere):
        def forward(self, x):
            return torch.full(x.shape[:-1], 3.0), ALBEDO.expand(*x.shape[:-1], 3)

    fog = render(Fog(), Background(), camera(), 16, 16, n_samples=64)
    assert fog.z_variance.item() > 0.05  # weights spread over the 2-unit chord


def test_albedo_without_normals_gives_zero_normal_outputs(torch_seed):
    out = render(Field(TINY), Background(), camera(), 8, 8, n_samples=16, need_normals=False)
    assert out.normal.abs().max() == 0 and out.orientation.abs().max() == 0
    with_n = render(Field(TINY), Background(), camera(), 8, 8, n_samples=16, need_normals=False, shading="diffuse")
    assert with_n.normal.abs().max() > 0  # diffuse needs normals regardless


# ------------------------------------------------------------------------------------------------
# learned field through the renderer


def test_gradients_reach_tables_mlp_and_background(torch_seed):
    field, bg = Field(TINY), Background()
    cams = Cameras.cat([camera(), camera(fovy=60.0)])
    out = render(field, bg, cams, 16, 16, n_samples=16, shading=["diffuse", "albedo"])
    assert out.rgb.min() >= 0 and out.rgb.max() <= 1
    (out.rgb * torch.randn_like(out.rgb)).sum().backward()
    for p in [field.encoding.embeddings, *field.mlp.parameters(), *bg.parameters()]:
        assert p.grad is not None and p.grad.abs().max() > 0


def test_regularisers_are_differentiable(torch_seed):
    field = Field(TINY)
    out = render(field, Background(), camera(), 16, 16, n_samples=16, shading="textureless")
    (out.orientation.sum() + out.z_variance.sum() + out.opacity.mean()).backward()
    assert field.mlp[0].weight.grad.abs().max() > 0


def test_perturbed_sampling_is_seeded(torch_seed):
    field, bg = Field(TINY), Background()
    draw = lambda seed: render(field, bg, camera(), 8, 8, n_samples=16, perturb=True,  # noqa: E731
                               generator=torch.Generator().manual_seed(seed)).depth
    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    fixed = render(field, bg, camera(), 8, 8, n_samples=16).depth
    assert not torch.equal(draw(1), fixed)


def test_bad_shading_arguments():
    with pytest.raises(ValueError):
        render(Sphere(), Background(), camera(), 4, 4, shading="phong")
    with pytest.raises(ValueError):
        render(Sphere(), Background(), camera(), 4, 4, shading=["albedo", "diffuse"])


def test_ray_box_entry_and_exit():
    origins = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.2, 0.3, -0.1], [2.0, 2.0, 0.0]])
    directions = F.normalize(torch.tensor([[-1.0, 0.0, 0.0], [-1.0, 0.5, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]]),
                             dim=-1)
    near, far, hit = ray_box(origins, directions, 1.0)
    s = math.sqrt(1.25)  # length of (1, 0.5) per unit of x
    expected_near = torch.tensor([1.0, s, 0.0, 0.0])  # inside the cube: start at the camera; a miss: 0
    expected_far = torch.tensor([3.0, 2.0 * s, 1.1, 0.0])  # second ray leaves through y = 1 at x = 0
    assert hit.tolist() == [True, True, True, False]
    assert torch.allclose(near, expected_near, atol=1e-5) and torch.allclose(far, expected_far, atol=1e-5)


def test_z_variance_uses_per_ray_normalised_weights():
    """Constant density c along a 2-unit chord: the normalised weights are a truncated exponential."""
    c, length = 0.46, 2.0

    class Haze(Sphere):
        def forward(self, x):
            return torch.full(x.shape[:-1], c), ALBEDO.expand(*x.shape[:-1], 3)

    out = render(Haze(), Background(), camera(), 1, 1, n_samples=512)  # the one ray is the optical axis
    e = math.exp(-c * length)
    assert out.opacity.item() == pytest.approx(1 - e, abs=1e-3) and out.opacity.item() > 0.5
    variance = 1 / c ** 2 - length ** 2 * e / (1 - e) ** 2
    assert out.z_variance.item() == pytest.approx(variance, rel=0.01)


def test_analytic_normals_match_finite_differences_and_train_the_field():
    torch.manual_seed(3)
    field = Field(TINY)
    with torch.no_grad():
        for p in field.parameters():
            p.normal_(0, 0.5)  # a field with structure, not just the blob
    x = (torch.rand(500, 3) - 0.5) * 0.8
    density, albedo, analytic = field.with_normals(x)
    fd = Field(dataclasses.replace(TINY, normal_type="finite_difference", normal_eps=1e-4))
    fd.load_state_dict(field.state_dict())
    reference = fd.normals(x.double().float())
    agree = (analytic * reference).sum(-1)
    assert agree.median() > 0.999 and (agree > 0.9).float().mean() > 0.97
    assert torch.allclose(density, field(x)[0]) and torch.allclose(albedo, field(x)[1])
    analytic.sum().backward()  # second-order path: normals depend on the parameters
    assert field.encoding.embeddings.grad.abs().sum() > 0 and field.mlp[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        d, _, n = field.with_normals(x)
    assert not d.requires_grad and not n.requires_grad and torch.allclose(n, analytic.detach(), atol=1e-6)
