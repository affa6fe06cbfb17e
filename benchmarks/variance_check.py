"""Gradient variance per guidance evaluation of K-view methods relative to K=1, along a training run.

    python benchmarks/variance_check.py --repeats 32 --seeds 0 1 --scenes mug duck --fractions 0 0.5 1

For each guidance, scene and seed: train the K=1 cell of the small testbed study (32², ideal
denoiser over 64 references per scene, budget 96) and keep its parameters after each fraction of
the budget; there, with the schedules at that fraction, draw R independent gradients per method and
compare K·Var(g_K) with Var(g_1), with a 95% paired-bootstrap interval. For i.i.d. views the ratio
is 1. Prints one markdown row per point as it is measured, then the geometric mean over scenes and
seeds; ``--out`` also writes every row as JSON lines. See docs/testbed.md for what it found.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from mvsdi.testbed.cells import run_cell, variance_rows  # noqa: E402
from mvsdi.testbed.prior import IdealDenoiserPrior  # noqa: E402
from mvsdi.testbed.settings import METHODS, SMALL, cell_config  # noqa: E402
from mvsdi.testbed.tables import variance_markdown  # noqa: E402


def _cell(row: dict) -> str:
    return f"{row['ratio']:.2f} [{row['ratio_low']:.2f}, {row['ratio_high']:.2f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=32, help="gradient draws per method and point (R)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--scenes", nargs="+", default=["mug"])
    p.add_argument("--guidance", nargs="+", default=["sds", "sdi"], choices=["sds", "sdi"])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0],
                   help="points of the K=1 run (fractions of its budget) where the variance is measured")
    p.add_argument("--methods", nargs="+", default=["K2-random", "K2-antipodal"],
                   choices=[m.name for m in METHODS[1:]], help="compared with K1")
    p.add_argument("--out", type=Path, help="also write every row to this JSON-lines file")
    args = p.parse_args()
    cpu = torch.device("cpu")
    settings = dataclasses.replace(SMALL, variance_repeats=args.repeats)
    methods = (METHODS[0], *(m for m in METHODS if m.name in args.methods))
    prior = IdealDenoiserPrior(n_references=settings.references, image_size=settings.image_size, device=cpu)
    print("| guidance | scene | seed | fraction | " + " | ".join(f"{m.name} / K1" for m in methods[1:]) + " |")
    print("|---|---|---|---|" + "---|" * (len(methods) - 1), flush=True)
    rows = []
    for scene in args.scenes:
        for seed in args.seeds:
            for guidance in args.guidance:
                config = cell_config(settings, guidance, METHODS[0], scene, seed)
                snapshots = run_cell(prior, config, (), cpu, snapshot_at=tuple(args.fractions)).snapshots
                found = variance_rows(settings, prior, guidance, scene, seed, snapshots, cpu, methods)
                for fraction in sorted(snapshots):
                    at = [r for r in found if r["fraction"] == fraction]
                    print(f"| {guidance} | {scene} | {seed} | {fraction:g} | " + " | ".join(_cell(r) for r in at[1:])
                          + " |", flush=True)
                rows += found
                if args.out:
                    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print("\nGeometric mean over scenes and seeds [95% interval from the repeats]:\n")
    print(variance_markdown(rows))


if __name__ == "__main__":
    main()
