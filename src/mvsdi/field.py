"""The 3D representation: a multi-resolution hash grid with a small MLP (density + albedo), and a
learned background colour per view direction.

Pure PyTorch, so it runs on CPU and under ``torch.compile``; all levels of the hash grid are looked
up in one vectorised gather (no Python loop over samples).

Normals are -∇density. The default ("analytic") forms that gradient in the forward pass as an
explicit Jacobian (trilinear weight slopes through the hash grid, then the MLP's chain rule), so
training needs only a first-order backward; "autograd" is the same maths by autograd with a double
backward (the reference, kept for tests); "finite_difference" uses central differences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from mvsdi.knobs import knob

# Instant-NGP's spatial-hash primes (the first is 1 so that x stays coherent in memory).
_PRIMES = (1, 2654435761, 805459861)
NORMAL_TYPES = ("analytic", "autograd", "finite_difference")
# Number formats of the MLP's matrix products (``FieldConfig.mlp_precision``); None: no autocast.
MLP_PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
# PyTorch's softplus is the identity above this input (its default threshold), so its slope is 1.
_SOFTPLUS_THRESHOLD = 20.0
# Points per chunk of the explicit-normal pass when it runs outside torch.compile: bounds the
# transient memory of corner rows, weights and features (~4 KB a point with 16 levels, so ~0.5 GB
# a chunk) in forward and backward, while each kernel still sees 2^21 corners.
_CHUNK = 1 << 17


@dataclass(frozen=True)
class FieldConfig:
    bound: float = knob(1.0, "the field lives in the cube [-bound, bound]^3; outside, density is 0")
    n_levels: int = knob(16, "hash-grid levels")
    features_per_level: int = knob(2, "hash-grid features per level")
    log2_table_size: int = knob(19, "log2 of the hash table's entries per level")
    base_resolution: int = knob(16, "resolution of the coarsest hash-grid level")
    per_level_scale: float = knob(1.4473, "resolution factor between hash-grid levels")
    hidden_dim: int = knob(64, "width of the MLP")
    blob_scale: float = knob(10.0, "Magic3D density blob: bias = blob_scale * (1 - |x| / blob_std)")
    blob_std: float = knob(0.5, "Magic3D density blob's std")
    normal_type: str = knob("analytic", "analytic: -∇density as an explicit Jacobian in the forward pass (first-"
                                        "order backward only); autograd: the same by a double backward (the "
                                        "reference's way, slow); finite_difference: central differences")
    normal_eps: float = knob(1e-2, "finite-difference step for normals (world units)")
    # ~20-40x faster on an H200 (docs/design.md); "autograd" normals while training stay eager:
    # aot_autograd has no double backward
    compiled: bool = knob(False, "evaluate the field under torch.compile (default mode)")
    # mixed precision: the hash table, its interpolation, the blob and the outputs stay float32
    mlp_precision: str = knob("float32", "number format of the MLP's matrix products: float32 (the reference), "
                                         "or bfloat16 / float16 under torch.autocast")

    def __post_init__(self) -> None:
        if self.normal_type not in NORMAL_TYPES:
            raise ValueError(f"normal_type must be one of {', '.join(NORMAL_TYPES)}, got {self.normal_type!r}")
        if self.mlp_precision not in MLP_PRECISIONS:
            raise ValueError(f"mlp_precision must be one of {', '.join(MLP_PRECISIONS)}, got {self.mlp_precision!r}")


# ------------------------------------------------------------------------------------------------
# hash-grid geometry, shared by the plain lookup and the custom autograd Function


def _locate(x01: Tensor, res: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per level, the lower cell vertex [P, L, 3] (long) and the position in the cell [P, L, 3] of
    points [P, 3]; also where the clamp to [0, 1] lets a gradient through [P, 1, 3] (as PyTorch's
    clamp does: at the bounds too)."""
    x = x01.reshape(-1, 1, 3)
    passes = (x >= 0.0) & (x <= 1.0)
    x = x.clamp(0.0, 1.0)
    pos = x * (res - 1).to(x.dtype)[:, None]  # [P, L, 3]
    # Clamp the lower vertex so that a point on the far face interpolates inside the last cell.
    low = torch.minimum(pos.floor().long(), (res - 2)[:, None])
    return low, pos - low.to(x.dtype), passes


