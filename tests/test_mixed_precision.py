"""The field's MLP under mixed precision (``FieldConfig.mlp_precision``) against float32.

The bounds are derived from the number format, not tuned: with unit roundoff u (2^-8 for
bfloat16, 2^-11 for float16), a product of rounded operands accumulated in float32, a rounded
bias and a rounded output err by at most 4u(|W||a| + |b|) per layer output, plus |W| times the
error already in the layer's input. Softplus is 1-Lipschitz and the sigmoid 1/4-Lipschitz.
"""

import dataclasses

import pytest
import torch

from mvsdi.field import Field, FieldConfig

TINY = FieldConfig(n_levels=4, log2_table_size=10, base_resolution=4, per_level_scale=2.0, hidden_dim=16)
UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}


def _fields(precision: str) -> tuple[Field, Field]:
    torch.manual_seed(0)
    reference = Field(TINY)
    with torch.no_grad():  # features of order 1, so the encoding matters as much as the biases
        reference.encoding.embeddings.normal_(0.0, 0.5)
    mixed = Field(dataclasses.replace(TINY, mlp_precision=precision))
    mixed.load_state_dict(reference.state_dict())
    return reference, mixed


def _points(n: int = 2048) -> torch.Tensor:
    return (torch.rand(n, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1) * 0.95


def _layer_bounds(field: Field, x: torch.Tensor, u: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden pre-activation h [P, H], its error bound [P, H], the raw outputs' error bound [P, 4])."""
    first, second = field.mlp[0], field.mlp[2]
    with torch.no_grad():
        enc = field.encoding((x / field.cfg.bound + 1.0) * 0.5)
        hidden = first(enc)
        err1 = 4 * u * (enc.abs() @ first.weight.abs().T + first.bias.abs())
        act = torch.relu(hidden).abs() + err1
        err2 = err1 @ second.weight.abs().T + 4 * u * (act @ second.weight.abs().T + second.bias.abs())
    return hidden, err1, err2


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_mixed_precision_values_stay_within_the_rounding_bound(precision):
    reference, mixed = _fields(precision)
    x = _points()
    _, _, err = _layer_bounds(reference, x, UNIT_ROUNDOFF[precision])
    with torch.no_grad():
        (d0, a0), (d1, a1) = reference(x), mixed(x)
    assert d1.dtype == torch.float32 and a1.dtype == torch.float32
    assert ((d1 - d0).abs() <= err[:, 0]).all()
    assert ((a1 - a0).abs() <= err[:, 1:] / 4).all()
    assert (d1 != d0).any(), "autocast did not change the products: the test would pass vacuously"


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_mixed_precision_normals_stay_within_the_rounding_bound(precision):
    """The explicit-Jacobian normals: the row d raw0/d enc = (W2[0] * relu'(h)) W1 errs by 4u |W2[0]| |W1|,
    plus the whole term of any hidden unit whose sign the rounding may flip (|h| <= its error bound)."""
    reference, mixed = _fields(precision)
    x, u = _points(), UNIT_ROUNDOFF[precision]
    hidden, err1, err2 = _layer_bounds(reference, x, u)
    first, second = reference.mlp[0], reference.mlp[2]
    with torch.no_grad():
        _, jac = reference.encoding.encode_with_jacobian((x / TINY.bound + 1.0) * 0.5)
        terms = second.weight[0].abs()[None, :, None] * first.weight.abs()[None]  # [1, H, LF]
        flippable = (hidden.abs() <= err1).to(terms.dtype)[:, :, None]
        d_enc_err = 4 * u * terms.sum(1) + (flippable * terms).sum(1)  # [P, LF]
        d_raw_err = (d_enc_err[:, None, :] @ jac.abs())[:, 0] * (0.5 / TINY.bound)  # [P, 3]
        (_, _, g0), (_, _, g1) = reference._explicit_gradient(x), mixed._explicit_gradient(x)
        # grad = softplus'(z) (d raw + d blob): softplus' = sigmoid is 1/4-Lipschitz in z and at most 1
        z_err = err2[:, 0]
        plain = g0 / torch.sigmoid(hidden.new_zeros(()) + _z(reference, x))[:, None]
        grad_err = d_raw_err + z_err[:, None] / 4 * plain.abs()
        normal_err = 2 * grad_err.norm(dim=-1) / g0.norm(dim=-1)
        n0 = torch.nn.functional.normalize(-g0, dim=-1)
        n1 = torch.nn.functional.normalize(-g1, dim=-1)
    assert (g1 - g0).abs().le(grad_err).all()
    assert ((n1 - n0).norm(dim=-1) <= normal_err).all()


def _z(field: Field, x: torch.Tensor) -> torch.Tensor:
    """The softplus input raw0 + blob bias of the float32 field."""
    enc = field.encoding((x / field.cfg.bound + 1.0) * 0.5)
    return field.mlp(enc)[:, 0] + field.blob_bias(x)


def test_mixed_precision_trains_the_float32_parameters():
    reference, mixed = _fields("bfloat16")
    density, albedo, normals = mixed.with_normals(_points(256))
    (density.mean() + albedo.mean() + normals[:, 0].mean()).backward()
    for name, parameter in mixed.named_parameters():
        assert parameter.dtype == torch.float32 and parameter.grad is not None, name
        assert parameter.grad.dtype == torch.float32 and parameter.grad.isfinite().all(), name


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="mlp_precision must be one of float32, bfloat16, float16"):
        FieldConfig(mlp_precision="float8")
