"""``mvsdi bench``: presets × prompts × seeds → run directories, metrics, tables, plots and a gallery.

``add_parser(subparsers)`` adds the subcommand; ``run(args)`` executes it and returns the exit code
(0 done, 2 bad input or weights that cannot be loaded, 130 interrupted). See docs/benchmark.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from mvsdi.arguments import add_knob_options, knob_settings, parse_names, parse_seeds
from mvsdi.bench import executors
from mvsdi.bench.aggregate import CELLS_LOG, aggregate
from mvsdi.bench.cells import TESTBED_METRICS, EvalSettings, FatalBenchError, needs_measurement
from mvsdi.bench.convergence import write_convergence  # per-preset curves (docs/benchmark.md)
from mvsdi.bench.matrix import OVERRIDES, BenchSpec, cells, read_spec, redo_reason, write_spec
from mvsdi.commands import run_command
from mvsdi.config import RunConfig, is_ideal
from mvsdi.evaluate.clip_metrics import MetricLoadError
from mvsdi.evaluate.run_folder import benchmark_prompts, candidate_prompts, read_prompt_file
from mvsdi.evaluate.runs import DEFAULT_METRICS, Evaluator, parse_metrics
from mvsdi.overrides import parse_fields
from mvsdi.priors.loading import resolve_device
from mvsdi.priors.stable_diffusion import PriorLoadError
from mvsdi.testbed.scenes import SCENES

DEFAULT_PRESETS = "sdi,mvsdi-k2,mvsdi-k4"
# flag → (the Evaluator field it sets, metavar); unset flags keep the Evaluator's defaults
WEIGHT_FLAGS = {"--clip-b32": ("clip_b32", "ID_OR_PATH"), "--clip-b16": ("clip_b16", "ID_OR_PATH"),
                "--hpsv2": ("hpsv2_checkpoint", "CHECKPOINT"), "--hpsv2-tokenizer": ("hpsv2_tokenizer", "ID_OR_PATH"),
                "--image-reward": ("image_reward", "PATH"),
                "--image-reward-tokenizer": ("image_reward_tokenizer", "ID_OR_PATH")}


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="run and tabulate a benchmark: presets × prompts × seeds",
        description="Generate one run directory per (preset, prompt, seed) under OUT, measure each, and write "
                    "per-preset tables (markdown, CSV), paired differences against a baseline preset, plots and "
                    "an HTML gallery. Finished cells are skipped, so running the same command again resumes. "
                    "See docs/benchmark.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--presets", default=DEFAULT_PRESETS, help="comma-separated preset names (see `mvsdi generate -h`)")
    p.add_argument("--prompts", type=Path, metavar="FILE",
                   help="one prompt per line (None: the 43 SDI benchmark prompts); with --model ideal, scene names")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--baseline", help="preset the others are compared with, pairwise; None: the first preset")
    p.add_argument("--metrics", help="comma-separated; None: all of the prior's kind. Stable Diffusion: those of "
                   "`mvsdi eval`; --model ideal: psnr, iou, r_precision, janus")
    p.add_argument("--out", type=Path, default=Path("runs/bench"),
                   help="output directory (shared by all nodes with Ray)")
    p.add_argument("--retries", type=int, default=1,
                   help="extra attempts for a cell that fails, before it is recorded as failed")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: one worker per visible GPU (or the CPU); ray: one task per cell on a Ray cluster")
    p.add_argument("--address", default="auto", help="with --executor ray: HOST:PORT or ray://HOST:PORT of the "
                   "cluster's head, 'auto' (the cluster this node belongs to) or 'local' (a private one here)")
    p.add_argument("--aggregate-only", type=Path, metavar="OUT",
                   help="only rebuild the tables, plots and gallery of an earlier bench at OUT")
    p.add_argument("--protocol", choices=("ours", "reference"), default="ours",
                   help="tables from each cell's metrics.json (ours) or metrics_reference.json (the MV-SDI reference's "
                        "protocol: means over the prompts valid for every preset, in OUT/reference); the cells are "
                        "measured with ours, so first run `mvsdi eval --protocol reference` on them "
                        "(docs/evaluation.md)")
    common = p.add_argument_group("overrides applied to every cell (default: the preset's); see `mvsdi generate -h`")
    p.set_defaults(knobs=add_knob_options(common, RunConfig, paths=OVERRIDES))
    p.add_argument("--iou-resolution", type=int, default=64,
                   help="with --model ideal: the voxel grid of the 3D IoU against the true shape")
    weights = p.add_argument_group(
        "metric weights (Stable Diffusion priors): hub ids or local copies, as in `mvsdi eval`")
    for flag, (_, metavar) in WEIGHT_FLAGS.items():
        weights.add_argument(flag, metavar=metavar)
    return p


# ---------------------------------------------------------------------------------------------
# from arguments to a spec


def _metrics(text: str | None, ideal: bool) -> tuple[str, ...]:
    if not ideal:
        return parse_metrics(text) if text else DEFAULT_METRICS
    names = parse_names(text) if text else TESTBED_METRICS
    unknown = [n for n in names if n not in TESTBED_METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {unknown or [text]} for the testbed prior; "
                         f"known: {', '.join(TESTBED_METRICS)}")
    return names


def _check_scenes(prompts: tuple[str, ...]) -> None:
    unknown = [p for p in prompts if p not in SCENES]
    if unknown:
        raise ValueError(f"with --model ideal each prompt names a testbed scene; unknown: {unknown}. "
                         f"Scenes: {', '.join(SCENES)}")


def spec_from_args(args: argparse.Namespace) -> BenchSpec:
    prompts = tuple(read_prompt_file(args.prompts) if args.prompts else benchmark_prompts())
    overrides = parse_fields(RunConfig, knob_settings(args, args.knobs))
    spec = BenchSpec(presets=parse_names(args.presets), prompts=prompts, seeds=parse_seeds(args.seeds),
                     overrides=overrides, baseline=args.baseline or "", metrics=())
    ideal = is_ideal(spec.model)
    if ideal:
        _check_scenes(prompts)
    if args.retries < 0 or args.iou_resolution < 2:
        raise ValueError(f"--retries must be >= 0 and --iou-resolution >= 2, "
                         f"got {args.retries} and {args.iou_resolution}")
    return dataclasses.replace(spec, metrics=_metrics(args.metrics, ideal))


def eval_settings(spec: BenchSpec, args: argparse.Namespace) -> EvalSettings:
    # R-Precision retrieves each run's prompt among the bench's prompts (the 43 by default)
    weights = tuple((field, value) for flag, (field, _) in WEIGHT_FLAGS.items()
                    if (value := getattr(args, flag.lstrip("-").replace("-", "_"))) is not None)
    settings = EvalSettings(metrics=spec.metrics, candidates=tuple(candidate_prompts(spec.prompts, [])),
                            weights=weights, iou_resolution=args.iou_resolution)
    if not is_ideal(spec.model):
        Evaluator(spec.metrics, settings.candidates, **dict(weights)).check_available()  # now, not after a run
    return settings


# ---------------------------------------------------------------------------------------------
# running


class CellLog:
    """Appends each finished cell's record to OUT/cells.jsonl and prints one line about it."""

    def __init__(self, path: Path, total: int):
        self.path, self.total, self.count = path, total, 0

    def __call__(self, record: dict[str, Any]) -> None:
        self.count += 1
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        tries = f"{record['attempts']} attempt{'s' * (record['attempts'] != 1)}"
        detail = f": {record['error']}" if record["status"] == "failed" else f" in {record.get('seconds', 0):.1f} s"
        print(f"[{self.count}/{self.total}] {record['cell']}: {record['status']} ({tries}){detail}", flush=True)


