"""`mvsdi testbed`: the K-view study on the weights-free ground truth."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "testbed", help="compare K-view methods at equal budget where the truth is known (no weights)",
        description="Distil procedural scenes with the exact ideal denoiser of their renders as the prior, "
                    "for K=1, K=2 random/antipodal/stratified and K=4 antipodal/mixed at the same budget, "
                    "and measure the result against the true shapes. The default is small (minutes on 2 CPU "
                    "cores); --full is the study meant for a GPU.")
    p.add_argument("--full", action="store_true", help="all scenes, 3 seeds, budget 2000, 64² (GPU)")
    p.add_argument("--scenes", help="comma-separated scene names (default: the setting's)")
    p.add_argument("--seeds", type=int, help="number of seeds")
    p.add_argument("--budget", type=int, help="guidance evaluations per cell (a multiple of 4)")
    p.add_argument("--guidance", help="comma-separated: sds,sdi")
    p.add_argument("--variance-repeats", type=int, help="gradient draws per method and point of the run (R, >= 2)")
    p.add_argument("--device", help="cpu, cuda, auto")
    p.add_argument("--out", type=Path, default=Path("runs/testbed"), help="where tables, plots and GIFs go")
    return p


def settings_from_args(args: argparse.Namespace):
    from mvsdi.testbed.scenes import get_scene
    from mvsdi.testbed.study import FULL, SMALL

    settings = FULL if args.full else SMALL
    changes = {}
    if args.scenes:
        changes["scenes"] = tuple(s.strip() for s in args.scenes.split(",") if s.strip())
        for name in changes["scenes"]:
            get_scene(name)
    if args.seeds is not None:
        if args.seeds < 1:
            raise ValueError("--seeds must be >= 1")
        changes["seeds"] = tuple(range(args.seeds))
    if args.budget is not None:
        if args.budget < 4 or args.budget % 4:
            raise ValueError(f"--budget {args.budget}: the study runs K=1, 2 and 4, so it must be a positive multiple of 4")
        changes["budget"] = args.budget
    if args.guidance:
        changes["guidances"] = tuple(g.strip() for g in args.guidance.split(","))
        unknown = set(changes["guidances"]) - {"sds", "sdi"}
        if unknown:
            raise ValueError(f"unknown guidance {sorted(unknown)}; choose from sds, sdi")
    if args.variance_repeats is not None:
        if args.variance_repeats < 2:
            raise ValueError("--variance-repeats must be >= 2 (a variance needs two draws)")
        changes["variance_repeats"] = args.variance_repeats
    if args.device:
        changes["device"] = args.device
    return dataclasses.replace(settings, **changes)


def run(args: argparse.Namespace) -> int:
    from mvsdi.testbed.study import run_study

    try:
        settings = settings_from_args(args)
        result = run_study(settings, args.out)
    except ValueError as exc:
        print(f"mvsdi testbed: error: {exc}", file=sys.stderr)
        return 2
    print((args.out / "table.md").read_text())
    print(f"study written to {args.out} in {result['seconds']:.0f} s")
    return 0
