"""One prepared GPU session (issue 14): speed, fast paths and `mvsdi generate`, recorded as it goes.

THE DEVICE COMMAND. The next session with a GPU runs exactly this, in ONE `run` call with
`carry: ["wheels"]` and `timeout_s: 600` (the script stops itself after --budget-seconds):

    python3 benchmarks/gpu_record.py --device cuda --wheels wheels --out $OUT --budget-seconds 480

then copies gpu_record.md into docs/performance.md (and gives the device back).

THE WHEELS. The device has torch and triton but not diffusers. On the development machine, in the
repo root, before that call:

    .venv/bin/python -m pip download --no-deps -d wheels/ diffusers==0.42.1 importlib_metadata
    echo /wheels/ >> .git/info/exclude      # never commit wheels

(both are pure-Python wheels, any platform; importlib_metadata is optional: diffusers uses the
standard library's importlib.metadata on Python >= 3.8). The device tool copies the working tree;
`carry` brings the ignored wheels/ folder along. With `--wheels wheels` this script runs
`python -m pip install --no-deps --no-index --target /tmp/mvsdi-wheels-site wheels/*.whl` first
(--target: works whether or not the device's site-packages is writable, and leaves it as it was),
then puts that folder and the tree's src/ on sys.path and PYTHONPATH (mvsdi is not installed
there). The "environment" entry of the record lists mvsdi's dependencies that are missing; if
`mvsdi generate` needs one (tqdm, imageio, imageio-ffmpeg), add its wheel to wheels/ as well.

THE CPU MODE (what the tests run; a few minutes here):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu_record.py --device cpu --tiny --out /tmp/gpu-record

WHAT IT DOES, in order, with random weights of the real SD-2.1-base shapes (`--model random-sd21`,
no download; `--tiny`: the tiny stack and 16²/32² renders):

1. speed: one guidance evaluation of SDS and SDI (Perp-Neg), K = 1, 2, 4, at 128², 256², 512²,
   timed by benchmarks/speed.py's `measure` (breakdown render / VAE / UNet / backward / optimiser,
   UNet calls and images per evaluation, peak GPU memory, projected 10,000-evaluation run), SDI
   first (the targets are SDI's); K > 1 uses the device's default targets (batched on CUDA);
2. fast_paths, at the largest resolution, SDI K=2: view batching on / off, `--fast-unet`
   cuda_graph / compile, and the field compiled (`--field.compiled true`) or with its MLP in
   bfloat16 (`--field.mlp_precision bfloat16`) (compile and field rows each a speed.py subprocess:
   a compile cannot be interrupted in-process, a subprocess can be stopped at the deadline; the
   warm-up, compilation included, is recorded);
3. generate: `mvsdi generate` (benchmarks/generate_k.py's command) for K = 1 and K = 4, budget 40,
   at the paper's 512² and 64 samples; wall time and peak memory from each summary.json;
4. testbed: the full setting's cost per cell with --testbed-workers cells sharing the GPU
   (benchmarks/testbed_cost.py --setting full: the first --testbed-budget evaluations of each
   method's cell, a metric pass, and the blocks `mvsdi testbed --full` fits in its 8 minutes),
   if its estimate fits the time left;
5. targets: (a) a 10,000-evaluation SDI run, 512², Perp-Neg, K=2 antipodal <= 20 min; (b) wall
   time per evaluation <= 2x its UNet time; (c) peak memory at K=4 <= 1.1x at K=1 — each
   "met", "not met" or "not measured".

THE BUDGET. Before every section and measurement it estimates the cost (the most similar earlier
measurement, scaled, x1.5) and skips what will not fit, recording "skipped: time". Each section
must end by a share of the budget (DEADLINE_SHARE) so a slow early section cannot starve the
later ones. gpu_record.json and gpu_record.md are rewritten atomically after every measurement, so
a run cut short still returns what it finished; every section and measurement is in its own
try/except (an OOM at 512² keeps the 128² rows).
"""

from __future__ import annotations

import argparse
import gc
import glob
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

# Before torch loads OpenMP (as mvsdi.cli does): busy-waiting threads crawl on a shared CPU.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The device machine reaches no network; every model here is built in code.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
WHEEL_SITE = Path(tempfile.gettempdir()) / "mvsdi-wheels-site"
SECTIONS = ("setup", "speed", "fast_paths", "generate", "testbed")
# the training field of a fast-path row, and speed.py's flags for it (the first: the default field)
FIELD_FLAGS = {"eager": [], "compiled": ["--compiled-field"], "bf16-mlp": ["--mlp-precision", "bfloat16"]}
FIELD_MODES = tuple(FIELD_FLAGS)
# Each section must finish by this fraction of --budget-seconds; what one leaves unused flows to
# the next. Generate at 512² is the real CLI path, so it keeps a third of the budget.
DEADLINE_SHARE = {"speed": 0.45, "fast_paths": 0.6, "generate": 0.95, "testbed": 1.0}
SAFETY = 1.5  # estimates are the most similar earlier measurement, scaled, times this
FIRST_GUESS_S = {"cuda": 60.0, "cpu": 15.0}  # a measurement with nothing similar measured before
TARGET_MINUTES, TARGET_UNET_RATIO, TARGET_MEMORY_RATIO = 20.0, 2.0, 1.1
DEPENDENCIES = ("diffusers", "transformers", "huggingface_hub", "safetensors", "accelerate", "numpy", "PIL",
                "tqdm", "imageio", "imageio_ffmpeg", "matplotlib", "tensorboard", "triton")
