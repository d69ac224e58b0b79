"""Grid throughput (units/min): the same small grid of fold units on 1 and on 2 local slots.

A unit is one fold of one cross-validation in its own process (``psma-pfs grid run``'s unit:
``python -m psma_lib cv --config C --fold K``), so the wall time includes each process's start
(importing torch) as well as its training. The grid: tiny random crops, the clinical Cox
baseline and the imaging ResNet-18 (a few epochs), ``--folds`` folds each. Each slot count
starts from an empty results folder. Without ``--gpus`` the slots are CPU slots (each unit gets
cores / slots torch threads); with ``--gpus 0,1`` the comparison is 1 GPU vs 2 GPUs.
The load average is printed beside the figures: other work on the machine slows the units.

    python bench/grid_throughput.py                      # CPU: 1 slot vs 2 slots
    python bench/grid_throughput.py --gpus 0,1 --epochs 20
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from psma_lib import grid
from psma_lib.crop import load_crops
from psma_lib.cv import CVConfig
from psma_lib.testing import write_tiny_crops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=24)
    parser.add_argument("--size", type=int, default=16, help="crop voxels per axis")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--gpus", default=None, help="e.g. 0,1: compare the first GPU alone with all of them")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="grid-bench-"))
    crops = load_crops(write_tiny_crops(work / "crops", n_patients=args.patients, size=args.size))
    common = dict(folds=args.folds, n_bootstrap=100, progress=False)
    configs = [CVConfig(modality="clinical", model="coxph", **common),
               CVConfig(modality="imaging", epochs=args.epochs, batch_size=16, **common)]
    gpus = args.gpus.split(",") if args.gpus else None
    layouts = [("1 GPU", gpus[:1]), (f"{len(gpus)} GPUs", gpus)] if gpus else [("1 CPU slot", 1), ("2 CPU slots", 2)]
    print(f"grid: {len(configs)} configurations x {args.folds} folds = {len(configs) * args.folds} units "
          f"({args.patients} patients, {args.size}^3 crops, imaging {args.epochs} epochs); "
          f"{len(os.sched_getaffinity(0))} cores")
    for name, lanes in layouts:
        g = grid.plan(crops, work / name.replace(" ", "-"), configs)
        load = os.getloadavg()[0]
        start = time.perf_counter()
        failures = grid.run_local(g, gpus=lanes if gpus else None, slots=1 if gpus else lanes, progress=False)
        wall = time.perf_counter() - start
        if failures:
            raise SystemExit("\n".join(failures))
        print(f"{name:>12}: {wall:6.1f} s wall, {60 * len(g.units) / wall:5.1f} units/min "
              f"(load average {load:.1f} before, {os.getloadavg()[0]:.1f} after)")


if __name__ == "__main__":
    main()