def _corner_weights(w: Tensor) -> Tensor:
    """Trilinear weights [P, L, 2, 2, 2] from per-axis linear weights w [P, L, 3, 2]."""
    return w[:, :, 0, :, None, None] * w[:, :, 1, None, :, None] * w[:, :, 2, None, None, :]


class _Grid(NamedTuple):
    """What the lookup needs of a ``HashGridEncoding``, passable to an autograd Function."""

    res: Tensor  # [L] vertices per axis
    dense: Tensor  # [L] bool: stored densely
    offset: Tensor  # [L] first row of each level
    table_size: int  # 2^log2_table_size
    n_dense: int | None  # the dense levels are the first n_dense, or None if they are not a prefix
    index_dtype: torch.dtype  # int32 when every row number fits (half the integer traffic), else int64


def _corner_indices(low: Tensor, grid: _Grid) -> Tensor:
    """Table rows [P, L, 2, 2, 2] of the 8 cell corners (axes: x, y, z offset) of lower vertices [P, L, 3].

    Per-axis terms are formed on [P, L, 3, 2] in int64 (exact hash products) and reduced to their
    final bits there, so the corner-sized combinations run in ``grid.index_dtype``. When the dense
    levels come first (resolutions growing with the level), each kind of row is formed only on its
    own levels; otherwise both on all levels and chosen per level.
    """
    v = low[..., None] + torch.arange(2, device=low.device)  # [P, L, 3, 2] corner coordinate per axis
    res, offset, n, dtype = grid.res, grid.offset, grid.n_dense, grid.index_dtype
    if n is None:
        return torch.where(grid.dense[:, None, None, None], _dense_rows(v, res, offset, dtype),
                           _hashed_rows(v, grid.table_size, offset, dtype))
    return torch.cat([_dense_rows(v[:, :n], res[:n], offset[:n], dtype),
                      _hashed_rows(v[:, n:], grid.table_size, offset[n:], dtype)], 1)


def _dense_rows(v: Tensor, res: Tensor, offset: Tensor, dtype: torch.dtype) -> Tensor:
    """Rows of the corners [P, L, 2, 2, 2] in dense levels (x fastest), from corner coordinates v."""
    r = res[:, None]
    terms = v[:, :, 0] + offset[:, None], v[:, :, 1] * r, v[:, :, 2] * r * r  # the offset rides on x
    dx, dy, dz = (t.to(dtype) for t in terms)
    return dx[..., :, None, None] + dy[..., None, :, None] + dz[..., None, None, :]


def _hashed_rows(v: Tensor, table_size: int, offset: Tensor, dtype: torch.dtype) -> Tensor:
    """Rows of the corners [P, L, 2, 2, 2] in hashed levels: Instant-NGP's XOR spatial hash."""
    # Only the low log2_table_size bits are kept, and those of a product do not depend on the
    # high bits, so int64 arithmetic gives exactly Instant-NGP's uint32 wrap-around hash; masking
    # each term first is the same as masking their XOR (bitwise) and leaves numbers < table_size.
    hx, hy, hz = ((v[:, :, a] * _PRIMES[a] & (table_size - 1)).to(dtype) for a in range(3))
    hashed = hx[..., :, None, None] ^ hy[..., None, :, None] ^ hz[..., None, None, :]
    return hashed + offset[:, None, None, None].to(dtype)


