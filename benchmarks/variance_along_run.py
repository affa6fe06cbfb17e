"""Per-evaluation gradient variance of the K-view estimators along a testbed run, read robustly.

For each guidance, trains the K=1 cell of a scene and seed, keeps its parameters at a few fractions
of the budget, and there draws R gradients of every method (paired draws: the same keys for every
method). Prints, per method and point, the variance per evaluation over K=1's:

- over all parameters, with the paired-bootstrap 95% interval (``mvsdi.variance.ratio_intervals``);
- median of means over 8 disjoint groups of R/8 draws, with the smallest and largest group ratio
  (the tail, shown rather than averaged away), for all parameters, the hash tables alone and the
  shared weights (MLP, blob, background) alone.

    .venv/bin/python benchmarks/variance_along_run.py --repeats 32 --scene mug --seed 0 > variance.md

Cost: R × 15 guidance evaluations per point (K = 1, 2, 2, 2, 4, 4 methods) plus the K=1 training run.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import torch

from mvsdi.testbed.cells import run_cell, variance_rows
from mvsdi.testbed.prior import IdealDenoiserPrior
from mvsdi.testbed.settings import METHODS, SMALL, cell_config


def measure(guidance: str, scene: str, seed: int, repeats: int, fractions: tuple[float, ...], budget: int | None):
    settings = dataclasses.replace(SMALL, scenes=(scene,), seeds=(seed,), variance_repeats=repeats,
                                   variance_fractions=fractions, **({"budgets": (budget,)} if budget else {}))
    device = torch.device(settings.device)
    prior = IdealDenoiserPrior(n_references=settings.references, image_size=settings.image_size, device=device)
    config = cell_config(settings, guidance, METHODS[0], scene, seed)
    cell = run_cell(prior, config, (), device, fractions)
    return settings, variance_rows(settings, prior, guidance, scene, seed, cell.snapshots, device)


def markdown(rows: list[dict]) -> str:
    head = ("| guidance | method | at | all [95% bootstrap] | all, median of 8 [min, max] | tables, median [min, max] "
            "| shared, median [min, max] |")
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        if r["method"] == METHODS[0].name:
            continue
        parts = [f"{r[f'{p}_mom_ratio']:.2f} [{r[f'{p}_mom_min']:.2f}, {r[f'{p}_mom_max']:.2f}]"
                 for p in ("all", "tables", "shared")]
        lines.append(f"| {r['guidance']} | {r['method']} | {r['fraction']:g} | {r['ratio']:.2f} "
                     f"[{r['ratio_low']:.2f}, {r['ratio_high']:.2f}] | " + " | ".join(parts) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=32, help="R, gradient draws per method and point (>= 16)")
    parser.add_argument("--scene", default="mug")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidances", default="sds,sdi")
    parser.add_argument("--fractions", default="0,0.5,1", help="points of the K=1 run (budget fractions)")
    parser.add_argument("--budget", type=int, help="budget of the K=1 run (default: the small study's)")
    args = parser.parse_args()
    if args.repeats < 16:
        parser.error("--repeats must be >= 16: the median of means needs 8 groups of at least 2 draws")
    fractions = tuple(float(f) for f in args.fractions.split(","))
    started, rows = time.perf_counter(), []
    for guidance in args.guidances.split(","):
        settings, found = measure(guidance, args.scene, args.seed, args.repeats, fractions, args.budget)
        rows += found
    print(f"Scene {args.scene}, seed {args.seed}, budget {settings.budget}, {settings.image_size}² renders, "
          f"R = {args.repeats} draws per method and point; {time.strftime('%Y-%m-%d')}, "
          f"{platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, {time.perf_counter() - started:.0f} s.\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
