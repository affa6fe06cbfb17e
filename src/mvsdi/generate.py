"""``mvsdi generate``: one prompt → a trained field and a complete run directory.

A run is staged (see ``RunDirectory``) and survives what real runs meet: Ctrl-C once saves a
checkpoint and writes the outputs of the current state (twice stops at once, keeping the last
checkpoint; before the first one, a second press waits for it: see ``StopOnInterrupt``);
``resume`` continues a stopped or killed run and ends where an uninterrupted run ends;
non-finite steps are skipped and, past a limit, rolled back (see ``distill.train``).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import diffusers
import torch
import transformers
from tqdm.auto import tqdm

import mvsdi
from mvsdi.atomic_files import atomic_write_bytes
from mvsdi.cameras import evaluation_cameras
from mvsdi.config import RunConfig, config_differences, execution_settings
from mvsdi.distill import Distiller, Model, TrainResult, train
from mvsdi.export import ImageMaps, normal_image, turntable_panels, write_video
from mvsdi.memory import available_bytes, check_fits, estimate_view_memory, free_memory_override
from mvsdi.models import load_prior
from mvsdi.priors.loading import resolve_device
from mvsdi.render import RenderOutput, render
from mvsdi.run_state import Counters, evaluations_at_end, restore
from mvsdi.rundir import TURNTABLE, VALIDATION, RunDirectory, RunDirectoryError, read_checkpoint
from mvsdi.schedules import fraction_spent
from mvsdi.step_record import StepRecord
from mvsdi.tracking import Tracker, check_wandb_available

VALIDATIONS_PER_RUN = 10  # validation renders (TensorBoard images, collapse check) per run
VALIDATION_VIEWS, VALIDATION_RESOLUTION = 4, 64
# the convergence curve's front view: CLIP's input size, so `mvsdi eval` scores it unresized
FRONT_RESOLUTION = 224
CONVERGENCE_POINTS = "convergence.jsonl"  # in RUN/validation: one line per validation point
# a field whose every validation view is (almost) empty or (almost) fully opaque has collapsed
EMPTY_OPACITY, SATURATED_OPACITY = 0.005, 0.98


@dataclasses.dataclass(frozen=True)
class Tracking:
    tensorboard: bool = True
    wandb: bool = False


def _versions() -> dict[str, str]:
    return {"mvsdi": mvsdi.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def _peak_memory(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    # ru_maxrss is in KiB on Linux: the whole process's peak resident memory
    return {"peak_process_memory_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class Progress:
    """A tqdm bar counting guidance evaluations spent (so its rate is evaluations/s and its ETA is honest).

    Its total is what the run will have spent at the plan's last step (``evaluations_at_end``):
    the budget, grown by the evaluations of the steps each rollback has run again, so the bar
    never runs past its total and its ETA counts the redone steps.
    """

    def __init__(self, config: RunConfig, enabled: bool, counters: Counters | None = None):
        self.config, counters = config, counters or Counters()  # None: a run that has not begun
        self.bar = tqdm(total=evaluations_at_end(config, counters.steps, counters.guidance_evaluations),
                        initial=counters.guidance_evaluations, unit="eval", disable=not enabled, dynamic_ncols=True)

    def __call__(self, record: StepRecord) -> None:
        # postfix first, so the line drawn by update shows this step's values, not the previous step's
        self.bar.set_postfix(t=min(record.t), loss=f"{record.loss:.4g}", unet=record.unet_calls, refresh=False)
        done = record.guidance_evaluations
        self.bar.total = evaluations_at_end(self.config, record.step + 1, done)
        if done >= self.bar.total:
            self.bar.n = done  # no draw: close() draws the final line, and drawing it here too showed "100%" twice
        else:
            self.bar.update(max(0, done - self.bar.n))

    def close(self) -> None:
        self.bar.close()


class StopOnInterrupt:
    """Ctrl-C once: ask the loop to stop after the current step (it then saves a checkpoint, and the
    outputs are written). Twice: raise KeyboardInterrupt now, keeping the last checkpoint; while the
    run has none yet, the second press only says so and the stop goes on (two quick presses must not
    lose the run), and a third stops at once, keeping nothing.

    ``checkpoint_step()``: the step of the run's last saved checkpoint, None while there is none.
    """

    def __init__(self, checkpoint_step: Callable[[], int | None] = lambda: None) -> None:
        self.checkpoint_step = checkpoint_step
        self.presses = 0
        self.previous = None

    def __enter__(self) -> "StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.presses += 1
        saved = self.checkpoint_step()
        if self.presses == 1:
            again = (f"Ctrl-C again to stop at once, keeping the checkpoint of step {saved}" if saved is not None
                     else "no checkpoint yet: a second Ctrl-C waits for the one this stop saves")
            print(f"\nmvsdi: stopping after this step: saving a checkpoint, then the outputs of the current state "
                  f"({again})", file=sys.stderr)
        elif saved is None and self.presses == 2:
            print("\nmvsdi: still finishing this step to save the run's first checkpoint; Ctrl-C once more to "
                  "stop at once and keep nothing", file=sys.stderr)
        else:
            raise KeyboardInterrupt

    def requested(self) -> bool:
        return self.presses > 0

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class CheckpointWriter:
    """``train``'s ``on_checkpoint``: saves to the run and remembers the step of the last checkpoint."""

    def __init__(self, run: RunDirectory, step: int | None = None):
        self.run, self.step = run, step

    def __call__(self, state: dict[str, Any]) -> None:
        self.run.save_checkpoint(state)
        self.step = state["counters"]["steps"]  # only once the file is in place