class _GridGeometry:
    """Corner rows and weights of points [P, 3], recomputable from the points alone (what the custom
    Function's backward does instead of saving them: rows and weights are ~1 KB a point, 16 levels).

    The Jacobian and its transpose use the structure of a trilinear weight rather than its 24
    slopes per cell: d w_ijk / d x = ±scale_x * wy_j * wz_k (− for i = 0, + for i = 1), so
    d enc / d x = scale_x * Σ_jk wy_j wz_k (f_1jk − f_0jk), and likewise for y and z.
    """

    def __init__(self, index: Tensor, weight: Tensor, scale: Tensor | None, pairs: tuple[Tensor, ...] | None) -> None:
        self.index, self.weight, self.scale, self.pairs = index, weight, scale, pairs

    @classmethod
    def of_points(cls, x01: Tensor, grid: _Grid, slopes: bool) -> _GridGeometry:
        """The geometry of points [P, 3]; with ``slopes``, also what the Jacobian needs."""
        res = grid.res
        low, frac, passes = _locate(x01, res)
        w = torch.stack([1.0 - frac, frac], -1)  # [P, L, 3, 2] linear weights per axis
        # [P, L, 2, 2, 2], by the plain lookup's products in its order, so that the encoding is too
        index, weight = _corner_indices(low, grid), _corner_weights(w)
        if not slopes:
            return cls(index, weight, None, None)
        wx, wy, wz = w.unbind(2)
        return cls(index, weight,
                   # d frac / d x01 [P, L, 3]: res_l - 1 per level, 0 where the clamp to [0, 1] is active
                   scale=(res - 1).to(w.dtype)[:, None] * passes.to(w.dtype),
                   # weights of the other two axes [P, L, 2, 2], for axis x, y, z
                   pairs=(wy[..., :, None] * wz[..., None, :], wx[..., :, None] * wz[..., None, :],
                          wx[..., :, None] * wy[..., None, :]))

    def gather(self, table: Tensor) -> Tensor:
        """Features of the 8 corners [P, L, 2, 2, 2, F]."""
        return table.index_select(0, self.index.flatten()).view(*self.index.shape, table.shape[-1])

    def jacobian(self, feats: Tensor) -> Tensor:
        """d enc / d x01 [P, L, F, 3] from corner features [P, L, 2, 2, 2, F] (no level mask)."""
        steps = (feats[:, :, 1] - feats[:, :, 0], feats[:, :, :, 1] - feats[:, :, :, 0],
                 feats[:, :, :, :, 1] - feats[:, :, :, :, 0])  # [P, L, 2, 2, F] along x, y, z
        per_axis = [(step * pair[..., None]).sum((2, 3)) for step, pair in zip(steps, self.pairs)]
        return torch.stack(per_axis, -1) * self.scale[:, :, None, :]

    def corner_rows(self, grad_enc: Tensor | None, grad_jac: Tensor | None) -> Tensor:
        """Each corner's share [P, L, 2, 2, 2, F] of the gradients of the encoding [P, L, F] and of
        its Jacobian [P, L, F, 3] (both already masked): the transpose of the two maps above."""
        f = (grad_enc if grad_enc is not None else grad_jac).shape[2]
        if grad_enc is not None:
            rows = self.weight[..., None] * grad_enc[:, :, None, None, None, :]
        else:
            rows = self.weight.new_zeros(*self.weight.shape, f)
        if grad_jac is None:
            return rows
        g = grad_jac * self.scale[:, :, None, :]  # [P, L, F, 3]
        # [P, L, 2, 2, F] per axis: weight of the other two axes times that axis' gradient
        shares = [pair[..., None] * g[:, :, None, None, :, a] for a, pair in enumerate(self.pairs)]
        for hi, lo, share in zip(_UPPER, _LOWER, shares):  # + on the upper corner, − on the lower one
            rows[hi] += share
            rows[lo] -= share
        return rows


# The corners above (+) and below (−) along x, y, z, as index tuples of [P, L, 2, 2, 2, F].
_UPPER = ((slice(None), slice(None), 1), (slice(None), slice(None), slice(None), 1), (Ellipsis, 1, slice(None)))
_LOWER = ((slice(None), slice(None), 0), (slice(None), slice(None), slice(None), 0), (Ellipsis, 0, slice(None)))


