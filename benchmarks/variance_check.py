"""Gradient variance per guidance evaluation of K=2 (random, antipodal) relative to K=1, on the testbed.

    python benchmarks/variance_check.py --repeats 32 --seeds 0 1 --scene mug

At fixed initial parameters (the Magic3D blob), R independent K-view gradients per setting, with
the small testbed settings (32², ideal denoiser over 64 references per scene, fraction 0.5 of the
budget). For i.i.d. views the ratio should be 1; see docs/testbed.md for what it was.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from mvsdi.distill import Model  # noqa: E402
from mvsdi.testbed.prior import IdealDenoiserPrior  # noqa: E402
from mvsdi.testbed.study import METHODS, SMALL, cell_config  # noqa: E402
from mvsdi.variance import compare_estimators  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--scene", default="mug")
    p.add_argument("--fraction", type=float, default=0.5)
    args = p.parse_args()
    cpu = torch.device("cpu")
    prior = IdealDenoiserPrior(n_references=SMALL.references, image_size=SMALL.image_size, device=cpu)
    print("| guidance | seed | K=2 random / K=1 | K=2 antipodal / K=1 |\n|---|---|---|---|")
    for guidance in ("sds", "sdi"):
        base = cell_config(SMALL, guidance, METHODS[0], args.scene, 0)
        state = Model.create(base, cpu).state_dict()
        for seed in args.seeds:
            rows = compare_estimators(base, prior, state, cpu, [(1, "random"), (2, "random"), (2, "antipodal")],
                                      args.fraction, args.repeats, seed=seed)
            print(f"| {guidance} | {seed} | {rows[1]['ratio']:.2f} | {rows[2]['ratio']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
