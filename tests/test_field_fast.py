"""Explicit-Jacobian normals and the custom hash-grid Function (issue 11) against their autograd references.

Equalities are checked in float64 with bounds far above its rounding (~1e-16 relative) and far
below any real mistake, so that the CPU or thread count cannot decide them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mvsdi.field as field_module
from mvsdi.field import Field, FieldConfig, HashGridEncoding, _HashGridFunction

# Resolutions 8, 16, 32, 64 in a 2^12 table: two dense levels (8^3, 16^3 = 2^12) and two hashed.
SMALL = FieldConfig(n_levels=4, log2_table_size=12, base_resolution=8, per_level_scale=2.0, hidden_dim=16)
RTOL = 1e-10


def random_field(cfg: FieldConfig = SMALL, seed: int = 0, active_levels: int | None = None) -> Field:
    """A float64 field with structure (not the 1e-4 init), so that a wrong term shows."""
    torch.manual_seed(seed)
    field = Field(cfg).double()
    with torch.no_grad():
        for p in field.parameters():
            p.normal_(0.0, 0.5)
    if active_levels is not None:
        field.set_active_levels(active_levels)
    return field


def reference_of(field: Field) -> Field:
    ref = Field(dataclasses.replace(field.cfg, normal_type="autograd")).double()
    ref.load_state_dict(field.state_dict())
    return ref


def hard_points(n: int = 600, seed: int = 1) -> torch.Tensor:
    """Random points in and around the cube, plus vertices and near-vertices of every level, the
    cube's faces and corners, and the origin (where the blob's gradient is defined as 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=g, dtype=torch.float64) * 2.4 - 1.2  # ~42% outside the cube
    grid = []
    for res in (8, 16, 32, 64):
        k = torch.randint(0, res, (40, 3), generator=g).double() / (res - 1)  # vertices in [0, 1]
        for shift in (0.0, 1e-9, -1e-9):
            grid.append((k + shift) * 2.0 - 1.0)
    special = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [-1.0, -1.0, -1.0], [1.0, 0.2, -0.3],
                            [-1.0, 0.5, 0.5], [1.0 + 1e-12, 0.0, 0.0], [0.3, -1.0 - 1e-12, 0.2]], dtype=torch.float64)
    return torch.cat([x, *grid, special])