class _HashGridFunction(torch.autograd.Function):
    """Hash-grid encoding [P, L, F] and optionally its Jacobian w.r.t. the points [P, L, F, 3].

    Both are linear in the table, so the backward is one ``index_add_`` of per-corner rows. It
    saves only the points (and the table, a parameter, when the points need a gradient) and
    recomputes corner rows and weights: O(inputs), not O(corners x levels). With ``keep`` it keeps
    the corner geometry instead (for a caller that is itself recomputing inside a backward, where
    memory is per chunk and time counts). The points get a gradient through the encoding, not the
    Jacobian (its own x-derivative is not implemented; ``encode_with_jacobian`` refuses such points).
    """

    @staticmethod
    def forward(ctx, x01: Tensor, table: Tensor, mask: Tensor, grid: _Grid, jacobian: bool, keep: bool):
        g = _GridGeometry.of_points(x01, grid, slopes=jacobian or keep)
        feats = g.gather(table)
        enc = (feats * g.weight[..., None]).flatten(2, 4).sum(2) * mask[:, None]  # as the plain lookup
        kept = (g.index, g.weight, g.scale, *g.pairs) if keep else (None,) * 6
        ctx.save_for_backward(x01, mask, table if ctx.needs_input_grad[0] else None, *kept)
        ctx.grid, ctx.table_shape = grid, table.shape
        ctx.set_materialize_grads(False)  # an unused output gets None, not a zero [P, L, F, 3]
        if not jacobian:
            return enc
        return enc, g.jacobian(feats) * mask[:, None, None]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_enc: Tensor | None, grad_jac: Tensor | None = None):
        x01, mask, table, *kept = ctx.saved_tensors
        if kept[0] is None:
            g = _GridGeometry.of_points(x01, ctx.grid, slopes=grad_jac is not None or ctx.needs_input_grad[0])
        else:
            g = _GridGeometry(*kept[:3], pairs=tuple(kept[3:]))
        grad_enc = grad_enc * mask[:, None] if grad_enc is not None else None
        grad_jac = grad_jac * mask[:, None, None] if grad_jac is not None else None
        grad_x = grad_table = None
        if ctx.needs_input_grad[1] and (grad_enc is not None or grad_jac is not None):
            rows = g.corner_rows(grad_enc, grad_jac)
            grad_table = torch.zeros(ctx.table_shape, dtype=rows.dtype, device=rows.device)
            rows = rows.reshape(-1, ctx.table_shape[-1])
            grad_table.index_add_(0, g.index.flatten().long(), rows)  # int64: ~4x faster on CPU than int32
        if ctx.needs_input_grad[0] and grad_enc is not None:
            jac = g.jacobian(g.gather(table))  # [P, L, F, 3]
            grad_x = (jac * grad_enc[..., None]).sum((1, 2)).view_as(x01)
        return grad_x, grad_table, None, None, None, None


