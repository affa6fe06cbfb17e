"""``mvsdi eval RUN [RUN...]``: the paper's metrics on run directories.

``add_parser(subparsers)`` adds the subcommand; ``run(args)`` executes it and returns the exit code
(0 done, 2 a bad input or a model that cannot be loaded, with the reason on stderr; 130 interrupted).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mvsdi.commands import run_command
from mvsdi.evaluate.clip_metrics import CLIP_B16, CLIP_B32, HPS_FILE, HPS_REPO, MetricLoadError
from mvsdi.evaluate.image_reward import BLIP_TOKENIZER, IMAGE_REWARD_FILE, IMAGE_REWARD_REPO, MED_CONFIG_FILE
from mvsdi.evaluate.protocol import PROTOCOLS, REFERENCE, get_protocol, protocol_candidates
from mvsdi.evaluate.reference_renders import availability_problem
from mvsdi.evaluate.run_folder import RunError, benchmark_prompts, read_prompt_file, read_run
from mvsdi.evaluate.runs import DEFAULT_METRICS, KNOWN_METRICS, Evaluator, evaluate_run, parse_metrics
from mvsdi.priors.loading import resolve_device


# `mvsdi eval --help`'s account of the command
DESCRIPTION = ("Compute CLIP score, CLIP R-Precision, CLIP-IQA, the Janus score, the divergence flag and, when "
               "asked for, HPSv2.1 and ImageReward v1.0 on the evaluation renders of each RUN, and write "
               "RUN/metrics.json (--protocol reference: the MV-SDI reference's 50 of 120 turntable views, "
               "rendered from the checkpoint if needed, into RUN/metrics_reference.json). "
               "See docs/evaluation.md.")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="compute evaluation metrics of run directories",
        description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories written by `mvsdi generate`")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                   help=f"comma-separated, from: {', '.join(KNOWN_METRICS)}")
    p.add_argument("--protocol", choices=tuple(PROTOCOLS), default="ours",
                   help="ours: the run's renders/ (metrics.json); reference: the MV-SDI reference's views and rules "
                        "(metrics_reference.json)")
    p.add_argument("--prompts", type=Path, help="R-Precision's candidate prompts, one per line (default: the "
                   "43 SDI benchmark prompts); --protocol ours adds the runs' own prompts, reference does not")
    p.add_argument("--clip-b32", default=CLIP_B32, metavar="ID_OR_PATH",
                   help="CLIP for CLIP score, R-Precision and Janus: hub id or local folder")
    p.add_argument("--clip-b16", default=CLIP_B16, metavar="ID_OR_PATH", help="CLIP for CLIP-IQA")
    p.add_argument("--hpsv2", metavar="CHECKPOINT",
                   help=f"HPSv2.1 checkpoint file (default: {HPS_FILE} of the {HPS_REPO} hub repo, from the cache)")
    p.add_argument("--hpsv2-tokenizer", default=CLIP_B32, metavar="ID_OR_PATH",
                   help="a CLIP tokenizer for HPSv2.1 (OpenAI's BPE, shared by OpenCLIP ViT-H/14)")
    p.add_argument("--image-reward", metavar="PATH",
                   help=f"ImageReward v1.0: a folder with {IMAGE_REWARD_FILE} and {MED_CONFIG_FILE}, or the .pt file "
                        f"with {MED_CONFIG_FILE} beside it (default: the {IMAGE_REWARD_REPO} hub repo, from the cache)")
    p.add_argument("--image-reward-tokenizer", default=BLIP_TOKENIZER, metavar="ID_OR_PATH",
                   help="the BERT tokenizer ImageReward's BLIP uses (BLIP's [DEC]/[ENC] tokens are added on load)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--force", action="store_true",
                   help="evaluate runs from another mvsdi minor version or without summary.json")
    return p


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def _line(result: dict[str, Any]) -> str:
    if result.get("missing"):
        return f"{result['run']}: missing (counted as diverged)"
    m = result["metrics"]
    parts = [f"{result['run']}: {result['prompt']!r}", f"views={result['views']}"]
    if result.get("protocol", "ours") != "ours":
        parts.append(f"protocol={result['protocol']}")
    for name in ("clip_score", "r_precision", "hpsv2", "image_reward"):
        if name in m:
            parts.append(f"{name}={_fmt(m[name]['mean'])}")
    if "clip_iqa" in m:
        parts.append("clip_iqa=" + "/".join(_fmt(m["clip_iqa"][k]["mean"]) for k in ("quality", "sharpness", "real")))
    if "janus" in m:
        parts.append(f"janus={_fmt(m['janus']['value'])}")
    div = result["divergence"]
    parts.append(f"DIVERGED ({div['reason']})" if div["diverged"] else "ok")
    return "  ".join(parts)


def _evaluator(args: argparse.Namespace) -> Evaluator:
    metrics = parse_metrics(args.metrics)
    protocol = get_protocol(args.protocol)
    prompt_list = read_prompt_file(args.prompts) if args.prompts else benchmark_prompts()
    # read every run first: a bad run fails before minutes of model loading
    runs = [run for run in (read_run(path, args.force) for path in args.runs) if run is not None]
    if protocol.name == REFERENCE.name:  # its views may have to be rendered: checked before models load
        _check_reference_views(runs)
    candidates = protocol_candidates(protocol, [r.prompt for r in runs], prompt_list)
    evaluator = Evaluator(metrics, candidates, clip_b32=args.clip_b32, clip_b16=args.clip_b16,
                          hpsv2_checkpoint=args.hpsv2, hpsv2_tokenizer=args.hpsv2_tokenizer,
                          image_reward=args.image_reward, image_reward_tokenizer=args.image_reward_tokenizer,
                          device=resolve_device(args.device), protocol=protocol.name)
    evaluator.check_available()
    return evaluator


def _check_reference_views(runs) -> None:
    """Every run must hold the reference views or a checkpoint to render them from."""
    problems = [problem for run in runs if (problem := availability_problem(run.path))]
    if problems:
        raise RunError("\n".join(problems))


def run(args: argparse.Namespace) -> int:
    def evaluate_all() -> int:
        evaluator = _evaluator(args)
        for path in args.runs:
            print(_line(evaluate_run(path, evaluator, force=args.force)), flush=True)
        return 0

    return run_command(evaluate_all, name="mvsdi eval", input_errors=(MetricLoadError,))
