"""Speed of MV-SDI training steps (issue 6): ms per guidance evaluation and where it goes.

    python benchmarks/speed.py --model random-sd21 --device cuda --out bench-out/speed   # GPU
    python benchmarks/speed.py --model tiny --device cpu --resolutions 16 32 --steps 2   # CPU smoke

For SDS and SDI (the presets, Perp-Neg on for SDI), K = 1, 2, 4, each resolution, and both ways of
getting a step's K targets (one prior pass per view, "sequential"; one for all, "batched"), it runs
real ``Distiller.step`` calls of a 10,000-evaluation run at budget fractions spread over the run
((i + 0.5) / n, so SDI's annealed t, the inversion length and the shading mix are the run's
average), in three passes over the same steps:

1. warm-up (compilation, CUDA-graph capture, allocator growth), not timed;
2. the total: wall time per guidance evaluation, UNet work, peak GPU memory; one sync per step;
3. the breakdown: render, VAE encode, UNet, backward, optimiser, each region bracketed by a
   device synchronisation (so it costs a little more than pass 2; "other" is the remainder).

The 10,000-evaluation projection is pass 2's ms per evaluation × 10,000 (training only: no
prior loading, evaluation renders or export). Prints a markdown table; writes JSON under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from mvsdi.atomic_files import atomic_write_json
from mvsdi.config import preset
from mvsdi.distill import Distiller, Model
from mvsdi.field import Field, FieldConfig
from mvsdi.models import load_prior
from mvsdi.priors.loading import resolve_device

RUN_BUDGET = 10_000
PARTS = ("render", "vae_encode", "unet", "backward", "optimiser")
# A field small enough for CPU smoke runs; the GPU default is the paper's (16 levels, 2^19).
SMALL_FIELD = FieldConfig(n_levels=4, log2_table_size=12, base_resolution=8, per_level_scale=2.0, hidden_dim=16)
PRESETS = {("sds", 1): "sds", ("sds", 2): "mvsds-k2", ("sds", 4): "mvsds-k4",
           ("sdi", 1): "sdi", ("sdi", 2): "mvsdi-k2", ("sdi", 4): "mvsdi-k4"}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RegionClock:
    """Milliseconds spent in named regions; only the outermost region of a nesting is charged."""

    def __init__(self, device: torch.device):
        self.device, self.ms, self._open = device, defaultdict(float), False

    def timed(self, name: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            if self._open:
                return fn(*args, **kwargs)
            self._open = True
            synchronize(self.device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                synchronize(self.device)
                self.ms[name] += 1000 * (time.perf_counter() - start)
                self._open = False
        return wrapper


@contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """Set ``obj.name`` for the duration; an instance attribute shadows the class's method."""
    had, old = name in vars(obj), vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


@contextmanager
def instrumented(distiller: Distiller, clock: RegionClock) -> Iterator[None]:
    prior = distiller.prior
    with ExitStack() as stack:
        stack.enter_context(patched(distiller, "render_view", clock.timed("render", distiller.render_view)))
        stack.enter_context(patched(prior, "encode_images", clock.timed("vae_encode", prior.encode_images)))
        stack.enter_context(patched(prior, "predict_noise", clock.timed("unet", prior.predict_noise)))
        stack.enter_context(patched(torch.Tensor, "backward", clock.timed("backward", torch.Tensor.backward)))
        opt = distiller.optimizer
        stack.enter_context(patched(opt, "step", clock.timed("optimiser", opt.step)))
        yield


def run_steps(distiller: Distiller, n: int) -> None:
    """n steps at budget fractions (i + 0.5) / n of the run (same steps, hence same draws, every pass)."""
    for i in range(n):
        distiller.counters.steps = int((i + 0.5) / n * distiller.config.steps)
        distiller.step()


def measure(config, prior, device: torch.device, n_steps: int) -> dict[str, Any]:
    began = time.perf_counter()
    distiller = Distiller(config, prior, Model.create(config, device), device)
    evaluations = n_steps * config.views
    run_steps(distiller, n_steps)  # pass 1: warm-up
    synchronize(device)
    # recorded because a compile or graph capture in the warm-up is paid once per run and per shape
    warmup_seconds = time.perf_counter() - began
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    calls, images = prior.counters.calls, prior.counters.images
    start = time.perf_counter()
    run_steps(distiller, n_steps)  # pass 2: total
    synchronize(device)
    total_ms = 1000 * (time.perf_counter() - start) / evaluations
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    calls, images = prior.counters.calls - calls, prior.counters.images - images
    clock = RegionClock(device)
    start = time.perf_counter()
    with instrumented(distiller, clock):
        run_steps(distiller, n_steps)  # pass 3: breakdown
    breakdown_total = 1000 * (time.perf_counter() - start) / evaluations
    parts = {name: clock.ms[name] / evaluations for name in PARTS}
    parts["other"] = breakdown_total - sum(parts.values())
    return {
        "ms_per_evaluation": total_ms, "breakdown_ms_per_evaluation": parts,
        "unet_calls_per_evaluation": calls / evaluations, "unet_images_per_evaluation": images / evaluations,
        "total_over_unet": total_ms / parts["unet"] if parts["unet"] > 0 else None,
        "peak_memory_gib": peak / 2**30 if peak is not None else None,
        "peak_above_start_gib": (peak - baseline) / 2**30 if peak is not None else None,
        "projected_10k_minutes": total_ms * RUN_BUDGET / 60_000,
        "warmup_seconds": warmup_seconds, "measure_seconds": time.perf_counter() - began,
    }