def collapse_kind(opacity: torch.Tensor) -> str | None:
    """'empty' or 'saturated' when every view's mean opacity says so; ``opacity``: [N, H, W, 1]."""
    per_view = opacity.flatten(1).mean(1)
    if bool((per_view < EMPTY_OPACITY).all()):
        return "empty"
    if bool((per_view > SATURATED_OPACITY).all()):
        return "saturated"
    return None


@torch.no_grad()
def evaluation_renders(distiller: Distiller, n: int | None = None, resolution: int | None = None) -> list[RenderOutput]:
    """The run's evaluation views of the current field (evenly spaced azimuths, elevation 15°,
    distance 2, fovy 70°), albedo; ``n`` views (default ``eval_views``) at ``resolution``
    (default ``eval_resolution``).

    They skip empty space with the training grid; before the first step they use a grid built
    from the field for them alone, so rendering changes no state of the run.
    """
    c, device = distiller.config, distiller.device
    cameras = evaluation_cameras(n or c.eval_views)
    side = resolution or c.eval_resolution
    settings = distiller.render_settings(distiller.current_grid())
    model = distiller.model
    return [render(model.field, model.background, cameras[i].to(device), side, side, n_samples=c.samples_per_ray,
                   shading="albedo", need_normals=True, **settings) for i in range(len(cameras))]


def view_panel(out: ImageMaps) -> torch.Tensor:
    """RGB | normals of the first view of a render, [H, 2W, 3] in [0, 1]."""
    return torch.cat([out.rgb[0], normal_image(out.normal[0], out.opacity[0])], dim=1)


