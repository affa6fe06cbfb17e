"""What the testbed's field can reach at a study's size, and whether the truth is a fixed point of
distillation (issue 15: why the reconstructions stay soft).

For one scene and one study setting it measures, with the study's own metrics (``testbed.cells.measure``):

1. the initial blob;
2. the **ceiling**: the study's field fitted directly to the scene's reference images at their own
   cameras (L2, Adam, one random reference per step, the study's render size and samples per ray).
   No distillation can give the field more of the truth than this fit does, so a metric that the
   fit cannot raise is bounded by the field, the renderer or the metric, not by the method;
3. the **fixed point**: distillation (SDS or SDI, K=1) started from that fit, measured along the
   run. If the truth were a fixed point of the distillation, the metrics would stay at the ceiling;
4. the same distillation from the blob, the study's cell.

With ``--nearest``, each field's renders from 64 training cameras (and the truth's) are also noised to
t = 0.05·T and 0.2·T and given to the exact denoiser: which reference carries the posterior's weight,
how far its camera's azimuth lies from the render's, and in which quarter of azimuths the dominant
references sit. A field whose views each snap to a reference seen from somewhere else is a fixed
point the view-agnostic prior cannot tell from the truth (docs/testbed.md).

    python benchmarks/testbed_ceiling.py --scene mug --setting small --budget 400
    python benchmarks/testbed_ceiling.py --scene mug --setting small --samples-per-ray 64
    python benchmarks/testbed_ceiling.py --budget 200 --start fit --set guidance.t_max=0.2
    python benchmarks/testbed_ceiling.py --start blob --nearest --set guidance.t_max_end=0.1

``--set PATH=VALUE`` changes the distillation's config as ``mvsdi generate --set`` does.

Prints a markdown table and writes it with the raw rows as JSON to --out, with ``views.png``: four
evaluation views (front, left, back, right) a row: the truth, then the blob, the fit and each distillation's
end in the table's order, so whether a field is recognisable can be seen, not only scored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import imageio.v3 as iio
import torch

from mvsdi.cameras import sample_views, wrap_azimuth
from mvsdi.config import apply_settings
from mvsdi.distill import Distiller, Model, train
from mvsdi.images import to_uint8
from mvsdi.overrides import parse_assignment
from mvsdi.render import render
from mvsdi.schedules import step_reaching
from mvsdi.testbed.cells import measure
from mvsdi.testbed.metrics import occupancy_overlap, render_views
from mvsdi.testbed.prior import TESTBED_CAMERAS, IdealDenoiserPrior, reference_cameras
from mvsdi.testbed.scenes import ConstantBackground, SceneField, get_scene
from mvsdi.testbed.settings import METHODS_BY_NAME, SETTINGS, cell_config

METRICS = ("iou", "psnr", "r_precision", "janus", "mean_opacity")
# where the IoU's misses are: the share of the field's occupied voxels inside the truth (low: it
# overfills) and of the truth's inside the field (low: it underfills), at the IoU's rotation
OVERLAP = ("field_in_truth", "truth_in_field")
NEAREST_T = (0.05, 0.2)  # fractions of T where the dominant reference is looked up
QUARTERS = ("front", "left", "back", "right")  # azimuths within 45° of 0, 90, 180, −90 (the scene's +x is its front)


def fit_to_references(model: Model, prior: IdealDenoiserPrior, scene: str, samples_per_ray: int, steps: int,
                      lr: float = 0.01, seed: int = 1) -> None:
    """Fit ``model``'s field to the scene's references at their cameras (L2 on the albedo renders)."""
    images = prior.references(scene)
    cameras = reference_cameras(len(images))  # the prior's references were rendered from these
    optimiser = torch.optim.Adam(model.field.parameters(), lr=lr, betas=(0.9, 0.99), eps=1e-15)
    generator = torch.Generator().manual_seed(seed)
    size = prior.image_size
    for _ in range(steps):
        i = int(torch.randint(0, len(images), (1,), generator=generator))
        out = render(model.field, ConstantBackground(), cameras[i:i + 1], size, size, n_samples=samples_per_ray,
                     shading="albedo", perturb=True, generator=generator, need_normals=False)
        loss = (out.rgb.permute(0, 3, 1, 2) - images[i:i + 1]).square().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()


def quarter(azimuth_deg: torch.Tensor) -> torch.Tensor:
    """0..3: the quarter of ``QUARTERS`` each azimuth lies in."""
    return torch.remainder(torch.round(wrap_azimuth(azimuth_deg) / 90.0), 4).long()


@torch.no_grad()
def nearest_references(field: torch.nn.Module, prior: IdealDenoiserPrior, scene: str, label: str,
                       views: int = 64, seed: int = 123) -> list[dict]:
    """Where the exact denoiser sends ``field``'s renders: per t of ``NEAREST_T``, the median weight of
    the dominant reference, the median azimuth gap between each render's camera and its dominant
    reference's, and the share of dominant references (and of the cameras) in each azimuth quarter."""
    cameras = sample_views("random", views, torch.Generator().manual_seed(seed), TESTBED_CAMERAS.unperturbed())
    size = prior.image_size
    out = render(field, ConstantBackground(), cameras, size, size, n_samples=64, shading="albedo", need_normals=False)
    x = prior.encode_images(out.rgb.permute(0, 3, 1, 2))
    references = reference_cameras(len(prior.references(scene)))
    first = int((prior.union_references()[1] < prior.scene_names.index(scene)).sum())  # the scene's first column
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for fraction in NEAREST_T:
        t = torch.full((views,), int(fraction * prior.num_train_timesteps))
        alpha = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = alpha.sqrt() * x + (1.0 - alpha).sqrt() * torch.randn(x.shape, generator=generator)
        weights = prior.posterior_weights(noisy, t, prior.embed_texts([scene] * views))
        top_weight, top = weights.max(1)
        azimuth = references.azimuth_deg[top - first]
        gap = wrap_azimuth(azimuth - cameras.azimuth_deg).abs()
        row = {"field": label, "t": fraction, "top_weight": float(top_weight.median()),
               "azimuth_gap": float(gap.median())}
        row |= {f"refs_{q}": float((quarter(azimuth) == i).float().mean()) for i, q in enumerate(QUARTERS)}
        row |= {f"views_{q}": float((quarter(cameras.azimuth_deg) == i).float().mean()) for i, q in enumerate(QUARTERS)}
        print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        rows.append(row)
    return rows


