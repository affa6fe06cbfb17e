"""Cost per guidance evaluation of the testbed's cells, side by side in one process.

    OMP_NUM_THREADS=1 python benchmarks/testbed_cost.py              # the study's CPU path, one thread
    python benchmarks/testbed_cost.py --device cuda --budget 200     # the same cells on a GPU

For each guidance and method of the medium study: the wall time per evaluation of a cell of the
medium settings (after a warm-up of a tenth of the budget), and the same cell with the ideal
denoiser's posterior mean over every reference (no pruning of negligible weights) and, for K > 1,
with the other view-batching choice. Also the time of one metric pass (50 views, IoU grid). These
are the numbers the study's settings were sized from (docs/testbed.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see mvsdi.cli)

import torch  # noqa: E402

from mvsdi.distill import Distiller, Model  # noqa: E402
from mvsdi.testbed import prior as prior_module  # noqa: E402
from mvsdi.testbed.prior import IdealDenoiserPrior  # noqa: E402
from mvsdi.testbed.cells import measure  # noqa: E402
from mvsdi.testbed.settings import MEDIUM, cell_config  # noqa: E402


def per_evaluation(prior, config, device, budget: int) -> tuple[float, Distiller]:
    """Seconds per evaluation after a warm-up of a tenth of ``budget``, and the trained distiller."""
    distiller = Distiller(config, prior, Model.create(config, device), device)
    warm = budget // 10
    while distiller.counters.guidance_evaluations < warm:
        distiller.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    while distiller.counters.guidance_evaluations < budget:
        distiller.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / (distiller.counters.guidance_evaluations - warm), distiller


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=120, help="evaluations timed per cell (a multiple of 4)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    settings = dataclasses.replace(MEDIUM, device=args.device, budgets=(args.budget,))
    prior = IdealDenoiserPrior(n_references=settings.references, image_size=settings.image_size, device=device)
    print(f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; medium settings, mug, seed 0, "
          f"{args.budget} evaluations per cell\n")
    print("| guidance | method | view batching | ms / evaluation | without pruning | other batching |")
    print("|---|---|---|---|---|---|")
    for guidance in settings.guidances:
        for method in settings.method_list:
            config = cell_config(settings, guidance, method, "mug", 0)
            cost, distiller = per_evaluation(prior, config, device, args.budget)
            threshold, prior_module.NEGLIGIBLE_WEIGHT = prior_module.NEGLIGIBLE_WEIGHT, -1.0  # keep every reference
            try:
                unpruned, _ = per_evaluation(prior, config, device, args.budget)
            finally:
                prior_module.NEGLIGIBLE_WEIGHT = threshold
            other = "n/a"
            if method.views > 1 and not (guidance == "sdi" and not config.guidance.t_anneal):
                flipped = "sequential" if config.view_batching == "batched" else "batched"
                flipped_config = dataclasses.replace(config, view_batching=flipped)
                other = f"{1000 * per_evaluation(prior, flipped_config, device, args.budget)[0]:.0f} ({flipped})"
            print(f"| {guidance} | {method.name} | {config.view_batching} | {1000 * cost:.0f} | {1000 * unpruned:.0f} "
                  f"| {other} |", flush=True)
    started = time.perf_counter()
    measure(distiller, prior, config, 1.0)
    print(f"\none metric pass: {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