def autograd_gradient(field: Field, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(field.forward_autograd(x)[0].sum(), x)
    return grad


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    """Equal up to rtol of the largest magnitude (elementwise relative bounds fail on cancellations)."""
    scale = expected.abs().max().clamp_min(1.0)
    assert (actual - expected).abs().max() <= rtol * scale, ((actual - expected).abs().max(), scale)


def field_loss(density, albedo, normals, weights):
    """Uses all three outputs non-linearly, as shading and the orientation loss do."""
    return (density.square().mean() * 1e-3 + (albedo * weights).sum(-1).mean()
            + (normals * weights).sum(-1).square().mean() + (normals[..., 2] * density).mean())


# ------------------------------------------------------------------------------------------------
# normals


@pytest.mark.parametrize("active_levels", [None, 2, 3])
def test_explicit_gradient_and_normals_equal_autograd(active_levels):
    field = random_field(active_levels=active_levels)
    x = hard_points()
    with torch.no_grad():
        density, albedo, grad = field._explicit_gradient(x)
    assert_close(grad, autograd_gradient(field, x))
    expected_density, expected_albedo = field.forward_autograd(x)
    assert_close(density, expected_density.detach())
    assert_close(albedo, expected_albedo.detach())
    outside = (x.abs() > 1.0).any(-1)
    assert outside.sum() > 100 and (grad[outside] == 0).all() and grad[~outside].abs().sum(-1).min() > 0
    d, a, n = field.with_normals(x)
    d_ref, a_ref, n_ref = reference_of(field).with_normals(x)
    strong = grad.norm(dim=-1) > 1e-3  # normalising amplifies rounding where the gradient vanishes
    assert strong.sum() > 300
    assert_close(n[strong], n_ref[strong])
    assert_close(d, d_ref)
    assert_close(a, a_ref)


def test_softplus_threshold_region_is_matched():
    """Above PyTorch's softplus threshold (20) its slope is exactly 1, not sigmoid(z)."""
    field = random_field()
    with torch.no_grad():
        field.mlp[2].bias[0] += 22.0  # z > 20 near the centre, < 20 far out (the blob is < 0 there)
    x = hard_points()
    with torch.no_grad():
        z = field.mlp(field.encoding(x / 2 + 0.5))[:, 0] + field.blob_bias(x)
        grad = field._explicit_gradient(x)[2]
    assert (z > 20).sum() > 50 and (z < 20).sum() > 50
    assert_close(grad, autograd_gradient(field, x))


@pytest.mark.parametrize("active_levels", [None, 2])
def test_parameter_gradients_equal_the_double_backward(active_levels, monkeypatch):
    monkeypatch.setattr(field_module, "_CHUNK", 257)  # several chunks in forward and backward
    field = random_field(seed=2, active_levels=active_levels)
    ref = reference_of(field)
    x = hard_points(seed=3)
    weights = torch.randn(len(x), 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    field_loss(*field.with_normals(x), weights).backward()
    field_loss(*ref.with_normals(x), weights).backward()
    for (name, p), q in zip(field.named_parameters(), ref.parameters()):
        assert q.grad.abs().max() > 0, name
        assert_close(p.grad, q.grad)
    if active_levels is not None:  # masked levels get no gradient
        assert (field.encoding.embeddings.grad[field.encoding.offsets[active_levels]:] == 0).all()


def test_frozen_parameters_and_unused_outputs():
    field = random_field(seed=5)
    ref = reference_of(field)
    for f in (field, ref):
        f.mlp.requires_grad_(False)
    x = hard_points(200, seed=6)
    for f in (field, ref):
        _, _, normals = f.with_normals(x)  # density and albedo unused: their gradients are None
        normals[:, 0].sum().backward()
    assert field.mlp[0].weight.grad is None
    assert_close(field.encoding.embeddings.grad, ref.encoding.embeddings.grad)


def test_no_graph_when_grad_is_disabled():
    field = random_field()
    x = hard_points(100)
    # (the "autograd" reference cannot run under inference_mode: its enable_grad meets inference tensors)
    cases = {torch.no_grad: ("analytic", "autograd", "finite_difference"),
             torch.inference_mode: ("analytic", "finite_difference")}
    for context, kinds in cases.items():
        for kind in kinds:
            f = Field(dataclasses.replace(SMALL, normal_type=kind)).double()
            f.load_state_dict(field.state_dict())
            with context():
                nbytes, outputs = saved_bytes(f, lambda f=f: f.with_normals(x))
            assert all(t.grad_fn is None and not t.requires_grad for t in outputs), kind
            # the reference's first backward needs a (freed) graph w.r.t. x even here
            assert nbytes == 0 or kind == "autograd"


def test_with_normals_keeps_leading_shapes_and_types():
    field = random_field()
    x = hard_points(96)[:96].view(2, 3, 4, 4, 3)
    density, albedo, normals = field.with_normals(x)
    assert density.shape == (2, 3, 4, 4) and albedo.shape == normals.shape == (2, 3, 4, 4, 3)
    assert_close(density, field(x)[0])  # the same values as the plain forward
    empty = torch.zeros(0, 3, dtype=torch.float64)  # e.g. a render whose samples all were skipped
    d, a, n = field.with_normals(empty)
    assert d.shape == (0,) and a.shape == n.shape == (0, 3)
    (d.sum() + a.sum() + n.sum()).backward()
    assert field.encoding.embeddings.grad.abs().max() == 0
    with pytest.raises(ValueError, match="normal_type must be one of"):
        FieldConfig(normal_type="explicit")
    assert FieldConfig().normal_type == "analytic"  # old configs' "analytic" is the new fast path


# ------------------------------------------------------------------------------------------------
# the custom encoding Function


def small_encoding(seed: int = 0) -> HashGridEncoding:
    """Levels of 3 (dense) and 6 (hashed) vertices in a 2^6 table: 91 rows, cheap to gradcheck."""
    torch.manual_seed(seed)
    enc = HashGridEncoding(2, 2, 6, 3, 2.0).double()
    with torch.no_grad():
        enc.embeddings.normal_()
    return enc


@pytest.mark.parametrize("keep", [False, True])
def test_gradcheck_of_the_encoding_function_wrt_the_table(keep):
    enc = small_encoding()
    x = torch.rand(16, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.2 - 0.1
    table = enc.embeddings.detach().clone().requires_grad_(True)
    mask = torch.tensor([1.0, 1.0], dtype=torch.float64)
    run = lambda t: _HashGridFunction.apply(x, t, mask, enc._grid(), True, keep)  # noqa: E731
    assert torch.autograd.gradcheck(run, (table,))
    only_enc = lambda t: _HashGridFunction.apply(x, t, mask, enc._grid(), False, keep)  # noqa: E731
    assert torch.autograd.gradcheck(only_enc, (table,))


def test_gradcheck_of_the_encoding_wrt_the_points():
    enc = small_encoding(1)
    # inside (0, 1) and away from the cell faces, where the encoding is smooth
    x = (torch.rand(12, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.8 + 0.1)
    x = x.requires_grad_(True)
    assert torch.autograd.gradcheck(enc.encode, (x,))
    with pytest.raises(ValueError, match="must not require grad"):
        enc.encode_with_jacobian(x)


@pytest.mark.parametrize("active_levels", [4, 2])
def test_encoding_values_and_table_gradients_equal_the_plain_lookup(active_levels):
    field = random_field(active_levels=active_levels)
    enc = field.encoding
    x01 = hard_points(seed=7) * 0.5 + 0.5  # outside [0, 1] too: the clamp
    upstream = torch.randn(len(x01), enc.output_dim, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    (grad_plain,) = torch.autograd.grad((enc(x01) * upstream).sum(), enc.embeddings)
    (grad_fast,) = torch.autograd.grad((enc.encode(x01) * upstream).sum(), enc.embeddings)
    assert_close(enc.encode(x01), enc(x01), rtol=1e-13)
    assert_close(enc.encode_with_jacobian(x01)[0], enc(x01), rtol=1e-13)
    assert_close(grad_fast, grad_plain, rtol=1e-13)


@pytest.mark.parametrize("active_levels", [4, 3])
def test_encoding_jacobian_equals_autograd_of_the_plain_lookup(active_levels):
    """Including points outside [0, 1] (the clamp: no gradient there) and on cell faces."""
    enc = random_field(active_levels=active_levels).encoding
    x01 = (hard_points(seed=10) * 0.5 + 0.5).requires_grad_(True)
    plain = enc(x01)
    expected = torch.stack([torch.autograd.grad(plain[:, k].sum(), x01, retain_graph=True)[0]
                            for k in range(enc.output_dim)], 1)  # [P, L*F, 3]
    with torch.no_grad():
        _, jac = enc.encode_with_jacobian(x01)
    assert_close(jac, expected)
    outside = ((x01 < 0) | (x01 > 1)).detach()  # per coordinate
    assert outside.any() and (jac.transpose(1, 2)[outside] == 0).all()


def reference_indices(enc: HashGridEncoding, low: torch.Tensor) -> torch.Tensor:
    """The corner rows as the original lookup formed them (both kinds on every level, then chosen)."""
    v = low[..., None] + torch.arange(2)
    res = enc._res[:, None]
    dx, dy, dz = v[:, :, 0], v[:, :, 1] * res, v[:, :, 2] * res * res
    dense = dx[..., :, None, None] + dy[..., None, :, None] + dz[..., None, None, :]
    hx, hy, hz = v[:, :, 0], v[:, :, 1] * 2654435761, v[:, :, 2] * 805459861
    hashed = (hx[..., :, None, None] ^ hy[..., None, :, None] ^ hz[..., None, None, :]) & (enc.max_table_size - 1)
    level = (slice(None), None, None, None)
    return torch.where(enc._dense[level], dense, hashed) + enc._offset[level]


@pytest.mark.parametrize("shape, n_dense", [((4, 2, 12, 8, 2.0), 2), ((3, 2, 12, 32, 0.5), None)])
def test_corner_rows_are_the_original_hash(shape, n_dense):
    enc = HashGridEncoding(*shape)  # the second has its dense levels last (shrinking resolutions)
    assert enc._n_dense == n_dense
    x = torch.rand(500, 1, 3, generator=torch.Generator().manual_seed(9))
    low = torch.minimum((x * (enc._res - 1)[:, None]).floor().long(), (enc._res - 2)[:, None])
    index = enc._indices(low)
    assert index.dtype == torch.int32  # every row number fits: half the integer traffic of int64
    assert torch.equal(index.long(), reference_indices(enc, low))
    wide = field_module._corner_indices(low, enc._grid()._replace(index_dtype=torch.int64))  # > 2^31 rows
    assert wide.dtype == torch.int64 and torch.equal(wide, reference_indices(enc, low))


# ------------------------------------------------------------------------------------------------
# memory


def saved_bytes(module: torch.nn.Module, run):
    """(bytes of distinct storages saved for backward while ``run`` runs, excluding the module's
    parameters and buffers (not per point), its result)."""
    fixed = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    sizes: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in fixed:
            sizes[storage.data_ptr()] = storage.nbytes()
        return t  # held, so that no address is reused while measuring

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = run()
    return sum(sizes.values()), result


def test_saved_bytes_per_point_with_normals_of_the_paper_field():
    torch.manual_seed(0)
    field = Field(FieldConfig())  # 16 levels, 2^19 table, float32
    ref = reference_of(field).float()
    x = torch.rand(4096, 3, generator=torch.Generator().manual_seed(0)) * 2.0 - 1.0
    weights = torch.randn(len(x), 3, generator=torch.Generator().manual_seed(1))
    new, outputs = saved_bytes(field, lambda: field.with_normals(x))
    old, _ = saved_bytes(ref, lambda: ref.with_normals(x))
    assert new / len(x) <= 512 and old / len(x) > 4000  # today's reference: ~4.8 KB a point
    field_loss(*outputs, weights).backward()
    assert field.encoding.embeddings.grad.abs().max() > 0 and field.mlp[0].weight.grad.abs().max() > 0


def test_the_compiled_field_equals_the_eager_reference():
    """``FieldConfig.compiled``: the forward and the explicit-normal pass under torch.compile (Inductor's
    CPU backend here) give the eager values, normals and parameter gradients, with and without a graph.
    One test for both passes, because compiling costs ~20-40 s on a 2-core CPU."""
    eager = random_field(SMALL)
    fast = Field(dataclasses.replace(SMALL, compiled=True)).double()
    fast.load_state_dict(eager.state_dict())
    x = hard_points(200)
    weights = torch.linspace(-1.0, 1.0, 3, dtype=torch.float64)
    outputs = []
    for field in (eager, fast):
        density, albedo, normals = field.with_normals(x)
        (density.sum() + albedo.sum() + (normals * weights).sum()).backward()
        with torch.no_grad():
            plain = field(x)
        outputs.append([density, albedo, normals, *plain] + [p.grad for p in field.parameters()])
    for want, got in zip(*outputs):
        assert torch.allclose(got, want, rtol=RTOL, atol=RTOL * want.abs().max().item())