class HashGridEncoding(nn.Module):
    """Multi-resolution hash encoding (Müller et al. 2022) of points in [0, 1]^3.

    Level l has ``res_l = floor(base_resolution * per_level_scale**l)`` vertices per axis; a point
    maps to ``x * (res_l - 1)`` so that vertex 0 sits at 0 and vertex res_l - 1 at 1. A level whose
    ``res_l**3`` vertices fit in ``2**log2_table_size`` entries is stored densely (x fastest), any
    other level through the XOR spatial hash. All levels live in one parameter ``embeddings``
    (rows ``offsets[l] : offsets[l] + table_sizes[l]``) so that one gather serves every level.

    ``forward`` is the plain autograd lookup (differentiable to any order, saves ~1.5 KB a point);
    ``encode`` and ``encode_with_jacobian`` give the same values through a custom Function whose
    backward saves only the points.
    """

    def __init__(self, n_levels: int = 16, features_per_level: int = 2, log2_table_size: int = 19,
                 base_resolution: int = 16, per_level_scale: float = 1.4473) -> None:
        super().__init__()
        self.n_levels, self.features_per_level = n_levels, features_per_level
        self.max_table_size = 2 ** log2_table_size
        self.resolutions = [int(math.floor(base_resolution * per_level_scale ** level)) for level in range(n_levels)]
        if min(self.resolutions) < 2:
            raise ValueError(f"every hash-grid level needs at least 2 vertices per axis, got {self.resolutions}")
        self.table_sizes = [min(r ** 3, self.max_table_size) for r in self.resolutions]
        self.offsets = [sum(self.table_sizes[:level]) for level in range(n_levels)]
        self.embeddings = nn.Parameter(torch.empty(sum(self.table_sizes), features_per_level))
        nn.init.uniform_(self.embeddings, -1e-4, 1e-4)
        # Buffers so that .to(device) moves them and the lookup stays one vectorised expression.
        self.register_buffer("_res", torch.tensor(self.resolutions, dtype=torch.long), persistent=False)
        self.register_buffer("_offset", torch.tensor(self.offsets, dtype=torch.long), persistent=False)
        dense = [r ** 3 <= self.max_table_size for r in self.resolutions]
        self.register_buffer("_dense", torch.tensor(dense), persistent=False)
        # The usual layout (resolutions growing with the level) has the dense levels first; then the
        # dense and the hashed rows are each formed only on their own levels.
        self._n_dense = sum(dense) if dense == sorted(dense, reverse=True) else None
        self._index_dtype = torch.int32 if sum(self.table_sizes) < 2 ** 31 else torch.int64
        # A tensor (not a Python int) so that changing it neither recompiles a compiled field nor is
        # lost with a checkpoint.
        self.register_buffer("active_levels", torch.tensor(n_levels, dtype=torch.long))

    @property
    def output_dim(self) -> int:
        return self.n_levels * self.features_per_level

    def level_table(self, level: int) -> Tensor:
        """The rows of ``embeddings`` that belong to one level (a view, for inspection and tests)."""
        return self.embeddings[self.offsets[level]: self.offsets[level] + self.table_sizes[level]]

    def _indices(self, low: Tensor) -> Tensor:
        """Table rows [P, L, 2, 2, 2] of the 8 cell corners of lower vertices [P, L, 3]."""
        return _corner_indices(low, self._grid())

    def _grid(self) -> _Grid:
        return _Grid(self._res, self._dense, self._offset, self.max_table_size, self._n_dense, self._index_dtype)

    def _level_mask(self, dtype: torch.dtype) -> Tensor:
        # Multiplying by 0 (not skipping) keeps shapes fixed and gives masked tables zero gradient.
        return (torch.arange(self.n_levels, device=self._res.device) < self.active_levels).to(dtype)

    def forward(self, x01: Tensor) -> Tensor:
        lead = x01.shape[:-1]
        x = x01.reshape(-1, 1, 3).clamp(0.0, 1.0)
        scale = (self._res - 1).to(x.dtype)[:, None]  # [L, 1]
        pos = x * scale  # [P, L, 3]
        # Clamp the lower vertex so that a point on the far face interpolates inside the last cell.
        low = torch.minimum(pos.floor().long(), (self._res - 2)[:, None])
        frac = pos - low.to(x.dtype)  # [P, L, 3] in [0, 1]
        w = torch.stack([1.0 - frac, frac], -1)  # [P, L, 3, 2] linear weights per axis
        weight = _corner_weights(w)
        # int64 rows: the gather's backward is an index_add, ~4x slower on CPU with int32 ones.
        # index_select, not F.embedding: its backward (index_add) is ~4x faster on CPU.
        index = self._indices(low).long()
        rows = self.embeddings.index_select(0, index.flatten())
        feats = rows.view(*index.shape, self.features_per_level)  # [P, L, 2, 2, 2, F]
        out = (feats * weight[..., None]).flatten(2, 4).sum(2)  # [P, L, F]
        return (out * self._level_mask(out.dtype)[:, None]).reshape(*lead, self.output_dim)

    def _apply_function(self, x01: Tensor, jacobian: bool, keep: bool = False):
        flat = x01.reshape(-1, 3)
        mask = self._level_mask(self.embeddings.dtype)
        return _HashGridFunction.apply(flat, self.embeddings, mask, self._grid(), jacobian, keep)

    def encode(self, x01: Tensor) -> Tensor:
        """``forward``'s values [..., L*F] by the custom Function (first-order gradients only)."""
        return self._apply_function(x01, False).reshape(*x01.shape[:-1], self.output_dim)

    def encode_with_jacobian(self, x01: Tensor, keep_geometry: bool = False) -> tuple[Tensor, Tensor]:
        """(encoding [..., L*F], its Jacobian d enc / d x01 [..., L*F, 3]); both differentiable w.r.t.
        the table. Points must not need a gradient (the Jacobian's x-derivative is not implemented).
        ``keep_geometry`` saves the corner rows and weights (~2 KB a point) instead of recomputing them."""
        if x01.requires_grad and torch.is_grad_enabled():
            raise ValueError("encode_with_jacobian: the points must not require grad")
        enc, jac = self._apply_function(x01, True, keep_geometry)
        lead = x01.shape[:-1]
        return enc.reshape(*lead, self.output_dim), jac.reshape(*lead, self.output_dim, 3)


