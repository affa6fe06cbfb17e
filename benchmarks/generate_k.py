"""Speed and peak memory of `mvsdi generate` at K=1 and K=4, random weights of the real SD-2.1-base shapes.

    python benchmarks/generate_k.py --budget 40 --resolution 512 --out bench-out

Runs the real CLI path (config → prior loading through from_pretrained → K-view loop → evaluation
renders) with `--model random-sd21` (no download) for each K, then prints one line per run from
its summary.json: guidance evaluations/s, UNet calls, peak GPU memory and the projected wall time
of a 10,000-evaluation run. Training time excludes prior loading and the evaluation renders.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=int, default=40, help="guidance evaluations per run (multiple of 4)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--samples-per-ray", type=int, default=64)
    p.add_argument("--preset", default="sdi", help="guidance preset; --views overrides K")
    p.add_argument("--views", type=int, nargs="+", default=[1, 4])
    p.add_argument("--model", default="random-sd21")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    args = p.parse_args()
    rows = []
    for k in args.views:
        out = args.out / f"k{k}"
        cmd = [sys.executable, "-m", "mvsdi.cli", "generate", "a ripe strawberry", "--preset", args.preset,
               "--views", str(k), "--sampler", "antipodal" if k % 2 == 0 else "random", "--budget", str(args.budget),
               "--model", args.model, "--resolution", str(args.resolution), "--samples-per-ray",
               str(args.samples_per_ray), "--eval-views", "2", "--eval-resolution", "64", "--device", args.device,
               "--out", str(out), "--overwrite", "--no-progress"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        s = json.loads((out / "summary.json").read_text())
        ms = 1000 * s["train_seconds"] / s["guidance_evaluations"]
        memory = s.get("peak_gpu_memory_gib", s.get("peak_process_memory_gib"))
        rows.append((k, ms, s["unet_calls"], memory, ms * 10_000 / 1000 / 60, s["device_name"]))
    print("\n| K | ms / guidance evaluation | UNet calls | peak memory (GiB) | projected 10k run (min) | device |")
    print("|---|---|---|---|---|---|")
    for k, ms, calls, mem, minutes, dev in rows:
        print(f"| {k} | {ms:.1f} | {calls} | {mem:.2f} | {minutes:.1f} | {dev} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