def nearest_markdown(rows: list[dict]) -> str:
    quarters = " / ".join(QUARTERS)
    lines = [f"| field | t / T | dominant weight (median) | azimuth gap to it (median) "
             f"| dominant references {quarters} | cameras {quarters} |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['field']} | {r['t']:.2f} | {r['top_weight']:.2f} | {r['azimuth_gap']:.0f}° | "
              + " / ".join(f"{r['refs_' + q]:.2f}" for q in QUARTERS) + " | "
              + " / ".join(f"{r['views_' + q]:.2f}" for q in QUARTERS) + " |" for r in rows]
    return "\n".join(lines)


VIEWS_PNG_SCALE = 4  # pixels per render pixel in views.png


@torch.no_grad()
def view_strip(field: torch.nn.Module, size: int) -> torch.Tensor:
    """[3, size, 4·size]: the field's evaluation views at azimuths 0, 90, 180, 270 side by side."""
    rgb, _ = render_views(field, ConstantBackground(), 4, size)
    return torch.cat(list(rgb.clamp(0.0, 1.0)), dim=-1)


def write_views(strips: list[torch.Tensor], path: Path) -> None:
    image = to_uint8(torch.cat(strips, dim=-2).permute(1, 2, 0))
    iio.imwrite(path, image.repeat(VIEWS_PNG_SCALE, 0).repeat(VIEWS_PNG_SCALE, 1))


def distil(distiller: Distiller, prior: IdealDenoiserPrior, fractions: tuple[float, ...], label: str) -> list[dict]:
    rows = []
    for fraction in fractions:
        train(distiller, until_step=step_reaching(fraction, distiller.config.views,
                                                        distiller.config.budget))
        rows.append(_row(label, distiller, prior, fraction))
    return rows