NEEDED_BY = {"generate": ("tqdm", "imageio", "imageio_ffmpeg"), "testbed": ("matplotlib", "imageio")}
DIFFUSERS_HELP = ("diffusers is not importable ({error}). On the device machine install the carried wheels "
                  "first: `pip install --no-deps wheels/*.whl`, or pass `--wheels wheels` to this script "
                  "(see its docstring for how the wheels get there)")


# ------------------------------------------------------------------------------------------------
# command line

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny stack and sizes (a CPU run of every section)")
    p.add_argument("--model", help="default random-sd21 (tiny with --tiny)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench-out/gpu-record"),
                   help="output folder (default $OUT if set)")
    p.add_argument("--budget-seconds", type=float, default=480.0, help="wall-clock budget of the whole script")
    p.add_argument("--wheels", type=Path, help="pip-install DIR/*.whl (--no-deps --no-index) before anything")
    p.add_argument("--wheel-target", type=Path, default=WHEEL_SITE, help="where --wheels go (default %(default)s)")
    p.add_argument("--resolutions", type=int, nargs="+", help="default 128 256 512 (16 32 with --tiny)")
    p.add_argument("--guidance", nargs="+", choices=("sds", "sdi"), default=["sds", "sdi"])
    p.add_argument("--views", type=int, nargs="+", choices=(1, 2, 4), default=[1, 2, 4])
    p.add_argument("--steps", type=int, help="optimiser steps per pass of a measurement (default 2; 1 with "
                   "--tiny); falls back to 1 where the default will not fit")
    p.add_argument("--samples-per-ray", type=int, help="default 64 (8 with --tiny)")
    p.add_argument("--fast-unet-modes", nargs="*", choices=("cuda_graph", "compile"),
                   default=["cuda_graph", "compile"])
    p.add_argument("--compile-estimate-seconds", type=float, default=240.0,
                   help="expected torch.compile warm-up of the UNet (never measured before this run)")
    p.add_argument("--field-modes", nargs="*", choices=FIELD_MODES[1:], default=list(FIELD_MODES[1:]),
                   help="fast-path rows of the field: compiled (FieldConfig.compiled), bf16-mlp (mlp_precision)")
    p.add_argument("--field-compile-estimate-seconds", type=float, default=90.0,
                   help="expected torch.compile warm-up of the field (never measured on a GPU before this run)")
    p.add_argument("--generate-views", type=int, nargs="*", default=[1, 4])
    p.add_argument("--generate-budget", type=int, help="guidance evaluations per run (default 40; 4 with --tiny)")
    p.add_argument("--testbed-estimate-seconds", type=float,
                   help="expected testbed time (default 300 for the full setting's cost; 600 for --tiny's study)")
    p.add_argument("--testbed-workers", type=int, default=8, help="cells timed at once by testbed_cost.py")
    p.add_argument("--testbed-budget", type=int, default=20, help="evaluations timed per cell by testbed_cost.py")
    p.add_argument("--skip", nargs="*", choices=SECTIONS[1:], default=[], help="sections not to run")
    p.add_argument("--fail-section", choices=SECTIONS, help="raise inside this section (tests the recording)")
    args = p.parse_args(argv)
    apply_defaults(args)
    return args


def apply_defaults(args: argparse.Namespace) -> None:
    tiny = args.tiny
    args.model = args.model or ("tiny" if tiny else "random-sd21")
    args.resolutions = sorted(args.resolutions or ([16, 32] if tiny else [128, 256, 512]))
    args.steps = args.steps or (1 if tiny else 2)
    args.samples_per_ray = args.samples_per_ray or (8 if tiny else 64)
    args.generate_budget = args.generate_budget or (4 if tiny else 40)
    args.testbed_estimate_seconds = args.testbed_estimate_seconds or (600.0 if tiny else 300.0)


# ------------------------------------------------------------------------------------------------
# the record: one JSON and one markdown file, rewritten atomically as the run goes

def atomic_write_text(path: Path, text: str) -> None:
    """Write then rename: a reader (or a kill) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class Clock:
    """Seconds left, overall or before a section's deadline (a share of the budget)."""

    def __init__(self, budget: float):
        self.start, self.budget = time.monotonic(), budget

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self, section: str | None = None) -> float:
        share = DEADLINE_SHARE[section] if section else 1.0
        return self.budget * share - self.elapsed()


class Session:
    """What the sections share: options, clock, the record, and (after setup) the prior and modules."""

    def __init__(self, args: argparse.Namespace, argv: list[str]):
        self.args, self.clock = args, Clock(args.budget_seconds)
        self.out = args.out
        self.device = None  # torch.device, after setup
        self.prior = self.speed = self.genk = self.field_cfg = None
        self.subprocess_overhead: float | None = None  # start-up + prior loading of a child process
        self.env = dict(os.environ)
        self.record: dict[str, Any] = {
            "schema": 1, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([sys.executable, *sys.argv]) if argv is None else " ".join(["gpu_record.py", *argv]),
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "budget_seconds": args.budget_seconds, "environment": {}, "sections": {}, "targets": {},
        }

    @property
    def cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    def section(self, name: str) -> dict[str, Any]:
        return self.record["sections"].setdefault(name, {"status": "pending"})

    def write(self) -> None:
        self.record["elapsed_seconds"] = round(self.clock.elapsed(), 1)
        self.record["targets"] = evaluate_targets(self)
        atomic_write_text(self.out / "gpu_record.json", json.dumps(self.record, indent=2, default=str) + "\n")
        atomic_write_text(self.out / "gpu_record.md", markdown(self))


