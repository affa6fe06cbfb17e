"""An occupancy grid over the field's cube: where the renderer may skip empty space.

The grid holds, per cell of an R³ lattice over [-bound, bound]^3 (R = 32 by default, as the
reference), an estimate of the largest density inside the cell. A cell is *occupied* when that
estimate exceeds ``density_threshold``; the renderer evaluates the field only at samples in
occupied cells.

The threshold is tied to the renderer's alpha threshold: with the longest step a ray can take,
``delta_max = 2·sqrt(3)·bound / samples_per_ray`` (the cube's diagonal cut into bins),

    density_threshold = -ln(1 - alpha_threshold) / delta_max,

so a sample in an empty cell would have had alpha = 1 - exp(-sigma·delta) <= alpha_threshold had
the estimate been an upper bound: the grid skips nothing the alpha test would have kept
(``density_threshold_for``). If the mean estimate is below the threshold (a nearly empty field)
the mean is used instead, so the grid never empties itself and the object can still grow back.

Update rule, all of it deterministic:
- ``initialise``: from the current field, each cell's estimate is the largest density at its
  8 corners and its centre (a lattice shared by neighbouring cells: (R+1)³ + R³ evaluations).
  For Magic3D's radial density blob this is the exact cell maximum, so training starts with the
  blob occupied and nothing outside it.
- ``refresh``: every cell is revisited at one point drawn uniformly inside it, and its estimate
  becomes max(decay^n · estimate, density there). Empty cells are visited too, so the object can
  grow into them; the decay lets cells the object has left become empty. ``n`` is the number of
  refresh periods since the last refresh, so the decay per unit of budget does not depend on how
  many periods a step spans. The jitter comes from a generator the caller keys by the refresh
  period (see ``Distiller``), never from the global one.

The distiller refreshes every ``RenderConfig.grid_refresh_every`` guidance evaluations (the
reference: every 16 steps of its K=1 run, i.e. 16 evaluations), a function of the budget spent,
so K views per step change neither when a refresh happens nor the jitter it draws.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

DensityFn = Callable[[Tensor], Tensor]
EVAL_CHUNK = 2 ** 16  # points per field call while the grid is updated: bounded memory


def density_threshold_for(alpha_threshold: float, samples_per_ray: int, bound: float) -> float:
    """Density below which no sample of the renderer can reach alpha > ``alpha_threshold``."""
    if alpha_threshold <= 0.0:
        return 0.0
    delta_max = 2.0 * math.sqrt(3.0) * bound / samples_per_ray
    return -math.log1p(-alpha_threshold) / delta_max


def density_function(field: torch.nn.Module) -> DensityFn:
    """The field's density at grid points, which are float32, cast to the field's dtype."""
    dtype = next((p.dtype for p in field.parameters()), torch.float32)
    density = field.density if hasattr(field, "density") else (lambda x: field(x)[0])
    return lambda x: density(x.to(dtype))


@torch.no_grad()
def _evaluate(density: DensityFn, points: Tensor) -> Tensor:
    """density(points [P, 3]) -> [P] in chunks, as float32 (the grid's dtype)."""
    out = [density(points[i:i + EVAL_CHUNK]).float() for i in range(0, points.shape[0], EVAL_CHUNK)]
    return torch.cat(out) if out else points.new_zeros(0)


class OccupancyGrid:
    """Per-cell maximum-density estimates on an R³ lattice over [-bound, bound]^3; ``values[i, j, k]``
    is the cell with x-index i, y-index j, z-index k (cell i spans [-b + i·side, -b + (i+1)·side))."""

    def __init__(self, resolution: int, bound: float, density_threshold: float, decay: float = 0.95,
                 device: torch.device | str = "cpu") -> None:
        if resolution < 1 or bound <= 0 or density_threshold < 0 or not 0.0 <= decay <= 1.0:
            raise ValueError(f"occupancy grid: need resolution >= 1, bound > 0, threshold >= 0, decay in [0, 1]; "
                             f"got {resolution}, {bound}, {density_threshold}, {decay}")
        self.resolution, self.bound = resolution, bound
        self.density_threshold, self.decay = density_threshold, decay
        self.device = torch.device(device)
        self.values: Tensor | None = None  # [R, R, R] float32, None until ``initialise``
        self.period = 0  # the refresh period the estimates belong to
        self._mask: Tensor | None = None

    # -- state ---------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.values is not None

    def _set(self, values: Tensor, period: int) -> None:
        self.values, self.period = values.to(self.device, torch.float32), int(period)
        # the mean guard: never a threshold above the mean estimate, or the grid could empty itself
        threshold = min(self.density_threshold, float(self.values.mean()))
        self._mask = self.values > threshold

    def fill(self, period: int = 0) -> None:
        """Every cell occupied (the grid then skips nothing)."""
        self._set(torch.full((self.resolution,) * 3, math.inf, dtype=torch.float32), period)

    def state_dict(self) -> dict[str, Any]:
        return {"values": None if self.values is None else self.values.detach().cpu().clone(), "period": self.period}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None or state["values"] is None:
            self.values, self._mask, self.period = None, None, 0
        else:
            self._set(state["values"], state["period"])

    @property
    def occupied_fraction(self) -> float:
        return float(self._mask.float().mean()) if self._mask is not None else float("nan")

    # -- queries -------------------------------------------------------------------------------

    def cell_index(self, x: Tensor) -> Tensor:
        """Integer cell coordinates [..., 3] of points x [..., 3] (clamped into the lattice)."""
        r = self.resolution
        scaled = (x.detach() + self.bound) * (r / (2.0 * self.bound))
        return scaled.floor().long().clamp(0, r - 1)

    def occupied(self, x: Tensor) -> Tensor:
        """[...] bool: x lies inside the cube and in an occupied cell."""
        if self._mask is None:
            raise RuntimeError("the occupancy grid is used before it was initialised from the field")
        ijk = self.cell_index(x)
        inside = (x.detach().abs() <= self.bound).all(-1)
        return inside & self._mask[ijk[..., 0], ijk[..., 1], ijk[..., 2]]

    # -- updates -------------------------------------------------------------------------------

    def _lattice(self, n: int, offset: float) -> Tensor:
        """Points [n³, 3] at (index + offset) · cell side - bound, index x slowest (matches ``values``)."""
        side = 2.0 * self.bound / self.resolution
        u = (torch.arange(n, device=self.device, dtype=torch.float32) + offset) * side - self.bound
        return torch.stack(torch.meshgrid(u, u, u, indexing="ij"), -1).reshape(-1, 3)

    @torch.no_grad()
    def initialise(self, density: DensityFn, period: int = 0) -> None:
        """Estimates from the field: the max over each cell's 8 corners and its centre."""
        r = self.resolution
        corners = _evaluate(density, self._lattice(r + 1, 0.0)).view(r + 1, r + 1, r + 1)
        centres = _evaluate(density, self._lattice(r, 0.5)).view(r, r, r)
        best = centres
        for a in (0, 1):
            for b in (0, 1):
                for c in (0, 1):
                    best = torch.maximum(best, corners[a:a + r, b:b + r, c:c + r])
        self._set(best, period)

    @torch.no_grad()
    def refresh(self, density: DensityFn, period: int, generator: torch.Generator) -> None:
        """Move to refresh period ``period``: decay by decay^(periods elapsed), then max with the
        density at one uniformly drawn point in every cell."""
        if self.values is None:
            raise RuntimeError("refresh() before initialise()")
        elapsed = period - self.period
        if elapsed <= 0:
            return
        r, side = self.resolution, 2.0 * self.bound / self.resolution
        jitter = torch.rand((r ** 3, 3), generator=generator, device=generator.device, dtype=torch.float32)
        jitter = jitter.to(self.device)
        points = self._lattice(r, 0.0) + jitter * side
        seen = _evaluate(density, points).view(r, r, r)
        self._set(torch.maximum(self.values * self.decay ** elapsed, seen), period)
