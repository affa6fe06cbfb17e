"""Render speed and memory (issue 11): the dense reference renderer vs empty-space skipping.

    OMP_NUM_THREADS=2 python benchmarks/render_speed.py --resolutions 64 128 256 --out bench-out/render
    python benchmarks/render_speed.py --resolutions 512 --dense-max-resolution 256   # 512²: skipping only
    python benchmarks/render_speed.py --small-field --fit-steps 100 --resolutions 32 --views 1   # smoke

What is timed is one training view: ``render`` forward with normals under "diffuse" shading, then
the backward of ``rgb.mean() + orientation``, on a field that holds an object: the paper's field
(``FieldConfig()``, or ``--small-field``) fitted for ``--fit-steps`` Adam steps to a testbed scene's
density and colour (cached under ``--cache``, so later runs skip the fit). Cameras are training
views (SDI camera ranges), the same in every configuration.

Each (resolution, renderer) runs in a fresh subprocess (its own allocator and high-water mark).
"peak RSS" is how far the worker's resident set rises, over the timed views, above where it stood
after one warm-up view (the high-water mark is reset there through Linux's /proc/self/clear_refs,
after returning freed heap with malloc_trim); "saved" is what autograd keeps for the backward of
the largest view (distinct storages seen by saved-tensor hooks, parameters left out). Prints a
markdown table with the machine, its load and the command; ``--out`` writes render_speed.json.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from mvsdi.cameras import sample_views
from mvsdi.field import Background, Field, FieldConfig
from mvsdi.occupancy import OccupancyGrid, density_function, density_threshold_for
from mvsdi.render import RenderConfig, render

SMALL_FIELD = FieldConfig(n_levels=8, log2_table_size=16, base_resolution=8, per_level_scale=1.5)
SURFACE_WIDTH = 0.01  # the fitted density is PEAK_DENSITY · sigmoid(-sdf / SURFACE_WIDTH)
PEAK_DENSITY = 100.0
RENDERERS = ("dense", "skipping")


# ------------------------------------------------------------------------------------------------
# a field with an object


def _target(scene, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    distance, colour = scene.sdf_and_colour(x)
    return PEAK_DENSITY * torch.sigmoid(-distance / SURFACE_WIDTH), colour.clamp(0.0, 1.0)


def fit_field(scene_name: str, cfg: FieldConfig, steps: int, batch: int = 2 ** 12, seed: int = 0) -> Field:
    """The field fitted to the scene: log-density and (inside) albedo regression on random points,
    half uniform in the cube and half in the box that holds the scene."""
    from mvsdi.testbed.scenes import SCENE_EXTENT, get_scene

    scene = get_scene(scene_name)
    torch.manual_seed(seed)
    field = Field(cfg)
    opt = torch.optim.Adam(field.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-15)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.cat([torch.rand(batch, 3, generator=g) * 2 - 1,
                       (torch.rand(batch, 3, generator=g) * 2 - 1) * (SCENE_EXTENT + 0.05)]) * cfg.bound
        with torch.no_grad():
            density, colour = _target(scene, x)
        pred_density, pred_colour = field(x)
        inside = (density > 0.5 * PEAK_DENSITY).float()[:, None]
        loss = (torch.log1p(pred_density) - torch.log1p(density)).square().mean() \
            + ((pred_colour - colour).square() * inside).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return field


def cached_field(args: argparse.Namespace) -> tuple[Path, float]:
    """Path of the fitted field's state (fitted now if not cached) and the fit's seconds (0 if cached)."""
    cfg = SMALL_FIELD if args.small_field else FieldConfig()
    key = hashlib.sha256(json.dumps([args.scene, dataclasses.asdict(cfg), args.fit_steps, PEAK_DENSITY,
                                     SURFACE_WIDTH]).encode()).hexdigest()[:12]
    path = Path(args.cache) / f"render-speed-{args.scene}-{key}.pt"
    if path.exists():
        return path, 0.0
    start = time.perf_counter()
    field = fit_field(args.scene, cfg, args.fit_steps)
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": dataclasses.asdict(cfg), "state": field.state_dict()}, path)
    return path, seconds


# ------------------------------------------------------------------------------------------------
# one configuration, in its own process


class SavedBytes:
    """Bytes autograd saves for the backward (distinct storages, parameters left out: they are held
    anyway) while the context is open."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        self.storages: dict[int, int] = {}
        self.held = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.held:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise KeyError(key)