def log(message: str) -> None:
    print(f"[gpu_record] {message}", flush=True)


def error_text(exc: BaseException) -> str:
    return f"error: {type(exc).__name__}: {exc}"[:2000]


def skipped_time(estimate: float, left: float) -> str:
    return f"skipped: time (estimate {estimate:.0f} s, {max(left, 0):.0f} s left)"


# ------------------------------------------------------------------------------------------------
# sections

def run_section(session: Session, name: str, body: Callable[[Session, dict], None]) -> None:
    """Run one section; an exception is recorded and the next section runs anyway."""
    rec = session.section(name)
    began = time.monotonic()
    if name in session.args.skip:
        rec["status"] = "skipped: --skip"
    else:
        log(f"section {name} ({session.clock.left():.0f} s of the budget left)")
        rec["status"] = "running"
        try:
            if session.args.fail_section == name:
                raise RuntimeError(f"forced failure in section {name!r} (--fail-section)")
            body(session, rec)
            if rec["status"] == "running":
                rec["status"] = "skipped: time (nothing fitted)" if nothing_fitted(rec) else "done"
        except Exception as exc:  # noqa: BLE001 - the record must survive anything a section does
            rec["status"], rec["traceback"] = error_text(exc), traceback.format_exc(limit=8)
            log(f"section {name} failed: {rec['status']}")
            free_gpu(session)
    rec["seconds"] = round(time.monotonic() - began, 2)
    session.write()


def nothing_fitted(rec: dict) -> bool:
    items = rec.get("rows", []) + rec.get("runs", [])
    statuses = [item.get("status", "") for item in items]
    return bool(items) and all(s.startswith("skipped:") for s in statuses) and any("time" in s for s in statuses)


def setup(session: Session, rec: dict) -> None:
    """Wheels, versions, src/ on the path, the device, benchmarks/speed.py and the prior (timed)."""
    args = session.args
    if args.wheels:
        rec["wheels"] = install_wheels(args.wheels, args.wheel_target, session)
    put_on_path(session, REPO / "src")
    env = session.record["environment"]
    env.update(environment())
    began = time.perf_counter()
    import torch

    env.update(torch_environment(torch))
    try:
        import diffusers  # noqa: F401 - everything below loads models through it
    except ImportError as exc:
        message = DIFFUSERS_HELP.format(error=exc)
        print(f"gpu_record: error: {message}", file=sys.stderr, flush=True)
        raise RuntimeError(message) from exc
    from mvsdi.models import load_prior
    from mvsdi.priors.loading import resolve_device

    session.device = resolve_device(args.device)
    env.update(device_environment(torch, session.device))
    session.speed, session.genk = load_module("speed"), load_module("generate_k")
    rec["import_seconds"] = round(time.perf_counter() - began, 2)
    small = args.tiny or not session.cuda  # speed.py's choice: the paper's hash grid on CUDA only
    session.field_cfg = session.speed.SMALL_FIELD if small else session.speed.FieldConfig()
    rec["field"] = "small" if small else "paper"
    rec["stack_build_seconds"] = build_random_stack(args.model)
    began = time.perf_counter()
    session.prior = load_prior(args.model, session.device)
    rec["prior_load_seconds"] = round(time.perf_counter() - began, 2)
    # a child process pays interpreter start-up, imports and this loading again
    session.subprocess_overhead = rec["prior_load_seconds"] + rec.get("import_seconds", 0.0)


def build_random_stack(model: str) -> float | None:
    """Write a random-weight stack to the cache now (a no-op if there), timed apart from loading: a
    fresh device builds random-sd21 once (~2.6 GB), and child processes only load it."""
    from mvsdi.priors import cache_root, write_random_stable_diffusion
    from mvsdi.priors.loading import RANDOM_STACKS

    if model not in RANDOM_STACKS:
        return None
    began = time.perf_counter()
    write_random_stable_diffusion(cache_root() / f"random-{RANDOM_STACKS[model]}", shape=RANDOM_STACKS[model])
    return round(time.perf_counter() - began, 2)


def install_wheels(folder: Path, target: Path, session: Session) -> dict[str, Any]:
    wheels = sorted(glob.glob(str(folder / "*.whl")))
    if not wheels:
        return {"status": f"error: no .whl files in {folder}"}
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile", "--quiet",
           "--disable-pip-version-check", "--upgrade", "--target", str(target), *wheels]
    log("$ " + " ".join(cmd))
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30.0, session.clock.left()))
    put_on_path(session, target)
    return {"status": "installed" if proc.returncode == 0 else f"error: pip exited {proc.returncode}",
            "wheels": [Path(w).name for w in wheels], "seconds": round(time.perf_counter() - began, 2),
            "output_tail": (proc.stdout + proc.stderr)[-2000:]}


