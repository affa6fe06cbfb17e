"""Final metrics and wall time of a few cells of the small testbed study, one process.

    OMP_NUM_THREADS=1 python benchmarks/testbed_cells.py
    ATEN_CPU_CAPABILITY=avx2 OMP_NUM_THREADS=2 python benchmarks/testbed_cells.py

Run it under different thread counts or kernel sets (``ATEN_CPU_CAPABILITY``) and compare the
printed metrics: that is how docs/testbed.md measures what varies between machines.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see mvsdi.cli)

import torch  # noqa: E402

from mvsdi.testbed.cells import run_cell  # noqa: E402
from mvsdi.testbed.prior import IdealDenoiserPrior  # noqa: E402
from mvsdi.testbed.settings import METHODS, SMALL, cell_config  # noqa: E402

CELLS = (("sds", "K1"), ("sds", "K2-antipodal"), ("sdi", "K1"), ("sdi", "K2-antipodal"))


def main() -> int:
    cpu = torch.device("cpu")
    prior = IdealDenoiserPrior(n_references=SMALL.references, image_size=SMALL.image_size, device=cpu)
    methods = {m.name: m for m in METHODS}
    print(f"threads {torch.get_num_threads()}, kernels {torch.backends.cpu.get_cpu_capability()}, "
          f"torch {torch.__version__}")
    for guidance, name in CELLS:
        start = time.perf_counter()
        row = run_cell(prior, cell_config(SMALL, guidance, methods[name], "mug", 0), (1.0,), cpu).rows[-1]
        print(f"{guidance} {name}: R {row['r_precision']:.3f} PSNR {row['psnr']:.3f} IoU {row['iou']:.3f} "
              f"Janus {row['janus']:.3f} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