class Validation:
    """Every tenth of the run: a few small renders (TensorBoard, and PNGs in RUN/validation), the
    collapse check, and a point of the convergence curve.

    A point is the fixed front view (``evaluation_cameras(1)``: azimuth 0, elevation 15°, the same
    camera as the evaluation's view 0) saved as RGB ``<evaluations>_front.png``, and one line of
    ``RUN/validation/convergence.jsonl`` with the cost spent so far. "UNet forward passes" there
    are ``unet_images``: batch elements through the UNet (the arithmetic done, the same whether or
    not a step's views are batched; a CFG call on one view counts 2, with Perp-Neg 4); the
    launches (``unet_calls``) are recorded beside them.
    """

    def __init__(self, distiller: Distiller, tracker: Tracker, run: RunDirectory | None = None):
        self.distiller, self.tracker, self.run = distiller, tracker, run
        self.steps = distiller.config.steps
        self.collapse: dict[str, Any] | None = None  # the first collapse seen: kind and step
        if run is not None:  # a resume: forget the points of the steps it runs again
            forget_points_after(run.path / VALIDATION, distiller.counters.guidance_evaluations)

    def due(self, step: int) -> bool:
        """Whether step ``step`` (0-based) ends a new tenth of the run; the last step always does.

        By fraction rather than every ``steps // 10`` steps, so that a run whose step count is not
        a multiple of 10 (K = 6: 1666 steps) still gets its last point at the end of its budget.
        """
        return (step + 1) * VALIDATIONS_PER_RUN // self.steps > step * VALIDATIONS_PER_RUN // self.steps

    def __call__(self, record: StepRecord) -> None:
        if not self.due(record.step):
            return
        c = self.distiller.config  # never larger than the run's own evaluation renders
        outs = [ImageMaps.of(o) for o in evaluation_renders(self.distiller, min(VALIDATION_VIEWS, c.eval_views),
                                                                         min(VALIDATION_RESOLUTION, c.eval_resolution))]
        kind = collapse_kind(torch.cat([o.opacity for o in outs]))
        if kind and self.collapse is None:
            self.collapse = {"kind": kind, "step": record.step, "guidance_evaluations": record.guidance_evaluations}
        images = {f"view{i}": view_panel(o) for i, o in enumerate(outs)}
        self.tracker.log_images(record.guidance_evaluations, images)
        if self.run is not None:
            self.save(record.guidance_evaluations, images)
            self.save_point(record)

    def name(self, evaluations: int, what: str) -> str:
        """<evaluations>_<what>.png, the count zero-padded to the budget's width so names sort."""
        return f"{evaluations:0{len(str(self.distiller.config.budget))}d}_{what}.png"

    def save(self, evaluations: int, images: dict[str, torch.Tensor]) -> None:
        for name, image in images.items():
            self.run.save_image(self.name(evaluations, name), image, folder=VALIDATION)

    def save_point(self, record: StepRecord) -> None:
        """The front view, then its line in convergence.jsonl (so a line never names a missing image)."""
        resolution = min(FRONT_RESOLUTION, self.distiller.config.eval_resolution)
        (front,) = evaluation_renders(self.distiller, 1, resolution)
        image = self.name(record.guidance_evaluations, "front")
        self.run.save_image(image, ImageMaps.of(front).rgb[0], folder=VALIDATION)
        c = self.distiller.config
        point = {"step": record.step + 1, "fraction": fraction_spent(record.step + 1, c.views, c.budget),
                 "guidance_evaluations": record.guidance_evaluations,
                 "unet_forward_passes": record.unet_images, "unet_images": record.unet_images,
                 "unet_calls": record.unet_calls, "image": image, "resolution": resolution,
                 "camera": front_camera()}
        with open(self.run.path / VALIDATION / CONVERGENCE_POINTS, "a", encoding="utf-8") as f:
            f.write(json.dumps(point) + "\n")


def front_camera() -> dict[str, float]:
    """The camera of the convergence points: the evaluation's view 0 (azimuth 0 is the front)."""
    cams = evaluation_cameras(1)
    return {"azimuth_deg": float(cams.azimuth_deg[0]), "elevation_deg": float(cams.elevation_deg[0]),
            "distance": float(cams.distance[0]), "fovy_deg": float(cams.fovy_deg[0])}


def read_points(folder: Path) -> list[dict[str, Any]]:
    """The convergence points in ``folder``/convergence.jsonl; a line cut short by a kill is skipped."""
    try:
        lines = (folder / CONVERGENCE_POINTS).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    points = []
    for line in lines:
        try:
            points.append(json.loads(line))
        except ValueError:
            continue
    return points