def reset_peak_rss() -> int:
    """Return freed heap to the OS, reset the process's RSS high-water mark (Linux: clear_refs 5)
    and give the resident set now, the baseline of ``peak_rss_growth``."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def peak_rss_growth(baseline: int) -> int:
    return _status_bytes("VmHWM") - baseline


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    blob = torch.load(spec["field"], weights_only=True)
    field = Field(FieldConfig(**blob["config"]))
    field.load_state_dict(blob["state"])
    background = Background()
    res, s = spec["resolution"], spec["n_samples"]
    cameras = sample_views("random", spec["views"] + 1, torch.Generator().manual_seed(0))  # view 0: warm-up
    skipping, grid_ms = spec["renderer"] == "skipping", 0.0
    kw: dict[str, Any] = {}
    if skipping:
        r = RenderConfig()
        start = time.perf_counter()
        grid = OccupancyGrid(r.grid_resolution, field.cfg.bound,
                             density_threshold_for(r.alpha_threshold, s, field.cfg.bound))
        grid.initialise(density_function(field))
        grid_ms = 1e3 * (time.perf_counter() - start)
        kw = dict(occupancy=grid, alpha_threshold=r.alpha_threshold, transmittance_threshold=r.transmittance_threshold,
                  chunk_samples=spec["chunk_samples"])
    times, samples, density_samples, saved, baseline = [], [], [], 0, 0
    for i in range(len(cameras)):
        if i == 1:  # after the warm-up view: lazy initialisation and the grid are not part of a render
            baseline = reset_peak_rss()
        counter = SavedBytes(field, background)
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            out = render(field, background, cameras[i], res, res, n_samples=s, shading="diffuse", perturb=True,
                         generator=torch.Generator().manual_seed(i), need_normals=True, **kw)
            loss = out.rgb.mean() + out.orientation.sum()
        loss.backward()
        elapsed = time.perf_counter() - start
        field.zero_grad(set_to_none=True)
        background.zero_grad(set_to_none=True)
        saved = max(saved, counter.total)
        if i > 0:  # view 0 warms up allocator and caches
            times.append(1e3 * elapsed)
            samples.append(out.stats["samples_per_ray"])
            density_samples.append(out.stats["density_samples_per_ray"])
        del out, loss, counter
    return {**spec, "ms_per_view": statistics.median(times), "ms_min": min(times),
            "samples_per_ray": statistics.mean(samples), "density_samples_per_ray": statistics.mean(density_samples),
            "grid_init_ms": grid_ms, "saved_bytes": saved, "peak_rss_bytes": peak_rss_growth(baseline),
            "threads": torch.get_num_threads()}


def run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``worker(spec)`` in a fresh interpreter (an honest peak RSS); a failure is reported, not raised."""
    command = [sys.executable, __file__, "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        reason = "killed (out of memory?)" if done.returncode < 0 else done.stderr.strip().splitlines()[-1:]
        return {**spec, "error": f"exit {done.returncode}: {reason}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
# the report


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:,.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.1f}×" if a and b else "–"


def table(rows: list[dict[str, Any]]) -> str:
    """One line per resolution: dense | skipping | ratios (dense / skipping)."""
    head = ["resolution", "dense ms/view", "skipping ms/view", "speed-up", "dense samples/ray",
            "skipping samples/ray (density pass)", "dense peak RSS MiB", "skipping peak RSS MiB", "RSS ratio",
            "dense saved MiB", "skipping saved MiB", "saved ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in sorted({r["resolution"] for r in rows}):
        d = next((r for r in rows if r["resolution"] == res and r["renderer"] == "dense"), {})
        f = next((r for r in rows if r["resolution"] == res and r["renderer"] == "skipping"), {})
        cell = lambda row, key, fmt: (fmt(row[key]) if key in row else row.get("error", "skipped"))  # noqa: E731
        lines.append("| " + " | ".join([
            f"{res}²", cell(d, "ms_per_view", lambda v: f"{v:,.0f}"), cell(f, "ms_per_view", lambda v: f"{v:,.0f}"),
            _ratio(d.get("ms_per_view"), f.get("ms_per_view")),
            cell(d, "samples_per_ray", lambda v: f"{v:.1f}"),
            f"{f['samples_per_ray']:.1f} ({f['density_samples_per_ray']:.1f})" if "samples_per_ray" in f else
            f.get("error", "skipped"),
            cell(d, "peak_rss_bytes", _mib), cell(f, "peak_rss_bytes", _mib),
            _ratio(d.get("peak_rss_bytes"), f.get("peak_rss_bytes")),
            cell(d, "saved_bytes", _mib), cell(f, "saved_bytes", _mib),
            _ratio(d.get("saved_bytes"), f.get("saved_bytes")),
        ]) + " |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolutions", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--dense-max-resolution", type=int, default=256,
                   help="skip the dense renderer above this side (512² dense with normals needs tens of GB on CPU)")
    p.add_argument("--samples-per-ray", type=int, default=64)
    p.add_argument("--chunk-samples", type=int, default=0,
                   help="points per field call of the skipping renderer (0: the device's default)")
    p.add_argument("--renderers", nargs="+", choices=RENDERERS, default=list(RENDERERS))
    p.add_argument("--views", type=int, default=2, help="timed views per configuration (after one warm-up view)")
    p.add_argument("--scene", default="chair")
    p.add_argument("--fit-steps", type=int, default=200)
    p.add_argument("--small-field", action="store_true", help="8 levels, 2^16 table instead of the paper's field")
    p.add_argument("--cache", default=os.path.join(os.environ.get("MVSDI_CACHE", os.path.expanduser("~/.cache/mvsdi")),
                                                   "benchmarks"))
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    p.add_argument("--out", default=None, help="folder for render_speed.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    field_path, fit_seconds = cached_field(args)
    load = os.getloadavg()[0]  # the machine may be shared: timings are only as good as it is idle
    rows = []
    for res in args.resolutions:
        for renderer in RENDERERS:
            spec = {"resolution": res, "renderer": renderer, "n_samples": args.samples_per_ray,
                    "views": args.views, "field": str(field_path), "chunk_samples": args.chunk_samples}
            if renderer not in args.renderers:
                continue
            if renderer == "dense" and res > args.dense_max_resolution:
                rows.append({**spec, "error": f"skipped (> {args.dense_max_resolution}²)"})
                continue
            rows.append(run_worker(spec, args.timeout))
            print(f"{res}² {renderer}: " + (f"{rows[-1]['ms_per_view']:,.0f} ms/view" if "ms_per_view" in rows[-1]
                                            else rows[-1]["error"]), file=sys.stderr, flush=True)
    command = "python benchmarks/render_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    field_name = "small (8 levels, 2^16)" if args.small_field else "paper (FieldConfig(): 16 levels, 2^19)"
    header = (f"Render forward+backward with normals (diffuse, loss = rgb.mean() + orientation), one view; "
              f"{datetime.now(timezone.utc):%Y-%m-%d}; {machine()} (load average {load:.1f} at the start, "
              f"{os.getloadavg()[0]:.1f} at the end); torch {torch.__version__}; "
              f"field {field_name} fitted to '{args.scene}' ({args.fit_steps} steps"
              f"{f', {fit_seconds:.0f} s' if fit_seconds else ', cached'}); {args.samples_per_ray} samples/ray; "
              f"skipping = 32³ grid, alpha > 0.01, T > 1e-4, {args.chunk_samples or 'default'} points per "
              f"field call.\n`{command}`\n")
    text = header + "\n" + table(rows)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "render_speed.json").write_text(json.dumps({"rows": rows, "table": text, "machine": machine(),
                                                           "torch": torch.__version__, "command": command,
                                                           "fit_seconds": fit_seconds}, indent=2))
    return 0 if all("error" not in r or r["error"].startswith("skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
