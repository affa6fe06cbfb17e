"""Will one training view fit? A measured estimate of its peak memory, checked before training.

A job that cannot fit must be refused before it starts, with the knobs that lower its memory,
never killed by the kernel without a word. Peak memory of a step is that of ONE view (the K views
are accumulated one at a time), so K is not a knob.

The estimate is measured, not modelled: a probe renders one training view of the real field and
renderer at a small resolution with analytic normals (the costliest shading), counts the bytes
autograd saves for backward (``saved_tensors_hooks``, each storage once), and scales them by the
pixel ratio; the prior's differentiable encoder is probed on its own, at the size it always works
at (it resizes every render to its input size, so its cost does not grow with the render). On top:
the optimiser's state, and a margin for what backward holds beside the saved tensors (gradients of
the activations it is passing through). ``benchmarks/render_speed.py`` compares the estimate with
the measured peak.

What it cannot see: the no-grad prior pass (UNet calls of the guidance), whose working memory is
fixed by the prior, and a field that grows after the first step (the occupancy grid then keeps
more samples). The margin covers the first; the second is why the message says "at the start".
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from mvsdi.cameras import sample_views
from mvsdi.distill import Distiller, seeded_generator
from mvsdi.render import render

# backward holds the gradient of the activations it is passing through beside the saved tensors.
# The estimate errs on the safe side: for the tiny stack at 512² (mvsdi-k2, budget 8) it says
# 5.2 GiB where the whole process peaked at 2.0 GB (docs/performance.md), partly because a saved
# view is charged its whole storage.
BACKWARD_MARGIN = 1.5
PROBE_RESOLUTION = 64  # side of the probe render: large enough that fixed costs do not dominate
PROBE_STREAM = 2**31 + 2  # the probe's camera comes from its own generator: the run's streams are untouched


class MemoryBudgetError(ValueError):
    """A run whose estimated peak memory exceeds what the device has free."""


@dataclass(frozen=True)
class MemoryEstimate:
    render_bytes: int  # saved for backward by one training render at the run's resolution (scaled)
    prior_bytes: int  # saved by the prior's differentiable encoder
    state_bytes: int  # parameters, their gradients and Adam's two moments (and CW-MV-SDI's K gradient copies)
    probe_samples_per_ray: float  # field samples evaluated per ray in the probe (after skipping)

    @property
    def peak_bytes(self) -> int:
        return int(BACKWARD_MARGIN * (self.render_bytes + self.prior_bytes) + self.state_bytes)


def saved_tensor_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()`` and the bytes autograd saved while it ran (each storage counted once)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), t.device.index or 0)] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(seen.values())


def estimate_view_memory(distiller: Distiller) -> MemoryEstimate:
    """Probe one training view of ``distiller``'s run (see the module docstring); no parameter moves."""
    c, device = distiller.config, distiller.device
    side = min(c.resolution, PROBE_RESOLUTION)
    camera = sample_views("random", 1, seeded_generator("cpu", c.seed, PROBE_STREAM), c.cameras).to(device)
    field, background = distiller.model.field, distiller.model.background
    out, render_bytes = saved_tensor_bytes(lambda: render(
        field, background, camera, side, side, n_samples=c.samples_per_ray, shading="diffuse",
        perturb=c.perturb_samples, generator=seeded_generator(device, c.seed, PROBE_STREAM), need_normals=True,
        **distiller.render_settings(distiller.current_grid())))
    image = out.rgb.detach().permute(0, 3, 1, 2).requires_grad_(True)
    evaluated = float(out.stats.get("samples_per_ray", c.samples_per_ray))
    del out  # frees the probe's graph
    _, prior_bytes = saved_tensor_bytes(lambda: distiller.prior.encode_images(image))
    parameters = sum(p.numel() * p.element_size() for p in distiller.model.parameters())
    # gradients and Adam's two moments (the weights already exist); consensus weighting keeps a copy of
    # the gradient per view, and their weighted sum is formed one parameter at a time
    copies = 3 + (c.views if c.aggregation.kind == "consensus" else 0)
    return MemoryEstimate(render_bytes=int(render_bytes * (c.resolution / side) ** 2), prior_bytes=prior_bytes,
                          state_bytes=copies * parameters,
                          probe_samples_per_ray=evaluated)


def available_bytes(device: torch.device) -> int | None:
    """Memory this process may still allocate on ``device``; None where it cannot be known."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    limits = [v for v in (_meminfo_available(), _cgroup_headroom()) if v is not None]
    return min(limits) if limits else None


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_headroom() -> int | None:
    """The cgroup (v2) limit minus what the group uses: a container's real ceiling."""
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((base / "memory.current").read_text().strip())
    except (OSError, ValueError):
        return None


def gib(n: int | float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_fits(estimate: MemoryEstimate, free: int | None, resolution: int, samples_per_ray: int) -> None:
    """Raise ``MemoryBudgetError`` naming the knobs when ``estimate`` exceeds ``free``."""
    if free is None or estimate.peak_bytes <= free:
        return
    # memory of the render grows with pixels: the largest resolution that would fit, rounded down to 8
    budget = (free - estimate.state_bytes) / BACKWARD_MARGIN - estimate.prior_bytes
    fitting = math.sqrt(max(budget, 0.0) / max(estimate.render_bytes, 1)) * resolution
    hint = (f"--resolution {int(fitting) // 8 * 8} might fit" if fitting >= 8
            else "no resolution fits beside the prior on this device")
    raise MemoryBudgetError(
        f"this run needs about {gib(estimate.peak_bytes)} per training view at the start "
        f"(render {gib(estimate.render_bytes)} at {resolution}² × {samples_per_ray} samples per ray, "
        f"{estimate.probe_samples_per_ray:.0f} evaluated per ray after empty-space skipping; prior encoder "
        f"{gib(estimate.prior_bytes)}; gradients, Adam and any per-view gradient copies "
        f"{gib(estimate.state_bytes)}; ×{BACKWARD_MARGIN} for backward), but only {gib(free)} is free. Lower "
        f"--resolution ({hint}) or --samples-per-ray. K (--views) is not a knob with --aggregation mean: views "
        "are accumulated one at a time.")


def free_memory_override() -> int | None:
    """MVSDI_FREE_MEMORY_GIB: pretend this much is free (tests, or a machine shared with other jobs)."""
    value = os.environ.get("MVSDI_FREE_MEMORY_GIB")
    return None if value is None else int(float(value) * 2**30)