def put_on_path(session: Session, folder: Path) -> None:
    """Importable here and in every child process (mvsdi is not installed on the device)."""
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
        importlib.invalidate_caches()  # the folder may have been filled after the finders cached it
    parts = [p for p in session.env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(folder) not in parts:
        session.env["PYTHONPATH"] = os.pathsep.join([str(folder), *parts])


def load_module(name: str):
    """A script of benchmarks/ as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"mvsdi_bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def environment() -> dict[str, Any]:
    versions = {}
    for name in DEPENDENCIES:
        found = importlib.util.find_spec(name) is not None
        dist = {"PIL": "Pillow", "imageio_ffmpeg": "imageio-ffmpeg",
                "huggingface_hub": "huggingface-hub"}.get(name, name)
        try:
            versions[name] = metadata.version(dist) if found else None
        except metadata.PackageNotFoundError:
            versions[name] = "present (no metadata)"
    return {"python": platform.python_version(), "platform": platform.platform(), "versions": versions,
            "missing": [n for n, v in versions.items() if v is None]}


def torch_environment(torch) -> dict[str, Any]:
    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}


def device_environment(torch, device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"}
    props = torch.cuda.get_device_properties(device)
    return {"device": torch.cuda.get_device_name(device), "gpu_memory_gib": round(props.total_memory / 2**30, 1)}


def free_gpu(session: Session) -> None:
    """After an OOM or a failed measurement, give the allocator back what the failure held."""
    gc.collect()
    if session.cuda:
        import torch

        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# 1. speed (in-process, benchmarks/speed.py's measure)

def default_targets(session: Session, views: int) -> str:
    """Batched on CUDA (launch-bound UNet), one per view on the CPU. ``view_batching="auto"`` itself
    times both ways over its first four steps on CUDA and keeps the faster (``distill.AutoBatching``)."""
    return "batched" if session.cuda and views > 1 else "sequential"


def speed_plan(session: Session) -> list[dict[str, Any]]:
    args = session.args
    order = [g for g in ("sdi", "sds") if g in args.guidance]  # SDI first: the targets are SDI's
    return [{"guidance": g, "views": views, "resolution": r, "targets": default_targets(session, views),
             "fast_unet": "off"} for g in order for r in args.resolutions for views in sorted(args.views)]


def speed_section(session: Session, rec: dict) -> None:
    rec["rows"] = []
    for row in speed_plan(session):
        rec["rows"].append(row)
        measure_row(session, row, "speed")
        session.write()


def measure_row(session: Session, row: dict[str, Any], section: str) -> None:
    """One in-process measurement, or its skip / error, into ``row``."""
    steps, estimate = choose_steps(session, row, session.clock.left(section))
    if steps is None:
        row["status"] = skipped_time(estimate, session.clock.left(section))
        log(f"{describe(row)}: {row['status']}")
        return
    row["steps"], row["estimate_seconds"] = steps, round(estimate, 1)
    try:
        if session.prior is None:
            raise RuntimeError("no prior: the setup section did not load one")
        row.update(timed_measure(session, row, steps))
        row["status"] = "measured"
        log(f"{describe(row)}: {row['ms_per_evaluation']:.1f} ms / evaluation, {row['wall_seconds']:.1f} s")
    except Exception as exc:  # noqa: BLE001 - an OOM at 512² must not lose the other rows
        row["status"] = error_text(exc)
        log(f"{describe(row)}: {row['status']}")
        free_gpu(session)


def choose_steps(session: Session, row: dict[str, Any], left: float) -> tuple[int | None, float]:
    """The configured steps if they fit in ``left`` seconds, else 1 step if that fits, else None."""
    estimate = 0.0
    for steps in dict.fromkeys((session.args.steps, 1)):
        estimate = estimate_measure(session, row, steps)
        if estimate <= left:
            return steps, estimate
    return None, estimate


def timed_measure(session: Session, row: dict[str, Any], steps: int) -> dict[str, Any]:
    import torch

    speed = session.speed
    config = speed.preset(speed.PRESETS[row["guidance"], row["views"]], "a ripe strawberry", model=session.args.model,
                          device=str(session.device), budget=speed.RUN_BUDGET, resolution=row["resolution"],
                          samples_per_ray=session.args.samples_per_ray, field=session.field_cfg,
                          view_batching=row["targets"])
    if session.cuda:
        torch.cuda.reset_peak_memory_stats(session.device)
    began = time.perf_counter()
    mode = row.get("fast_unet", "off")
    try:
        if mode != "off":
            session.prior.use_fast_unet(mode)  # as speed.py --fast-unet does: the prior, not the config
        result = speed.measure(config, session.prior, session.device, steps)
    finally:
        if mode != "off":
            session.prior.use_fast_unet("off")  # drops the graphs and their memory pool
    result["wall_seconds"] = time.perf_counter() - began
    result["unet_passes_per_evaluation"] = unet_passes(result["unet_images_per_evaluation"], config.prompts.perp_neg)
    free_gpu(session)
    return result


def unet_passes(images_per_evaluation: float, perp_neg: bool) -> float:
    """Denoiser evaluations per guidance evaluation: batch elements over the CFG batch (2, or 4 with Perp-Neg)."""
    return images_per_evaluation / (4 if perp_neg else 2)


def describe(row: dict[str, Any]) -> str:
    return (f"{row['guidance']} K={row['views']} {row['resolution']}² {row['targets']}"
            + (f" fast-unet={row['fast_unet']}" if row.get("fast_unet", "off") != "off" else "")
            + (f" field={row['field_mode']}" if row.get("field_mode", "eager") != "eager" else ""))


# ------------------------------------------------------------------------------------------------
# estimates: the most similar earlier measurement, scaled

def measured_rows(session: Session, sections: tuple[str, ...] = ("speed", "fast_paths")) -> list[dict[str, Any]]:
    rows = []
    for name in sections:
        rows += [r for r in session.record["sections"].get(name, {}).get("rows", []) if r.get("status") == "measured"]
    return rows


def predict_ms(row: dict[str, Any], resolution: int) -> float:
    """ms per evaluation at another render size: render and backward grow with the pixels; the VAE and
    UNet do not (every render is resized to the prior's input size)."""
    parts = row["breakdown_ms_per_evaluation"]
    pixels = max(parts["render"] + parts["backward"], 0.0)
    fixed = max(row["ms_per_evaluation"] - pixels, 0.0)
    return fixed + pixels * (resolution / row["resolution"]) ** 2


def most_similar(rows: list[dict[str, Any]], guidance: str, views: int, resolution: int,
                 targets: str | None = None) -> dict[str, Any] | None:
    same = [r for r in rows if r["guidance"] == guidance and r.get("fast_unet", "off") == "off"
            and r.get("field_mode", "eager") == "eager"] or rows
    same = [r for r in same if r["views"] == views and targets in (None, r["targets"])] or same
    if not same:
        return None
    return min(same, key=lambda r: (abs(math.log(r["resolution"] / resolution)), -r["resolution"]))


def estimate_measure(session: Session, row: dict[str, Any], steps: int) -> float:
    """Seconds of speed.measure for ``row`` (three passes of ``steps`` steps), x SAFETY."""
    ref = most_similar(measured_rows(session), row["guidance"], row["views"], row["resolution"], row["targets"])
    if ref is None:
        return FIRST_GUESS_S["cuda" if session.cuda else "cpu"]
    work = predict_ms(ref, row["resolution"]) * steps * row["views"]
    ref_work = ref["ms_per_evaluation"] * ref["steps"] * ref["views"]
    return SAFETY * ref["wall_seconds"] * work / ref_work


def estimate_run_ms(session: Session, guidance: str, views: int, resolution: int) -> float | None:
    ref = most_similar(measured_rows(session, ("speed",)), guidance, views, resolution)
    return None if ref is None else predict_ms(ref, resolution)


# ------------------------------------------------------------------------------------------------
# 2. fast paths at the largest resolution: view batching on/off, --fast-unet cuda_graph / compile

def fast_path_plan(session: Session) -> list[dict[str, Any]]:
    """Eager rows first, then the fast UNet modes, then the field's (compiled, bfloat16 MLP): a
    failed CUDA-graph capture can leave this process's CUDA context unusable, and everything after
    it runs in child processes."""
    resolution, default = max(session.args.resolutions), default_targets(session, 2)
    base = {"guidance": "sdi", "views": 2, "resolution": resolution, "field_mode": "eager"}
    rows = [{**base, "targets": t, "fast_unet": "off"} for t in ("batched", "sequential")]
    rows += [{**base, "targets": default, "fast_unet": m} for m in session.args.fast_unet_modes]
    return rows + [{**base, "targets": default, "fast_unet": "off", "field_mode": m} for m in session.args.field_modes]


def fast_paths_section(session: Session, rec: dict) -> None:
    rec["rows"] = []
    for row in fast_path_plan(session):
        rec["rows"].append(row)
        if row["field_mode"] != "eager":
            field_mode_row(session, row)
        elif row["fast_unet"] == "off":
            reuse_or_measure(session, row)
        else:
            fast_unet_row(session, row)
        session.write()


def reuse_or_measure(session: Session, row: dict[str, Any]) -> None:
    """The speed section's row of the same configuration if it has one (same process, same settings)."""
    key = ("guidance", "views", "resolution", "targets", "fast_unet")
    for earlier in measured_rows(session, ("speed",)):
        if all(earlier[k] == row[k] for k in key):
            row.update({**earlier, "source": "speed section"})
            return
    measure_row(session, row, "fast_paths")


def fast_unet_row(session: Session, row: dict[str, Any]) -> None:
    """CUDA graphs in this process (a capture is a few warm-up calls per shape); torch.compile in a
    child process, which can be stopped at the deadline (a compilation here could not be)."""
    if row["fast_unet"] == "cuda_graph":
        if session.cuda:
            measure_row(session, row, "fast_paths")
        else:
            row["status"] = "skipped: needs CUDA"
            log(f"{describe(row)}: {row['status']}")
        return
    speed_child_row(session, row, {**row, "fast_unet": "off"}, session.args.compile_estimate_seconds)


def field_mode_row(session: Session, row: dict[str, Any]) -> None:
    """The field compiled, or its MLP in bfloat16, in a child process (a compilation cannot be
    stopped in-process); the UNet eager, so the row differs from the eager one in the field only."""
    warmup = session.args.field_compile_estimate_seconds if row["field_mode"] == "compiled" else 0.0
    speed_child_row(session, row, {**row, "field_mode": "eager"}, warmup)


def speed_child_row(session: Session, row: dict[str, Any], eager: dict[str, Any], warmup: float) -> None:
    """``row`` by speed.py in a child process, if its estimate fits the section's time left: the
    ``eager`` configuration's measurement, a child's start-up and the expected ``warmup``."""
    left = session.clock.left("fast_paths")
    estimate = ((session.subprocess_overhead or FIRST_GUESS_S["cpu"])
                + estimate_measure(session, eager, session.args.steps) + warmup)
    if estimate > left:
        row["status"] = skipped_time(estimate, left)
        log(f"{describe(row)}: {row['status']}")
        return
    row["steps"], row["estimate_seconds"] = session.args.steps, round(estimate, 1)
    run_speed_subprocess(session, row, left)


def run_speed_subprocess(session: Session, row: dict[str, Any], timeout: float) -> None:
    """benchmarks/speed.py in a child process with --out JSON, stopped at the section's deadline."""
    mode = row.get("field_mode", "eager")
    out = session.out / "fast_paths" / (row["fast_unet"] if mode == "eager" else f"field-{mode}")
    cmd = [sys.executable, str(REPO / "benchmarks" / "speed.py"), "--model", session.args.model,
           "--device", str(session.device), "--guidance", row["guidance"], "--views", str(row["views"]),
           "--resolutions", str(row["resolution"]), "--samples-per-ray", str(session.args.samples_per_ray),
           "--steps", str(row["steps"]), "--targets", row["targets"], "--fast-unet", row["fast_unet"],
           "--field", session.section("setup").get("field", "small"), *FIELD_FLAGS[mode], "--out", str(out)]
    result = run_bounded(cmd, timeout, out / "log.txt", session.env)
    row["child_seconds"] = result["seconds"]
    if not child_failed(row, "speed.py", result):
        measured = json.loads((out / "speed.json").read_text())["rows"][0]
        row.update({k: v for k, v in measured.items() if k not in ("guidance", "views", "resolution", "targets")})
        # the SDI presets use Perp-Neg, the SDS ones do not
        row["unet_passes_per_evaluation"] = unet_passes(row["unet_images_per_evaluation"], row["guidance"] == "sdi")
        row["wall_seconds"], row["status"] = measured["measure_seconds"], "measured"  # as the in-process rows
        note_overhead(session, result["seconds"] - measured["measure_seconds"])
    log(f"{describe(row)}: {row['status']}")


def note_overhead(session: Session, seconds: float) -> None:
    """A child's start-up as measured: better than the setup's guess for the next estimate."""
    session.subprocess_overhead = max(seconds, 0.0)


def run_bounded(cmd: list[str], timeout: float, log_path: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd`` with its output in ``log_path``; stop it (its own process group) after ``timeout`` s."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log("$ " + " ".join(cmd))
    began = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            stop(proc)
    tail = log_path.read_text(errors="replace")[-4000:]
    return {"returncode": proc.returncode, "timed_out": timed_out, "seconds": time.perf_counter() - began,
            "tail": tail}


def child_failed(record: dict[str, Any], what: str, result: dict[str, Any]) -> bool:
    """Record a child that timed out or failed in ``record`` (status, output tail); True if it did."""
    if result["timed_out"]:
        record["status"] = f"skipped: time (stopped at the deadline after {result['seconds']:.0f} s)"
    elif result["returncode"] != 0:
        record["status"], record["output_tail"] = failed(what, result)
    else:
        return False
    return True


def failed(what: str, result: dict[str, Any]) -> tuple[str, str]:
    """(status naming the exit code and the last line of output, the output's tail)."""
    lines = [line for line in result["tail"].splitlines() if line.strip()]
    return f"error: {what} exited {result['returncode']}: {lines[-1] if lines else 'no output'}", result["tail"]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's process group (the one we started), SIGKILL if it lingers."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


# ------------------------------------------------------------------------------------------------
# 3. mvsdi generate (generate_k.py's command), 4. testbed

def missing_modules(session: Session, section: str) -> list[str]:
    return [m for m in NEEDED_BY[section] if m in session.record["environment"].get("missing", [])]


def generate_section(session: Session, rec: dict) -> None:
    missing = missing_modules(session, "generate")
    if missing:
        rec["status"] = f"skipped: missing modules {missing} (add their wheels to wheels/)"
        return
    rec["runs"] = []
    for views in session.args.generate_views:
        run = {"views": views, "budget": session.args.generate_budget, "resolution": max(session.args.resolutions),
               "samples_per_ray": session.args.samples_per_ray}
        rec["runs"].append(run)
        generate_run(session, run)
        session.write()


def estimate_generate(session: Session, run: dict[str, Any]) -> float:
    ms = estimate_run_ms(session, "sdi", run["views"], run["resolution"])
    overhead = session.subprocess_overhead or FIRST_GUESS_S["cpu"]
    if ms is None:
        return overhead + FIRST_GUESS_S["cuda" if session.cuda else "cpu"]
    return overhead + SAFETY * run["budget"] * ms / 1000


def generate_run(session: Session, run: dict[str, Any]) -> None:
    left, estimate = session.clock.left("generate"), estimate_generate(session, run)
    if estimate > left:
        run["status"] = skipped_time(estimate, left)
        log(f"generate K={run['views']}: {run['status']}")
        return
    run["estimate_seconds"] = round(estimate, 1)
    out = session.out / "generate" / f"k{run['views']}"
    try:
        cmd = session.genk.generate_command(
            run["views"], out, budget=run["budget"], resolution=run["resolution"],
            samples_per_ray=run["samples_per_ray"], model=session.args.model, device=str(session.device),
            eval_resolution=min(64, run["resolution"]), tensorboard=False)
        result = run_bounded(cmd, left, session.out / "generate" / f"k{run['views']}.log", session.env)
        run.update(command=" ".join(cmd[1:]), wall_seconds=result["seconds"])
        if not child_failed(run, "mvsdi generate", result):
            run.update(session.genk.summary_row(out), status="measured")
            note_overhead(session, result["seconds"] - run["train_seconds"] - (run["evaluation_seconds"] or 0.0))
    except Exception as exc:  # noqa: BLE001 - a bad summary must not lose the other K
        run["status"] = error_text(exc)
    log(f"generate K={run['views']}: {run['status']}")


def testbed_command(session: Session, out: Path) -> list[str]:
    """On the device: the full setting's cost per cell with cells sharing the GPU (issue 15's missing
    number; `mvsdi testbed --full` itself takes its 8-minute limit, more than this script has).
    With --tiny: the smallest study the CLI allows (one scene, SDS, budget 4)."""
    if session.args.tiny:
        return [sys.executable, "-m", "mvsdi.cli", "testbed", "--device", str(session.device), "--out", str(out),
                "--scenes", "mug", "--budget", "4", "--guidance", "sds", "--variance-repeats", "2"]
    return [sys.executable, str(REPO / "benchmarks" / "testbed_cost.py"), "--setting", "full", "--device",
            str(session.device), "--workers", str(session.args.testbed_workers), "--budget",
            str(session.args.testbed_budget)]


def testbed_section(session: Session, rec: dict) -> None:
    missing = missing_modules(session, "testbed")
    left, estimate = session.clock.left("testbed"), session.args.testbed_estimate_seconds
    rec["setting"] = ("small (one scene, SDS, budget 4)" if session.args.tiny else
                      f"testbed_cost.py --setting full, {session.args.testbed_workers} workers, "
                      f"{session.args.testbed_budget} evaluations per cell")
    if missing:
        rec["status"] = f"skipped: missing modules {missing}"
    elif estimate > left:
        rec["status"] = skipped_time(estimate, left)
    else:
        out = session.out / "testbed"
        result = run_bounded(testbed_command(session, out), left, session.out / "testbed.log", session.env)
        rec["wall_seconds"] = result["seconds"]
        if not child_failed(rec, "the testbed", result):
            rec["table"] = (out / "table.md").read_text() if session.args.tiny else result["tail"]
    log(f"testbed ({rec['setting']}): {rec['status'] if rec['status'] != 'running' else 'done'}")


# ------------------------------------------------------------------------------------------------
# targets (issue 6): each met / not met / not measured

def evaluate_targets(session: Session) -> dict[str, Any]:
    resolution = max(session.args.resolutions)
    note = {} if resolution == 512 and not session.args.tiny else {
        "note": f"measured at {resolution}² with {'the tiny stack' if session.args.tiny else session.args.model}: "
                "a stand-in, not the issue's setting (512², SD-2.1 shapes)"}
    best = best_k2_row(session, resolution)
    return {"a_10k_run_minutes": {**target_a(best, resolution), **note},
            "b_wall_over_unet": {**target_b(best, resolution), **note},
            "c_memory_k4_over_k1": {**target_c(session, resolution), **note}}


def best_k2_row(session: Session, resolution: int) -> dict[str, Any] | None:
    rows = [r for r in measured_rows(session) if (r["guidance"], r["views"], r["resolution"]) == ("sdi", 2, resolution)]
    return min(rows, key=lambda r: r["ms_per_evaluation"]) if rows else None


def verdict(value: float | None, limit: float) -> str:
    return "not measured" if value is None else ("met" if value <= limit else "not met")


def setting_of(row: dict[str, Any]) -> str:
    return (f"SDI, Perp-Neg, K=2 antipodal, {row['resolution']}², targets {row['targets']}, fast-unet "
            f"{row['fast_unet']}, field {row.get('field_mode', 'eager')}")


def target_a(best: dict[str, Any] | None, resolution: int) -> dict[str, Any]:
    value = None if best is None else best["projected_10k_minutes"]
    out = {"target": f"10,000-evaluation SDI run, {resolution}², Perp-Neg, K=2 <= {TARGET_MINUTES:g} min",
           "status": verdict(value, TARGET_MINUTES), "value_minutes": value}
    if best is not None:
        out.update(ms_per_evaluation=best["ms_per_evaluation"], setting=setting_of(best) + " (fastest measured)")
    return out


def target_b(best: dict[str, Any] | None, resolution: int) -> dict[str, Any]:
    value = None if best is None else best.get("total_over_unet")
    out = {"target": f"wall time per evaluation <= {TARGET_UNET_RATIO:g}x its UNet time (SDI K=2 {resolution}²)",
           "status": verdict(value, TARGET_UNET_RATIO), "value_ratio": value}
    if best is not None:
        out["setting"] = setting_of(best)
    return out


def target_c(session: Session, resolution: int) -> dict[str, Any]:
    """From the speed rows (one process, same settings); else from the two `mvsdi generate` runs."""
    peaks, source = {}, None
    for row in measured_rows(session, ("speed",)):
        if (row["guidance"], row["resolution"]) == ("sdi", resolution) and row.get("peak_memory_gib") is not None:
            peaks[row["views"]] = row["peak_memory_gib"]
    if 1 in peaks and 4 in peaks:
        source = f"speed section, SDI {resolution}²"
    else:
        generate_runs = session.record["sections"].get("generate", {}).get("runs", [])
        peaks = {r["views"]: r["peak_gpu_memory_gib"] for r in generate_runs
                 if r.get("status") == "measured" and r.get("peak_gpu_memory_gib") is not None}
        source = "mvsdi generate runs" if 1 in peaks and 4 in peaks else None
    ratio = peaks[4] / peaks[1] if source else None
    out = {"target": f"peak GPU memory at K=4 <= {TARGET_MEMORY_RATIO:g}x at K=1",
           "status": verdict(ratio, TARGET_MEMORY_RATIO), "value_ratio": ratio}
    if source:
        out.update(source=source, peak_k1_gib=peaks[1], peak_k4_gib=peaks[4])
    elif not session.cuda:
        out["reason"] = "peak GPU memory exists only on CUDA"
    return out


# ------------------------------------------------------------------------------------------------
# markdown

def fmt(value: Any, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, (int, float)) else str(value)


def markdown(session: Session) -> str:
    r, env = session.record, session.record["environment"]
    versions = env.get("versions", {})
    lines = ["# GPU record (issue 14)", "",
             f"- date: {r['date']}; device: {env.get('device', 'n/a')}; "
             f"torch {env.get('torch', 'n/a')} (CUDA {env.get('torch_cuda')}), diffusers {versions.get('diffusers')}, "
             f"triton {versions.get('triton')}, transformers {versions.get('transformers')}, "
             f"python {env.get('python')}",
             f"- command: `{r['command']}`",
             f"- elapsed {fmt(r.get('elapsed_seconds'), 0)} s of a {r['budget_seconds']:g} s budget; "
             f"missing modules: {', '.join(env.get('missing', [])) or 'none'}", "",
             "## Targets", "", "| target | status | value | setting |", "|---|---|---|---|"]
    for t in r["targets"].values():
        value = t.get("value_minutes", t.get("value_ratio"))
        where = "; ".join(filter(None, (t.get("setting", t.get("source", t.get("reason"))), t.get("note"))))
        lines.append(f"| {t['target']} | {t['status']} | {fmt(value, 2)} | {where} |")
    lines += ["", "## Sections", "", "| section | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {cell(s['status'])} | {fmt(s.get('seconds'))} |" for name, s in r["sections"].items()]
    lines += speed_markdown(session) + fast_paths_markdown(session) + generate_markdown(session)
    testbed = r["sections"].get("testbed", {})
    lines += ["", "## Testbed", "", f"{testbed.get('setting', '')}: {testbed.get('status', 'pending')}"]
    if testbed.get("table"):
        lines += ["", testbed["table"]]
    return "\n".join(lines) + "\n"


def cell(text: str, limit: int = 200) -> str:
    """A status as one markdown table cell."""
    return " ".join(str(text).split()).replace("|", "/")[:limit]


def not_measured(rows: list[dict[str, Any]]) -> list[str]:
    return [f"- {describe(row)}: {cell(row['status'], 300)}" for row in rows if row.get("status") != "measured"]


def speed_markdown(session: Session) -> list[str]:
    rows = session.record["sections"].get("speed", {}).get("rows", [])
    measured = [row for row in rows if row.get("status") == "measured"]
    lines = ["", "## Speed per guidance evaluation (benchmarks/speed.py's measure)", ""]
    if measured and session.speed is not None:
        lines += [session.speed.markdown(measured), "",
                  "| guidance | K | res | UNet passes / eval | warm-up s | wall s | steps |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {m['guidance']} | {m['views']} | {m['resolution']} | {fmt(m['unet_passes_per_evaluation'], 2)} | "
                  f"{fmt(m['warmup_seconds'])} | {fmt(m['wall_seconds'])} | {m['steps']} |" for m in measured]
    return lines + not_measured(rows)


def fast_paths_markdown(session: Session) -> list[str]:
    rows = session.record["sections"].get("fast_paths", {}).get("rows", [])
    lines = ["", "## Fast paths (SDI, K=2, largest resolution)", "",
             "| fast-unet | field | targets | ms / eval | UNet ms | total / UNet | UNet calls / eval | peak GiB "
             "| warm-up s | 10k run (min) | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        unet = row.get("breakdown_ms_per_evaluation", {}).get("unet")
        lines.append(f"| {row['fast_unet']} | {row.get('field_mode', 'eager')} | {row['targets']} | "
                     f"{fmt(row.get('ms_per_evaluation'))} | {fmt(unet)} | "
                     f"{fmt(row.get('total_over_unet'), 2)} | {fmt(row.get('unet_calls_per_evaluation'), 2)} | "
                     f"{fmt(row.get('peak_memory_gib'), 2)} | {fmt(row.get('warmup_seconds'))} | "
                     f"{fmt(row.get('projected_10k_minutes'))} | {cell(row.get('status', ''))} |")
    return lines


def generate_markdown(session: Session) -> list[str]:
    runs = session.record["sections"].get("generate", {}).get("runs", [])
    lines = ["", "## mvsdi generate (benchmarks/generate_k.py's command)", "",
             "| K | budget | res | train s | ms / eval | UNet calls | peak GPU GiB | peak process GiB | 10k run (min) "
             "| wall s | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        lines.append(f"| {run['views']} | {run['budget']} | {run['resolution']} | {fmt(run.get('train_seconds'))} | "
                     f"{fmt(run.get('ms_per_evaluation'))} | {fmt(run.get('unet_calls'), 0)} | "
                     f"{fmt(run.get('peak_gpu_memory_gib'), 2)} | {fmt(run.get('peak_process_memory_gib'), 2)} | "
                     f"{fmt(run.get('projected_10k_minutes'))} | {fmt(run.get('wall_seconds'))} | "
                     f"{cell(run.get('status', ''))} |")
    return lines


# ------------------------------------------------------------------------------------------------

BODIES = {"setup": setup, "speed": speed_section, "fast_paths": fast_paths_section, "generate": generate_section,
          "testbed": testbed_section}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    session = Session(args, argv)
    session.write()
    for name in SECTIONS:
        if name != "setup" and session.device is None:
            # without the setup (no torch device, or no diffusers) nothing else can run
            session.section(name)["status"] = f"skipped: setup failed ({session.section('setup')['status'][:300]})"
            session.write()
            continue
        run_section(session, name, BODIES[name])
    print("\n" + markdown(session), flush=True)
    log(f"wrote {session.out / 'gpu_record.json'} and gpu_record.md in {session.clock.elapsed():.0f} s")
    return 0 if session.device is not None else 2


if __name__ == "__main__":
    sys.exit(main())