def forget_points_after(folder: Path, evaluations: int) -> None:
    """Drop the points (lines and front images) made after ``evaluations``: a resume makes them again."""
    if not (folder / CONVERGENCE_POINTS).exists():
        return
    kept = [p for p in read_points(folder) if p["guidance_evaluations"] <= evaluations]
    names = {p["image"] for p in kept}
    for image in folder.glob("*_front.png"):
        if image.name not in names:
            image.unlink()
    atomic_write_bytes(folder / CONVERGENCE_POINTS, "".join(json.dumps(p) + "\n" for p in kept).encode())


def write_evaluation(run: RunDirectory, distiller: Distiller) -> int:
    """The evaluation renders (PNG per view, RGB and normals) and a turntable of RGB | normals | depth."""
    outs = [ImageMaps.of(o) for o in evaluation_renders(distiller)]
    for i, out in enumerate(outs):
        run.save_image(f"{i:03d}.png", out.rgb[0])
        run.save_image(f"normal_{i:03d}.png", normal_image(out.normal[0], out.opacity[0]))
    write_video(turntable_panels(outs), run.path / TURNTABLE)
    return len(outs)


def disk_space_needed(config: RunConfig, model: Model) -> int:
    """Bytes a run writes at most: two checkpoints at once (weights and Adam's two moments, during
    the atomic replace) and the uncompressed evaluation renders and video frames."""
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    renders = config.eval_views * 2 * config.eval_resolution**2 * 3
    return 2 * 3 * parameters + 2 * renders


def _summary(config: RunConfig, distiller: Distiller, result: TrainResult, validation: Validation,
             device: torch.device, evaluation_seconds: float, n_renders: int,
             resumed_at: dict[str, int] | None) -> dict[str, Any]:
    counters, prior = distiller.counters, distiller.prior
    # the rate of this process: a resumed run's train_seconds covers only the steps it ran itself
    evaluations_here = counters.guidance_evaluations - (resumed_at or {}).get("guidance_evaluations", 0)
    return {
        "status": result.status, "prompt": config.prompt, "preset": config.preset,
        "steps": counters.steps, "steps_planned": config.steps, "views_per_step": config.views,
        "skipped_steps": counters.skipped_steps, "rollbacks": counters.rollbacks, "events": result.events,
        "collapse": validation.collapse,
        "guidance_evaluations": counters.guidance_evaluations, "budget": config.budget,
        "unet_calls": prior.counters.calls, "unet_images": prior.counters.images,
        "train_seconds": result.wall_seconds, "evaluation_seconds": evaluation_seconds,
        "resumed_at": resumed_at, "evaluations_per_second": evaluations_here / max(result.wall_seconds, 1e-9),
        "evaluation_renders": n_renders, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        **_peak_memory(device), "versions": _versions(),
    }