def run_bench(spec: BenchSpec, settings: EvalSettings, out: Path, retries: int, executor: str = "local",
              address: str = "auto") -> dict[str, Any]:
    matrix = cells(spec, out)  # every config is built (and validated) before anything runs
    if executor == "ray":
        executors.connect_ray(address)  # an unreachable address fails before OUT is touched
    else:
        resolve_device(matrix[0].config.device)  # e.g. --device cuda without a GPU: say so once, not per cell
    write_spec(out, spec)
    todo = []
    for cell in matrix:
        reason = redo_reason(cell)
        if reason is not None and cell.path.exists():
            print(f"{cell.key}: {reason}; running it again", flush=True)
        if reason is not None or needs_measurement(cell, settings):
            todo.append(cell)
    print(f"{len(matrix)} cells, {len(matrix) - len(todo)} done, {len(todo)} to run", flush=True)
    log = CellLog(out / CELLS_LOG, len(todo))
    if executor == "ray":
        executors.run_ray(todo, settings, retries, log, address)
    else:
        executors.run_local(todo, settings, retries, log)
    return aggregate(spec, out)


def run(args: argparse.Namespace) -> int:
    def bench() -> int:
        if args.aggregate_only:
            out = args.aggregate_only
            result = aggregate(read_spec(out), out, protocol=args.protocol)
        else:
            out = args.out
            spec = spec_from_args(args)
            result = run_bench(spec, eval_settings(spec, args), out, args.retries, args.executor, args.address)
            if args.protocol == "reference":
                result = aggregate(spec, out, protocol="reference")
        write_convergence(out)
        print((out / ("reference" if args.protocol == "reference" else ".") / "summary.md").read_text())
        failed = sum(r["status"] == "failed" for r in result["rows"])
        print(f"bench written to {out}" + (f"; {failed} cell(s) failed, see {out}/cells.jsonl" if failed else ""))
        return 0

    return run_command(bench, input_errors=(FatalBenchError, MetricLoadError, PriorLoadError),
                       interrupted="interrupted; finished cells are kept: run the same command again to resume")
