"""Speed and peak memory of `mvsdi generate` at K=1 and K=4, random weights of the real SD-2.1-base shapes.

    python benchmarks/generate_k.py --budget 40 --resolution 512 --out bench-out

Runs the real CLI path (config → prior loading through from_pretrained → K-view loop → evaluation
renders) with `--model random-sd21` (no download) for each K, then prints one line per run from
its summary.json: guidance evaluations/s, UNet calls, peak GPU memory and the projected wall time
of a 10,000-evaluation run. Training time excludes prior loading and the evaluation renders.

``generate_command`` and ``summary_row`` are also used by ``benchmarks/gpu_record.py``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

PROMPT = "a ripe strawberry"


def generate_command(views: int, out: Path, *, preset: str = "sdi", budget: int = 40, resolution: int = 512,
                     samples_per_ray: int = 64, model: str = "random-sd21", device: str = "cuda",
                     eval_views: int = 2, eval_resolution: int = 64, tensorboard: bool = True) -> list[str]:
    """The `mvsdi generate` command line of one K (antipodal pairs for even K, as the MV-SDI presets)."""
    cmd = [sys.executable, "-m", "mvsdi.cli", "generate", PROMPT, "--preset", preset, "--views", str(views),
           "--sampler", "antipodal" if views % 2 == 0 else "random", "--budget", str(budget), "--model", model,
           "--resolution", str(resolution), "--samples-per-ray", str(samples_per_ray),
           "--eval-views", str(eval_views), "--eval-resolution", str(eval_resolution), "--device", device,
           "--out", str(out), "--overwrite", "--no-progress"]
    return cmd if tensorboard else [*cmd, "--no-tensorboard"]


def summary_row(out: Path) -> dict[str, Any]:
    """The speed and memory figures of a finished run, from its summary.json."""
    s = json.loads((Path(out) / "summary.json").read_text())
    ms = 1000 * s["train_seconds"] / s["guidance_evaluations"]
    return {
        "views": s["views_per_step"], "run_status": s["status"], "guidance_evaluations": s["guidance_evaluations"],
        "train_seconds": s["train_seconds"], "evaluation_seconds": s.get("evaluation_seconds"),
        "ms_per_evaluation": ms, "unet_calls": s["unet_calls"], "unet_images": s.get("unet_images"),
        "peak_gpu_memory_gib": s.get("peak_gpu_memory_gib"),
        "peak_process_memory_gib": s.get("peak_process_memory_gib"),
        "projected_10k_minutes": ms * 10_000 / 1000 / 60, "device_name": s["device_name"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=int, default=40, help="guidance evaluations per run (multiple of 4)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--samples-per-ray", type=int, default=64)
    p.add_argument("--preset", default="sdi", help="guidance preset; --views overrides K")
    p.add_argument("--views", type=int, nargs="+", default=[1, 4])
    p.add_argument("--model", default="random-sd21")
    p.add_argument("--device", default="cuda")
    p.add_argument("--eval-resolution", type=int, default=64)
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    args = p.parse_args()
    rows = []
    for views in args.views:
        out = args.out / f"views{views}"
        cmd = generate_command(views, out, preset=args.preset, budget=args.budget, resolution=args.resolution,
                               samples_per_ray=args.samples_per_ray, model=args.model, device=args.device,
                               eval_resolution=args.eval_resolution, tensorboard=not args.no_tensorboard)
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        rows.append(summary_row(out))
    print("\n| K | ms / guidance evaluation | UNet calls | peak memory (GiB) | projected 10k run (min) | device |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        memory = r["peak_gpu_memory_gib"] if r["peak_gpu_memory_gib"] is not None else r["peak_process_memory_gib"]
        print(f"| {r['views']} | {r['ms_per_evaluation']:.1f} | {r['unet_calls']} | {memory:.2f} | "
              f"{r['projected_10k_minutes']:.1f} | {r['device_name']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