def _chunks(n: int) -> list[slice]:
    """Slices of at most ``_CHUNK`` points; one (empty) slice for no points, so shapes still flow."""
    return [slice(i, min(i + _CHUNK, n)) for i in range(0, n, _CHUNK)] or [slice(0, 0)]


def _chunked(run: Callable[[Tensor], tuple[Tensor, ...]], x: Tensor) -> tuple[Tensor, ...]:
    """``run`` over points [P, 3] in chunks of ``_CHUNK``, outputs concatenated (one chunk: no copy)."""
    parts = [run(x[part]) for part in _chunks(len(x))]
    return parts[0] if len(parts) == 1 else tuple(torch.cat(outs) for outs in zip(*parts))


class _Recomputed(torch.autograd.Function):
    """Outputs of ``run(points)`` whose backward saves only the points: it runs ``rerun`` (the same
    maths) chunk by chunk under autograd and back-propagates each chunk into ``params``.

    Chosen over keeping the explicit pass's autograd graph, which holds the encoding, its Jacobian,
    the hidden activations and the row d raw/d enc: ~1.3 KB a point (16 levels, float32) against
    the 12 bytes of the points. The price is one more forward; on one CPU thread the whole thing
    takes about the time of the old double backward, ~15% more than with the graph kept
    (``benchmarks/field_memory.py`` prints all three). Chosen over ``torch.utils.checkpoint``: that
    recomputes the whole batch at once (the transient would be the full graph, not one chunk's),
    and what it holds bypasses ``saved_tensors_hooks``, so it could not be measured.
    First order only (the backward is not itself differentiable).
    """

    @staticmethod
    def forward(ctx, run: Callable, rerun: Callable, x: Tensor, *params: Tensor):
        ctx.rerun = rerun
        ctx.save_for_backward(x, *params)  # parameters are not per point; saving them checks versions
        ctx.set_materialize_grads(False)
        return _chunked(run, x)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor | None):
        x, *params = ctx.saved_tensors
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[3:]) if need]
        totals: list[Tensor | None] = [None] * len(params)
        for part in _chunks(len(x)):
            with torch.enable_grad():
                outputs = ctx.rerun(x[part])
            used = [(out, g[part]) for out, g in zip(outputs, grads) if g is not None]
            part_grads = torch.autograd.grad([o for o, _ in used], [params[i] for i in wanted],
                                              [g for _, g in used], allow_unused=True)
            for i, p in zip(wanted, part_grads):
                if p is not None:
                    totals[i] = p if totals[i] is None else totals[i] + p
        return (None, None, None, *totals)


