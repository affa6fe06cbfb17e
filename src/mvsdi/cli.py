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

import torch

import mvsdi
from mvsdi import export_cli
from mvsdi.arguments import add_knob_options, knob_settings
from mvsdi.bench import cli as bench_cli
from mvsdi.cameras import SAMPLERS, CameraRanges
from mvsdi.commands import EXIT_BAD_INPUT, EXIT_INTERRUPTED, run_command
from mvsdi.config import PRESETS, RunConfig, apply_settings, is_ideal, preset, preset_of, run_label
from mvsdi.evaluate import cli as evaluate_cli
from mvsdi.generate import Tracking, generate, resume
from mvsdi.overrides import parse_assignment, parse_fields
from mvsdi.priors.loading import resolve_device
from mvsdi.priors.stable_diffusion import PriorLoadError
from mvsdi.rundir import CHECKPOINT, prompt_slug, read_summary
from mvsdi.testbed import cli as testbed_cli
from mvsdi.testbed.prior import TESTBED_CAMERAS

DEFAULT_PRESET = "mvsdi-k2"

# exit code of `mvsdi generate` for a run that ran out of GPU memory (all of them: its --help epilog)
EXIT_OUT_OF_MEMORY = 3


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
                       usage="%(prog)s [PROMPT] [--preset PRESET | --config FILE] [--PATH VALUE ...] "
                             "[--set PATH=VALUE ...] [--out OUT] [options]",
                       description="Distil a 3D field from PROMPT with a frozen 2D diffusion prior. Every field of a "
                                   "run's config.json is an option: --PATH VALUE by its dotted path (the same as "
                                   "--set PATH=VALUE), some also by a short flag. Options left out take the "
                                   f"preset's value; the defaults shown are {DEFAULT_PRESET}'s.",
                       epilog=GENERATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", help="the text prompt, e.g. \"a ripe strawberry\" (not needed with --resume)")
    p.add_argument("--preset", metavar="PRESET",
                   help=f"the method to start from, one of the presets listed below (default {DEFAULT_PRESET})")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="start from this config instead of a preset (a run's config.json repeats that run); "
                        "other options then change it")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", dest="settings",
                   help="set any field of the run's config by its dotted path in config.json, e.g. "
                        "--set guidance.delta_max=50 --set optim.lr=0.005 (repeatable; the same as --PATH VALUE)")
    p.add_argument("--out", type=Path, help="run directory (default: runs/<prompt>-<label>-s<seed>, the label "
                   "being the preset's name while the method is the preset's, else e.g. sdi-k4-antipodal)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run at --out once the new one completes")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--resume", type=Path, metavar="RUN",
                   help="continue the stopped or killed run RUN from its last checkpoint; other options must "
                        "match the run's config (or pass --force)")
    p.add_argument("--force", action="store_true",
                   help="with --resume: continue although options or the mvsdi version differ from the run's")
    p.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard logs in RUN/tensorboard")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (needs `pip install wandb`)")
    # prompt and preset are the positional and --preset above
    p.set_defaults(knobs=add_knob_options(p, RunConfig, defaults=preset(DEFAULT_PRESET, "help"),
                                          skip=("prompt", "preset")))


OUT_OF_MEMORY = (
    "out of GPU memory. Lower --resolution (training renders) or --samples-per-ray, or --eval-resolution if "
    "it failed while writing the outputs. K (--views) is not one of the knobs: views are accumulated one at "
    "a time, so peak memory does not grow with K.")


def _settings(args: argparse.Namespace) -> dict[str, str]:
    """The knobs the options and --set ask for, as text by dotted path (a --set after an option wins)."""
    settings = knob_settings(args, args.knobs)
    settings.update(parse_assignment(text) for text in args.settings)
    return settings


def configure(args: argparse.Namespace) -> RunConfig:
    """The run's config: the preset (or --config FILE), then the top-level knobs, then the nested
    ones and the schedule (``apply_settings``)."""
    settings = _settings(args)
    top = {path: text for path, text in settings.items() if "." not in path and path != "schedule"}
    nested = {path: text for path, text in settings.items() if path not in top}
    if args.config is not None:
        prompt = {"prompt": args.prompt} if args.prompt is not None else {}
        config = apply_settings(read_config_file(args.config), {**top, **prompt})
    else:
        config = apply_settings(preset(args.preset or DEFAULT_PRESET, args.prompt), top)
        config = _ideal_prior_cameras(config)
    return apply_settings(config, nested)


def _ideal_prior_cameras(config: RunConfig | None) -> RunConfig | None:
    """With ``--model ideal``, the training views come from the references' camera distribution
    (no jitter, fovy 55°): the exact denoiser knows only views drawn from it, and with threestudio's
    jitter the testbed's runs got worse with budget (docs/testbed.md). Elevation range and
    cameras.* options still apply on top; a --config file keeps its own cameras."""
    if config is None or not is_ideal(config.model) or config.cameras != CameraRanges():
        return config
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
        if args.settings or args.config or any("." in path or path == "schedule" for path in _settings(args)):
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
    resolve_device(config.device)  # a device this machine lacks fails before anything is written
    label = run_label(config, _ideal_prior_cameras(preset_of(config)))
    return config, args.out or Path("runs") / f"{prompt_slug(config.prompt)}-{label}-s{config.seed}"


def _overrides(args: argparse.Namespace) -> dict:
    """With --resume: the top-level knobs given again, parsed (the run's config says if they change it)."""
    return parse_fields(RunConfig, _settings(args))


def _generate(args: argparse.Namespace, config, out: Path) -> int:
    """Train or resume; 0 when the run finished, EXIT_INTERRUPTED when one Ctrl-C stopped it early."""
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
        return "interrupted before anything was written"
    partial = out.parent / f".{out.name}.partial"
    if (partial / CHECKPOINT).is_file():
        return (f"interrupted. The unfinished run is kept at {partial} (its last checkpoint): continue it "
                f"with `mvsdi generate --resume {out}`; {out} itself was left as it was")
    return f"interrupted before the run's first checkpoint: nothing was kept; {out} was left as it was"


def _run_generate(args: argparse.Namespace) -> int:
    target: list[Path] = []  # the run's folder, once the arguments have named it

    def work() -> int:
        config, out = _target(args)
        target.append(out)
        try:
            return _generate(args, config, out)
        except torch.OutOfMemoryError:
            print(f"mvsdi: error: {OUT_OF_MEMORY}", file=sys.stderr)
            return EXIT_OUT_OF_MEMORY

    return run_command(work, input_errors=(PriorLoadError,),
                       interrupted=lambda: _killed_message(target[0] if target else None))


def main(argv: list[str] | None = None) -> int:
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