def _row(label: str, distiller: Distiller, prior: IdealDenoiserPrior, fraction: float) -> dict:
    metrics, _ = measure(distiller, prior, distiller.config, fraction)
    both, field_only, truth_only = occupancy_overlap(distiller.model.field, distiller.config.prompt,
                                                     metrics["rotation_deg"])
    row = {"field": label, "fraction": fraction, **{m: metrics[m] for m in METRICS},
           "field_in_truth": both / max(both + field_only, 1), "truth_in_field": both / max(both + truth_only, 1)}
    print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| field | budget fraction | 3D IoU | aligned PSNR | R-precision | Janus | mean opacity "
             "| field's voxels in the truth | truth's voxels in the field |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['field']} | {r['fraction']:.2f} | " + " | ".join(f"{r[m]:.3f}" for m in METRICS + OVERLAP)
              + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scene", default="mug")
    p.add_argument("--setting", default="small", choices=list(SETTINGS))
    p.add_argument("--guidance", default="sds", choices=("sds", "sdi"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=int, default=400, help="guidance evaluations of each distillation")
    p.add_argument("--samples-per-ray", type=int, help="default: the setting's")
    p.add_argument("--image-size", type=int, help="renders and references, pixels a side (default: the setting's)")
    p.add_argument("--fit-steps", type=int, default=500)
    p.add_argument("--fractions", default="0.25,0.5,1", help="where the distillations are measured")
    p.add_argument("--start", choices=("both", "fit", "blob", "none"), default="both",
                   help="which distillations to run (none: the blob and the fit only; blob: no fit)")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", dest="settings",
                   help="change the distillation's config by a dotted path (repeatable)")
    p.add_argument("--nearest", action="store_true",
                   help="also report where the exact denoiser sends each field's noised renders (see above)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("/tmp/testbed_ceiling"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = SETTINGS[args.setting]
    if args.samples_per_ray:
        settings = dataclasses.replace(settings, samples_per_ray=args.samples_per_ray)
    if args.image_size:
        settings = dataclasses.replace(settings, image_size=args.image_size)
    fractions = tuple(float(f) for f in args.fractions.split(","))
    device = torch.device("cpu")
    started = time.perf_counter()
    prior = IdealDenoiserPrior(n_references=settings.references, image_size=settings.image_size, device=device)
    config = cell_config(settings, args.guidance, METHODS_BY_NAME["K1"], args.scene, args.seed, args.budget)
    config = apply_settings(config, dict(parse_assignment(text) for text in args.settings))

    nearest, strips = [], []  # per field: where its views snap (--nearest), and its four views

    def record_field(field: torch.nn.Module, label: str) -> None:
        strips.append(view_strip(field, settings.image_size))
        if args.nearest:
            nearest.extend(nearest_references(field, prior, args.scene, label))

    record_field(SceneField(get_scene(args.scene)), "truth")
    from_blob = Distiller(config, prior, Model.create(config, device), device)
    rows = [_row("initial blob", from_blob, prior, 0.0)]
    record_field(from_blob.model.field, "initial blob")
    if args.start != "blob":  # the fit: the ceiling, and where "fit" starts
        fitted = Model.create(config, device)
        fit_to_references(fitted, prior, args.scene, settings.samples_per_ray, args.fit_steps)
        from_fit = Distiller(config, prior, fitted, device)
        rows.append(_row(f"direct fit, {args.fit_steps} steps (ceiling)", from_fit, prior, 0.0))
        record_field(fitted.field, rows[-1]["field"])
    changed = "".join(f", {text}" for text in args.settings)
    if args.start in ("both", "fit"):
        rows += distil(from_fit, prior, fractions, f"{args.guidance.upper()} K1 from the fit{changed}")
        record_field(from_fit.model.field, rows[-1]["field"])
    if args.start in ("both", "blob"):
        rows += distil(from_blob, prior, fractions, f"{args.guidance.upper()} K1 from the blob{changed}")
        record_field(from_blob.model.field, rows[-1]["field"])

    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows) + (f"\n\nWhere the exact denoiser sends each field's renders:\n\n{nearest_markdown(nearest)}"
                              if nearest else "")
    head = (f"scene {args.scene}, setting {args.setting} ({settings.image_size}², {settings.samples_per_ray} samples "
            f"per ray, {settings.references} references), seed {args.seed}, budget {args.budget}; "
            f"{time.perf_counter() - started:.0f} s")
    (args.out / "ceiling.md").write_text(f"{head}\n\n{table}\n")
    write_views(strips, args.out / "views.png")
    (args.out / "ceiling.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "rows": rows, "nearest": nearest}, indent=1))
    print(f"\n{head}\n\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
