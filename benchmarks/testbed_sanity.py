"""Do the testbed's metrics measure what they say? Candidates of known order, for every scene.

    python benchmarks/testbed_sanity.py --out docs/testbed_sanity_tables.md
    python benchmarks/testbed_sanity.py --scenes mug lamp --speed     # two scenes, and the render speed-up

For each scene the study's metrics (``evaluate_field``: view R-precision, aligned PSNR, 3D IoU, Janus
score, on the study's evaluation views) are taken of five fields (``metrics.sanity_candidates``): the
truth (``SceneField``), its Janus twin (``scenes.janus_twin``: back replaced by front), the truth
blurred (``scenes.blurred_scene``), the initial field of the study's cells (``Model.create`` of
``cell_config``: the blob every run starts from) and the next scene in the registry. The image size,
the number of references, the samples per ray and the field come from the study's settings
(``--settings small`` is ``make demo``'s), never from constants here. Every rule of
``metrics.SANITY_RULES`` is checked with its margin; the script exits 1 if one fails.

``--speed`` trains one cell of those settings (SDS, K1, the first scene, seed 0, its whole budget) and
times its metrics (``render_views`` + ``evaluate_renders``) with the dense renderer at the training
sample count (the metrics before this change) and with empty-space skipping, warm, median of
``--repeats``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see mvsdi.cli)

import torch  # noqa: E402

from mvsdi.distill import Distiller, Model  # noqa: E402
from mvsdi.render import DENSE  # noqa: E402
from mvsdi.testbed import metrics as M  # noqa: E402
from mvsdi.testbed.prior import IdealDenoiserPrior  # noqa: E402
from mvsdi.testbed.scenes import BLUR_SIGMA, SCENES, ConstantBackground  # noqa: E402
from mvsdi.testbed.settings import FULL, METHODS, SMALL, StudySettings, cell_config  # noqa: E402

SETTINGS = {"small": SMALL, "full": FULL, "default": StudySettings(scenes=("mug",), seeds=(0,))}
COLUMNS = (("r_precision", "R-precision", "{:.2f}"), ("psnr", "PSNR (dB)", "{:.2f}"), ("iou", "IoU", "{:.3f}"),
           ("janus", "Janus", "{:.2f}"))


def measure_scene(name: str, others: list[str], settings: StudySettings, seed: int, blur_sigma: float,
                  device: torch.device) -> dict[str, dict]:
    config = cell_config(settings, settings.guidances[0], METHODS[0], name, seed)
    blob = Model.create(config, device).field  # what every cell of this scene and seed starts from
    other = others[(others.index(name) + 1) % len(others)]
    rows = {}
    for candidate, field in M.sanity_candidates(name, blob, other, blur_sigma).items():
        rows[candidate] = M.evaluate_field(field.to(device), None, name, others, n_views=config.eval_views,
                                           size=settings.image_size, n_samples=config.samples_per_ray)
        rows[candidate]["field"] = other if candidate == "other" else candidate
    return rows


def scene_table(name: str, rows: dict[str, dict]) -> str:
    lines = [f"**{name}**", "", "| candidate | " + " | ".join(c[1] for c in COLUMNS) + " | rotation (°) |",
             "|---|" + "---|" * (len(COLUMNS) + 1)]
    for candidate, row in rows.items():
        label = f"other ({row['field']})" if candidate == "other" else candidate
        cells = [fmt.format(row[key]) for key, _, fmt in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {row['rotation_deg']:.1f} |")
    return "\n".join(lines) + "\n"


def checks_table(results: dict[str, dict[str, dict]]) -> tuple[str, int]:
    """Slack of every rule on every scene (>= 0: holds), and the number of failures."""
    names = list(results)
    checks = {name: M.sanity_checks(rows) for name, rows in results.items()}
    lines = ["| metric | rule | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    failures = 0
    for i, rule in enumerate(M.SANITY_RULES):
        cells = []
        for name in names:
            slack = checks[name][i][1]
            failures += slack < 0
            cells.append(f"{slack:+.2f}" + ("" if slack >= 0 else " **FAIL**"))
        lines.append(f"| {rule.metric} | {rule.text} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", failures


def speed(settings: StudySettings, prior, scene: str, seed: int, repeats: int, device: torch.device) -> str:
    """Time one trained cell's metrics: dense at the training sample count vs empty-space skipping.

    The variants take turns within each repeat, so a change of load on a shared machine hits them alike."""
    config = cell_config(settings, "sds", METHODS[0], scene, seed)
    distiller = Distiller(config, prior, Model.create(config, device), device)
    started = time.perf_counter()
    while distiller.counters.guidance_evaluations < config.budget:
        distiller.step()
    trained = time.perf_counter() - started
    field, sky, n, size, spr = distiller.model.field, ConstantBackground(), config.eval_views, prior.image_size, \
        config.samples_per_ray
    floor = max(spr, M.MIN_EVALUATION_SAMPLES)
    variants = [("dense, training samples (before)", DENSE, 0), ("skipping, training samples", M.EVALUATION_RENDER, 0),
                (f"dense, {floor} samples", DENSE, M.MIN_EVALUATION_SAMPLES),
                (f"skipping, {floor} samples (now)", M.EVALUATION_RENDER, M.MIN_EVALUATION_SAMPLES)]

    def views(render_config, minimum, stats=None):
        return M.render_views(field, sky, n, size, spr, config=render_config, min_samples=minimum, stats=stats)

    timing: dict[str, dict[str, list[float]]] = {label: {} for label, _, _ in variants}
    out = {}
    for repeat in range(repeats + 1):  # the first round warms up (one-off costs of a process) and is not kept
        for label, render_config, minimum in variants:
            stats: dict = {}
            wall, cpu = time.perf_counter(), time.process_time()
            renders, opacity = views(render_config, minimum, stats)
            rendered_wall, rendered_cpu = time.perf_counter(), time.process_time()
            row = M.evaluate_renders(renders, opacity, field, scene, prior)
            done_wall, done_cpu = time.perf_counter(), time.process_time()
            if repeat:
                for key, value in (("render_wall", rendered_wall - wall), ("render_cpu", rendered_cpu - cpu),
                                   ("all_wall", done_wall - wall), ("all_cpu", done_cpu - cpu)):
                    timing[label].setdefault(key, []).append(value)
            out[label] = (renders, row, stats)
    lines = [f"One trained cell: SDS K1 on {scene}, seed {seed}, budget {config.budget} ({trained:.0f} s of training); "
             f"{n} views at {size}², training samples per ray {spr}; median of {repeats} warm runs, the variants in "
             f"turn; CPU = process time (all threads).", "",
             "| metric renders | field evaluations per ray (colour + density pass) | render_views wall / CPU (s) | "
             "whole metrics wall / CPU (s) | R-precision | PSNR | IoU | Janus | max \\|Δpixel\\| vs dense |",
             "|---|---|---|---|---|---|---|---|---|"]
    dense = {minimum: out[label][0] for label, rc, minimum in variants if rc is DENSE}
    med = {label: {k: statistics.median(v) for k, v in t.items()} for label, t in timing.items()}
    for label, _render_config, minimum in variants:
        renders, row, stats = out[label]
        delta = (renders - dense[minimum]).abs().max().item()
        t = med[label]
        lines.append(f"| {label} | {stats['samples_per_ray']:.2f} + {stats['density_samples_per_ray']:.2f} | "
                     f"{t['render_wall']:.2f} / {t['render_cpu']:.2f} | {t['all_wall']:.2f} / {t['all_cpu']:.2f} | "
                     f"{row['r_precision']:.2f} | {row['psnr']:.3f} | {row['iou']:.3f} | {row['janus']:.2f} | "
                     f"{delta:.1e} |")
    before, now = med[variants[0][0]], med[variants[-1][0]]
    lines += ["", f"Whole metrics of the cell, before → now: {before['all_wall']:.2f} → {now['all_wall']:.2f} s wall "
              f"({before['all_wall'] / now['all_wall']:.1f}×), {before['all_cpu']:.2f} → {now['all_cpu']:.2f} s CPU "
              f"({before['all_cpu'] / now['all_cpu']:.1f}×); "
              f"the renders alone {before['render_wall'] / now['render_wall']:.1f}× "
              f"(wall), at {spr} samples per ray {before['render_wall'] / med[variants[1][0]]['render_wall']:.1f}×."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", choices=sorted(SETTINGS), default="small", help="the study's settings to use")
    parser.add_argument("--scenes", nargs="+", default=None, help="default: every registered scene")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial field")
    parser.add_argument("--blur-sigma", type=float, default=BLUR_SIGMA)
    parser.add_argument("--speed", action="store_true", help="also time one trained cell's metrics")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown here too")
    args = parser.parse_args(argv)
    settings, device = SETTINGS[args.settings], torch.device(args.device)
    names = args.scenes or list(SCENES)
    started = time.perf_counter()
    # The metrics' candidate objects are the scenes the study's prior covers, every registered scene; no metric
    # reads the prior's reference images, so the prior itself is built only to train the --speed cell.
    known = list(SCENES)
    config = cell_config(settings, settings.guidances[0], METHODS[0], names[0], args.seed)
    command_args = argv if argv is not None else sys.argv[1:]
    head = [f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {platform.platform()}, {platform.processor() or '?'}, "
            f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, device {device}.",
            f"Command: `python {' '.join(shlex.quote(a) for a in [sys.argv[0], *command_args])}`.",
            f"Settings `{args.settings}`: {config.eval_views} evaluation views at {settings.image_size}², candidate "
            f"objects of R-precision: the {len(known)} registered scenes (the study's prior has {settings.references} "
            f"references of each; no metric reads them), training samples per "
            f"ray {config.samples_per_ray} (metric renders: at least {M.MIN_EVALUATION_SAMPLES}, with empty-space "
            f"skipping), IoU on 64³, blur sigma {args.blur_sigma:g}, initial field of seed {args.seed}.", ""]
    results, parts = {}, []
    for name in names:
        results[name] = measure_scene(name, known, settings, args.seed, args.blur_sigma, device)
        parts.append(scene_table(name, results[name]))
        print(parts[-1], flush=True)
    checks, failures = checks_table(results)
    text = "\n".join(head) + "\n" + "\n".join(parts) \
        + "\nSlack of each rule (achieved minus required; ≥ 0 holds):\n\n" \
        + checks + f"\n{failures} of {len(M.SANITY_RULES) * len(names)} checks fail " \
        f"({time.perf_counter() - started:.0f} s).\n"
    if args.speed:
        prior = IdealDenoiserPrior(n_references=settings.references, image_size=settings.image_size, device=device)
        text += "\n" + speed(settings, prior, names[0], args.seed, args.repeats, device)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