def check_compiled_field(field_cfg: FieldConfig, n_points: int, device: torch.device) -> dict[str, Any]:
    """torch.compile'd field vs the eager reference: values and parameter gradients (and compile time).

    Too slow for the unit suite on the CPU (about 33 s for a tiny field on the dev machine), so it
    lives here. Covers plain forward and finite-difference normals; analytic normals while
    training stay eager by design (no double backward through compiled graphs).
    """
    torch.manual_seed(0)
    eager = Field(dataclasses.replace(field_cfg, compiled=False, normal_type="finite_difference")).to(device)
    fast = Field(dataclasses.replace(field_cfg, compiled=True, normal_type="finite_difference")).to(device)
    fast.load_state_dict(eager.state_dict())
    x = torch.rand(n_points, 3, device=device, generator=torch.Generator(device).manual_seed(1)) * 2 - 1
    results: dict[str, Any] = {"points": n_points}
    grads = []
    for name, field in (("eager", eager), ("compiled", fast)):
        synchronize(device)
        start = time.perf_counter()
        density, albedo = field(x)
        normals = field.normals(x)
        (density.sum() + albedo.sum() + normals.sum()).backward()
        synchronize(device)
        results[f"{name}_first_call_s"] = time.perf_counter() - start
        grads.append((density.detach(), albedo.detach(), normals.detach(),
                      torch.cat([p.grad.flatten() for p in field.parameters()])))
    names = ("density", "albedo", "normals", "parameter_gradient")
    for name, a, b in zip(names, *grads):
        results[f"max_abs_diff_{name}"] = (a - b).abs().max().item()
        results[f"max_abs_{name}"] = a.abs().max().item()
    return results


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| guidance | K | res | targets | ms / eval | render | VAE enc | UNet | backward | optimiser | other "
            "| UNet calls / eval | UNet images / eval | total / UNet | peak GiB | 10k run (min) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        b = r["breakdown_ms_per_evaluation"]
        lines.append(f"| {r['guidance']} | {r['views']} | {r['resolution']} | {r['targets']} | "
                     f"{fmt(r['ms_per_evaluation'])} | "
                     + " | ".join(fmt(b[p]) for p in (*PARTS, "other"))
                     + f" | {fmt(r['unet_calls_per_evaluation'], 2)} | {fmt(r['unet_images_per_evaluation'], 1)} | "
                     f"{fmt(r['total_over_unet'], 2)} | {fmt(r['peak_memory_gib'], 2)} | "
                     f"{fmt(r['projected_10k_minutes'])} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random-sd21",
                   help="random-sd21 (real shapes, random weights), tiny, or a folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--guidance", nargs="+", choices=("sds", "sdi"), default=["sds", "sdi"])
    p.add_argument("--views", nargs="+", type=int, choices=(1, 2, 4), default=[1, 2, 4])
    p.add_argument("--resolutions", nargs="+", type=int, help="default 128 256 512 on CUDA, 16 32 on CPU")
    p.add_argument("--samples-per-ray", type=int, help="default 64 on CUDA, 16 on CPU")
    p.add_argument("--steps", type=int, default=4, help="timed optimiser steps per configuration and pass")
    p.add_argument("--targets", nargs="+", choices=("sequential", "batched"), default=["sequential", "batched"])
    p.add_argument("--field", choices=("paper", "small"), help="hash grid: paper (default on CUDA) or small (CPU)")
    p.add_argument("--fast-unet", choices=("off", "compile", "cuda_graph"), default="off")
    p.add_argument("--compiled-field", action="store_true", help="FieldConfig(compiled=True) for the training field")
    p.add_argument("--check-compiled-field", action="store_true", help="also compare the compiled field with eager")
    p.add_argument("--mlp-precision", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="FieldConfig.mlp_precision for the training field (autocast of the MLP)")
    p.add_argument("--out", type=Path, default=Path("bench-out/speed"))
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    resolutions = args.resolutions or ([128, 256, 512] if cuda else [16, 32])
    samples = args.samples_per_ray or (64 if cuda else 16)
    field_cfg = FieldConfig() if (args.field or ("paper" if cuda else "small")) == "paper" else SMALL_FIELD
    field_cfg = dataclasses.replace(field_cfg, compiled=args.compiled_field, mlp_precision=args.mlp_precision)
    prior = load_prior(args.model, device)
    if args.fast_unet != "off":
        prior.use_fast_unet(args.fast_unet)
    rows = []
    for guidance in args.guidance:
        for views in args.views:
            for resolution in resolutions:
                for targets in (["sequential"] if views == 1 else args.targets):
                    config = preset(PRESETS[guidance, views], "a ripe strawberry", model=args.model,
                                    device=str(device), budget=RUN_BUDGET, resolution=resolution,
                                    samples_per_ray=samples, field=field_cfg, view_batching=targets)
                    row = {"guidance": guidance, "views": views, "resolution": resolution, "targets": targets,
                           **measure(config, prior, device, args.steps)}
                    rows.append(row)
                    print(markdown([row]).splitlines()[-1], flush=True)
    table = markdown(rows)
    print("\n" + table)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()}, "
                                                                   f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "samples_per_ray": samples, "field": dataclasses.asdict(field_cfg), "rows": rows, "table": table,
    }
    if args.check_compiled_field:
        n_points = (resolutions[0] ** 2) * samples
        report["compiled_field_check"] = check_compiled_field(field_cfg, n_points, device)
        print("\ncompiled field vs eager:", report["compiled_field_check"])
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "speed.json", report)
    print(f"\nwrote {args.out / 'speed.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