class Field(nn.Module):
    """Density and albedo of points in world space: hash grid -> MLP (one hidden layer) -> 4 outputs."""

    def __init__(self, cfg: FieldConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg if cfg is not None else FieldConfig()
        self.encoding = HashGridEncoding(cfg.n_levels, cfg.features_per_level, cfg.log2_table_size,
                                         cfg.base_resolution, cfg.per_level_scale)
        self.mlp = nn.Sequential(nn.Linear(self.encoding.output_dim, cfg.hidden_dim), nn.ReLU(),
                                 nn.Linear(cfg.hidden_dim, 4))
        # torch.compile is lazy: it compiles at the first call, for the device the field is on then.
        self._compiled_forward = torch.compile(self.forward_eager) if cfg.compiled else None
        # The explicit normals are first order, so unlike "autograd" they may run compiled in training.
        self._compiled_gradient = torch.compile(self._explicit_gradient) if cfg.compiled else None

    @property
    def active_levels(self) -> int:
        return int(self.encoding.active_levels)

    def set_active_levels(self, n: int) -> None:
        self.encoding.active_levels.fill_(max(1, min(int(n), self.cfg.n_levels)))

    def blob_bias(self, x: Tensor) -> Tensor:
        """Magic3D's density bias: a soft ball at the origin so training starts from an object."""
        return self.cfg.blob_scale * (1.0 - x.norm(dim=-1) / self.cfg.blob_std)

    def blob_bias_gradient(self, x: Tensor) -> Tensor:
        """d blob_bias / dx = -blob_scale x / (|x| blob_std); 0 at the origin, as autograd's norm says."""
        r = x.norm(dim=-1, keepdim=True)
        unit = torch.where(r > 0, x / torch.where(r > 0, r, torch.ones_like(r)), torch.zeros_like(x))
        return unit * (-self.cfg.blob_scale / self.cfg.blob_std)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(density >= 0 [...], albedo in [0, 1] [..., 3]) at world points x [..., 3]."""
        if self._compiled_forward is not None:
            return self._compiled_forward(x)
        return self.forward_eager(x)

    def forward_eager(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``forward`` in plain PyTorch: the CPU reference, and what a compiled field compiles.

        The encoding is the custom Function (saves the points, not the corners); gradients w.r.t.
        x are first order. ``forward_autograd`` is the same with the plain lookup."""
        return self._density_albedo(x, self.encoding.encode)

    def forward_autograd(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``forward`` through the plain hash-grid lookup: differentiable w.r.t. x to any order."""
        return self._density_albedo(x, self.encoding)

    def _density_albedo(self, x: Tensor, encode: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        b = self.cfg.bound
        enc = encode((x / b + 1.0) * 0.5)
        with self._mixed_precision(x):
            raw = self.mlp(enc)
        raw = raw.to(x.dtype)
        density = F.softplus(raw[..., 0] + self.blob_bias(x))
        inside = (x.abs() <= b).all(-1)
        return torch.where(inside, density, torch.zeros_like(density)), torch.sigmoid(raw[..., 1:])

    def density(self, x: Tensor) -> Tensor:
        return self(x)[0]

    def _mixed_precision(self, x: Tensor) -> torch.autocast:
        """Autocast of the MLP's products to ``cfg.mlp_precision`` (disabled for "float32")."""
        dtype = MLP_PRECISIONS[self.cfg.mlp_precision]
        return torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    def with_normals(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(density, albedo, unit outward normals) at x [..., 3], normals as ``cfg.normal_type`` says.

        Normals are differentiable w.r.t. the parameters (shading and the orientation loss train the
        geometry through them), not w.r.t. x. With gradients disabled no graph is built.
        """
        if self.cfg.normal_type == "finite_difference":
            density, albedo = self(x)
            return density, albedo, self.normals(x)
        if self.cfg.normal_type == "autograd":
            return self._autograd_normals(x)
        lead = x.shape[:-1]
        density, albedo, normals = self._analytic_normals(x.detach().reshape(-1, 3))
        return density.view(lead), albedo.view(*lead, 3), normals.view(*lead, 3)

    def _analytic_normals(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``with_normals`` for "analytic" at points [P, 3]: chunked without a graph, or through
        ``_Recomputed`` when the parameters are being trained; each chunk compiled if configured."""
        explicit = self._compiled_gradient or self._explicit_gradient
        params = [p for p in self.parameters() if p.requires_grad]
        if not torch.is_grad_enabled() or not params:
            density, albedo, grad = _chunked(explicit, x)
        else:
            # Compiled, the re-run is still wrapped: left to itself the partitioner saves ~2.3 KB a
            # point (16 levels). Eager, the re-run keeps its graph and corner geometry for its
            # backward: ~3.3 KB a point. Either is transient, one chunk at a time.
            rerun = explicit if self._compiled_gradient else partial(self._explicit_gradient, keep_geometry=True)
            density, albedo, grad = _Recomputed.apply(explicit, rerun, x, *params)
        return density, albedo, F.normalize(-grad, dim=-1, eps=1e-12)

    def _explicit_gradient(self, x: Tensor, keep_geometry: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """(density [P], albedo [P, 3], ∇density [P, 3]) at points [P, 3] in one pass, the gradient by
        the chain rule written out (no autograd w.r.t. x), so it is differentiable w.r.t. the
        parameters by a first-order backward."""
        b = self.cfg.bound
        enc, jac = self.encoding.encode_with_jacobian((x / b + 1.0) * 0.5, keep_geometry)  # d enc / d x01
        first, second = self.mlp[0], self.mlp[2]
        # d raw0 / d enc = W1^T (W2[0] * relu'(hidden)), one row per point; contracting that with the
        # encoding's Jacobian costs P*LF*3, where W1 @ jac would cost P*H*LF*3. relu'(0) = 0 as in PyTorch.
        with self._mixed_precision(x):
            hidden = first(enc)
            raw = second(torch.relu(hidden))
            d_enc = (second.weight[0] * (hidden > 0)) @ first.weight  # [P, L*F]
        raw, d_enc = raw.to(x.dtype), d_enc.to(x.dtype)
        z = raw[:, 0] + self.blob_bias(x)
        d_raw = (d_enc[:, None, :] @ jac)[:, 0] * (0.5 / b)  # [P, 3]; 0.5 / b: world -> [0, 1]
        slope = torch.where(z > _SOFTPLUS_THRESHOLD, torch.ones_like(z), torch.sigmoid(z))  # softplus'
        grad = slope[:, None] * (d_raw + self.blob_bias_gradient(x))
        inside = (x.abs() <= b).all(-1)  # density is 0 outside the cube, so is its gradient
        zero = torch.zeros_like(z)
        return (torch.where(inside, F.softplus(z), zero), torch.sigmoid(raw[:, 1:]),
                torch.where(inside[:, None], grad, zero[:, None]))

    def _autograd_normals(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The reference: -∇density by autograd, with a graph for the second backward when gradients
        are being recorded (training), without one otherwise. ~3 plain evaluations of time and
        ~4.8 KB a point of saved tensors (16 levels)."""
        training = torch.is_grad_enabled()
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            # the second backward of training cannot pass through a compiled graph
            density, albedo = self.forward_autograd(x) if training or self._compiled_forward is None \
                else self._compiled_forward(x)
            (grad,) = torch.autograd.grad(density.sum(), x, create_graph=training)
        normals = F.normalize(-grad, dim=-1, eps=1e-12)
        if not training:
            density, albedo = density.detach(), albedo.detach()
        return density, albedo, normals

    def normals(self, x: Tensor) -> Tensor:
        """Unit outward normals -grad(density), by central differences (one batched call of 6 points).

        Differentiable: the 6 density evaluations are part of the graph, so shading and the
        orientation loss train the geometry. Where the gradient vanishes the normal is 0.
        """
        eps = self.cfg.normal_eps
        steps = torch.cat([torch.eye(3, dtype=x.dtype, device=x.device), -torch.eye(3, dtype=x.dtype, device=x.device)])
        steps = (eps * steps).reshape(6, *([1] * (x.dim() - 1)), 3)
        d = self.density(x.unsqueeze(0) + steps)  # [6, ...]
        grad = torch.stack([d[0] - d[3], d[1] - d[4], d[2] - d[5]], -1) / (2.0 * eps)
        return F.normalize(-grad, dim=-1, eps=1e-12)


def _spherical_harmonics(d: Tensor) -> Tensor:
    """Real spherical harmonics up to degree 2 (9 terms) of unit directions [..., 3]."""
    x, y, z = d.unbind(-1)
    return torch.stack([
        torch.full_like(x, 0.28209479),
        0.48860251 * y, 0.48860251 * z, 0.48860251 * x,
        1.09254843 * x * y, 1.09254843 * y * z, 0.31539157 * (3.0 * z * z - 1.0),
        1.09254843 * x * z, 0.54627422 * (x * x - y * y),
    ], -1)


class Background(nn.Module):
    """Environment colour by view direction: MLP on low-order spherical harmonics, sigmoid output.

    Low-order harmonics keep the background smooth, so it cannot paint the object onto the sky.
    The last layer starts tiny (not zero, so every layer gets a gradient from the first step) and
    the output therefore starts at ~0.5 grey.
    """

    def __init__(self, hidden_dim: int = 16) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(9, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
                                 nn.Linear(hidden_dim, 3))
        nn.init.uniform_(self.mlp[-1].weight, -1e-2, 1e-2)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, directions: Tensor) -> Tensor:
        return torch.sigmoid(self.mlp(_spherical_harmonics(F.normalize(directions, dim=-1))))