def _execute(config: RunConfig, run: RunDirectory, progress: bool, tracking: Tracking,
             start_state: dict[str, Any] | None = None) -> Path:
    """Train (from ``start_state`` if given), write the outputs, and commit or keep the staged run."""
    device = resolve_device(config.device)
    if tracking.wandb:
        check_wandb_available()
    prior = load_prior(config.model, device)
    if config.fast_unet != "off":
        if not hasattr(prior, "use_fast_unet"):
            raise ValueError(f"--fast-unet {config.fast_unet} applies to Stable Diffusion priors, not {config.model!r}")
        prior.use_fast_unet(config.fast_unet)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = Model.create(config, device)
    run.check_free_space(disk_space_needed(config, model))
    distiller = Distiller(config, prior, model, device)
    # refused before anything is written or trained, rather than killed by the kernel mid-run
    check_fits(estimate_view_memory(distiller), free_memory_override() or available_bytes(device),
               config.resolution, config.samples_per_ray)
    run.write_config(config.to_dict())
    resumed_at = None
    if start_state is not None:
        restore(distiller, start_state)
        run.truncate_log(distiller.counters.steps)
        run.drop_validation_after(distiller.counters.guidance_evaluations)
        resumed_at = {"step": distiller.counters.steps, "guidance_evaluations": distiller.counters.guidance_evaluations}
    tracker = Tracker(run.path, config.to_dict(), tensorboard=tracking.tensorboard, wandb=tracking.wandb)
    bar = Progress(config, progress, distiller.counters)
    validation = Validation(distiller, tracker, run)
    checkpoint = CheckpointWriter(run, resumed_at["step"] if resumed_at else None)

    def on_step(record: StepRecord) -> None:
        run.log(record.to_log())
        tracker.log_step(record)
        bar(record)
        validation(record)

    try:
        with StopOnInterrupt(lambda: checkpoint.step) as stop:
            result = train(distiller, on_step=on_step, on_checkpoint=checkpoint, stop_requested=stop.requested)
    finally:
        bar.close()
        tracker.close()
    started = time.perf_counter()
    n_renders = write_evaluation(run, distiller)
    run.write_summary(_summary(config, distiller, result, validation, device, time.perf_counter() - started, n_renders,
                               resumed_at))
    if result.status == "interrupted" and run.final_is_completed():
        run.close()  # never replace a completed run by an interrupted one
        print(f"mvsdi: the interrupted run is kept at {run.path}; {run.final} still holds the completed run",
              file=sys.stderr)
        return run.path
    return run.commit()


def _run_staged(config: RunConfig, run: RunDirectory, progress: bool, tracking: Tracking,
                start_state: dict[str, Any] | None = None) -> Path:
    try:
        return _execute(config, run, progress, tracking, start_state)
    except BaseException:
        if run.has_checkpoint():  # killed mid-run (e.g. Ctrl-C twice): keep it for --resume
            run.close()
        else:
            run.discard()
        raise


def generate(config: RunConfig, out: Path, overwrite: bool = False, progress: bool = True,
             tracking: Tracking = Tracking()) -> Path:
    """Train ``config`` and write its run directory at ``out``; returns the committed path.

    Nothing is written at ``out`` until the run completes or is interrupted (see ``RunDirectory``).
    """
    run = RunDirectory(out, overwrite=overwrite)
    return _run_staged(config, run, progress, tracking)


def resume(out: Path, overrides: dict[str, Any] | None = None, force: bool = False, progress: bool = True,
           tracking: Tracking = Tracking()) -> Path:
    """Continue the run at ``out`` (or its unfinished staging copy) from its last checkpoint.

    ``overrides``: config fields the user gave again; any that changes the run's config, or a
    checkpoint from another mvsdi version, is refused with the difference unless ``force``.
    """
    run = RunDirectory(out, resume=True)
    try:
        state = read_checkpoint(run.path)
        saved = state.get("config", {})
        if "rng" not in state:
            raise RunDirectoryError(f"{out}'s checkpoint was written by an mvsdi without resume support; "
                                    "it cannot be continued. Start a new run.")
        config = RunConfig.from_dict(saved)
        if overrides:
            config = dataclasses.replace(config, **overrides)
        problems = config_differences(saved, config.to_dict())
        if state.get("mvsdi_version") != mvsdi.__version__:
            problems.append(f"mvsdi version: {state.get('mvsdi_version')} → {mvsdi.__version__}")
        problems = [p for p in problems if p.split(":")[0] not in execution_settings()]
        if problems and not force:
            raise RunDirectoryError(f"resuming {out} would change the run: " + "; ".join(problems)
                                    + ". Drop those options, or pass --force to continue with them.")
        if state["counters"]["steps"] >= config.steps:
            raise RunDirectoryError(f"{out} has already run all {config.steps} steps; nothing to resume.")
        resolve_device(config.device)  # e.g. a GPU run resumed on a machine without one: refused untouched
    except BaseException:
        run.abandon_resume()
        raise
    return _run_staged(config, run, progress, tracking, start_state=state)
