"""Cost per guidance evaluation of the testbed's cells, side by side in one process.

    OMP_NUM_THREADS=1 python benchmarks/testbed_cost.py              # the study's CPU path, one thread
    python benchmarks/testbed_cost.py --device cuda --budget 200     # the same cells on a GPU
    python benchmarks/testbed_cost.py --setting full --device cuda --workers 8 --budget 100

For each guidance and method of the medium study: the wall time per evaluation of a cell of the
medium settings (after a warm-up of a tenth of the budget), and the same cell with the ideal
denoiser's posterior mean over every reference (no pruning of negligible weights) and, for K > 1,
with the other view-batching choice. Also the time of one metric pass (50 views, IoU grid). These
are the numbers the study's settings were sized from (docs/testbed.md).

With ``--setting full``: each method and guidance of the full setting, timed over ``--budget``
evaluations of its 2,000-evaluation cell (the start of the run: the schedules are the cell's) in
``--workers`` processes at once (sharing the device as the study's workers do), and from that the
cost of a whole cell (2,000 evaluations and its metric passes), of a block (one scene and seed:
every method and guidance, its initial field; the first seed's blocks also run the variance
meter), and how many blocks ``mvsdi testbed --full`` runs in its time limit with that many workers.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import os
import platform
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see mvsdi.cli)

import torch  # noqa: E402

from mvsdi.distill import Distiller, Model  # noqa: E402
from mvsdi.testbed import prior as prior_module  # noqa: E402
from mvsdi.testbed.cells import measure, study_blocks  # noqa: E402
from mvsdi.testbed.prior import IdealDenoiserPrior  # noqa: E402
from mvsdi.testbed.settings import FULL, MEDIUM, cell_config, output_reserve_seconds  # noqa: E402


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


def full_setting_costs(device_name: str, budget: int, references: dict | None = None) -> dict:
    """Per (guidance, method) of the full setting: seconds per evaluation over ``budget`` evaluations
    of its cell; and one metric pass. In a worker process, ``references`` rebuild the parent's prior."""
    device = torch.device(device_name)
    settings = dataclasses.replace(FULL, device=device_name)
    if device.type == "cpu":
        torch.set_num_threads(1)  # as the study's workers
    prior = (IdealDenoiserPrior.from_images(references, device) if references is not None else
             IdealDenoiserPrior(n_references=settings.references, image_size=settings.image_size, device=device))
    costs = {}
    for guidance in settings.guidances:
        for method in settings.method_list:
            config = cell_config(settings, guidance, method, "mug", 0)
            costs[guidance, method.name], distiller = per_evaluation(prior, config, device, budget)
    started = time.perf_counter()
    measure(distiller, prior, config, 1.0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"evaluation": costs, "metric_pass": time.perf_counter() - started}


def full_setting(args) -> int:
    """The full setting's cell and block costs, and the blocks its time limit affords with ``--workers``."""
    settings = dataclasses.replace(FULL, device=args.device)
    started = time.perf_counter()
    prior = IdealDenoiserPrior(n_references=settings.references, image_size=settings.image_size,
                               device=torch.device(args.device))
    prior_seconds = time.perf_counter() - started
    print(f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {args.device}, "
          f"{args.workers} worker(s) at once, torch {torch.__version__}; full setting (budget {settings.budget}, "
          f"{settings.image_size}², {settings.samples_per_ray} samples per ray), mug, seed 0, the first "
          f"{args.budget} evaluations of each cell timed; prior built in {prior_seconds:.1f} s\n")
    if args.workers == 1:
        found = [full_setting_costs(args.device, args.budget)]
    else:
        references = {n: prior.references(n).cpu() for n in prior.scene_names}
        context = multiprocessing.get_context("fork" if args.device == "cpu" else "spawn")
        with context.Pool(args.workers) as pool:
            found = pool.starmap(full_setting_costs, [(args.device, args.budget, references)] * args.workers)
    metric_pass = sum(f["metric_pass"] for f in found) / len(found)
    print("| guidance | method | ms / evaluation | seconds per cell (evaluations + metric passes) |")
    print("|---|---|---|---|")
    cells = {}
    for key in found[0]["evaluation"]:
        per = sum(f["evaluation"][key] for f in found) / len(found)
        cells[key] = per * settings.budget + metric_pass * len(settings.fractions)
        print(f"| {key[0]} | {key[1]} | {1000 * per:.1f} | {cells[key]:.0f} |")
    # the variance meter along the first seed's K1 runs: 15 R evaluations per point, at about K1's cost
    meter = (len(settings.variance_fractions) * settings.variance_repeats
             * sum(m.views for m in settings.method_list if m.aggregation == "mean"))
    extra = sum(found[0]["evaluation"][g, "K1"] * meter for g in settings.guidances)
    block = sum(cells.values()) + metric_pass  # and the initial field's metric pass
    print(f"\none metric pass: {metric_pass:.1f} s; a block: {block:.0f} s of cells ({block / 60:.1f} min), "
          f"{block + extra:.0f} s with the variance meter (first seed)")
    limit = 60.0 * settings.time_limit_minutes - output_reserve_seconds(settings) - prior_seconds
    spent, fitting = 0.0, 0
    longest = max(cells.values()) + max(extra / len(settings.guidances), 0.0)
    for _, seed in study_blocks(settings):
        cost = block + (extra if seed == settings.seeds[0] else 0.0)
        # the list-schedule bound the study's deadline uses (cells.Deadline)
        if spent + cost / args.workers + (1 - 1 / args.workers) * longest > limit:
            break
        spent, fitting = spent + cost / args.workers, fitting + 1
    total = len(settings.scenes) * len(settings.seeds)
    print(f"blocks in {settings.time_limit_minutes:g} min with {args.workers} worker(s), if {args.workers} cells at "
          f"once each cost what they cost here: {fitting} of {total} ({limit:.0f} s for cells after the prior and "
          f"the {output_reserve_seconds(settings):.0f} s output reserve); all {total} need about "
          f"{math.ceil((total * block + len(settings.scenes) * extra) / args.workers / 60)} min")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=120, help="evaluations timed per cell (a multiple of 4)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--setting", choices=("medium", "full"), default="medium",
                        help="medium: the cost table below; full: per-cell and per-block costs of the full setting")
    parser.add_argument("--workers", type=int, default=1, help="--setting full: cells timed at once, each in a process")
    args = parser.parse_args()
    if args.setting == "full":
        return full_setting(args)
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
