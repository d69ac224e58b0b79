"""Benchmark of sharded cropping: throughput vs shards run at once, merge, bytes per lesion.

On a synthetic cohort (generated with :mod:`psma_lib.synthetic`, or ``--cohort``) it prints:

* crop throughput (wall seconds, lesions/s) when the cohort is cut into N shards and the N
  ``psma-pfs crop --shard i/N --workers 1`` commands run at once as separate processes (as N
  SLURM array tasks would), then the merge and load times of the N shards; plus one unsharded
  ``psma-pfs crop --workers 2`` (a process pool in one job) for comparison. Every sharded result
  is checked to hold exactly the unsharded crops.
* bytes per lesion (the volume and the three central planes, from the files' sizes) for float32
  and float16 storage at 48 mm and 64 mm crops at 2 mm, and the float16 error measured at crop
  time (``crops.json``'s ``storage_error``) on the cohort's PET SUV and CT HU.

Each timed command runs in fresh processes; the 1-minute load average is printed beside each
figure because on a shared machine throughput is only comparable at equal load.

Usage::

    .venv/bin/python bench/crop_shards.py                       # 48 patients, 1 and 2 shards
    .venv/bin/python bench/crop_shards.py --patients 12 --shards 1 2 4
    .venv/bin/python bench/crop_shards.py --cohort COHORT_DIR --keep /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CLI = "import sys; from psma_lib.cli import main; sys.exit(main(sys.argv[1:]))"


def _crop_processes(manifest: Path, out: Path, commands: list[list[str]]) -> float:
    """Run ``psma-pfs crop MANIFEST --out OUT <extra>`` for each extra at once; wall seconds."""
    start = time.perf_counter()
    processes = [subprocess.Popen([sys.executable, "-c", CLI, "crop", str(manifest), "--out", str(out),
                                   "--no-progress", *extra], stdout=subprocess.DEVNULL)
                 for extra in commands]
    codes = [p.wait() for p in processes]
    if any(codes):
        raise SystemExit(f"crop failed (exit codes {codes})")
    return time.perf_counter() - start


def _same_crops(a, b) -> bool:
    return all(np.array_equal(a.images[i], b.images[i]) for i in range(a.n_lesions)) and all(
        np.array_equal(a.planes(v), b.planes(v)) for v in ("axial", "coronal", "sagittal"))


def _bytes_per_lesion(crops_dir: Path, n_lesions: int) -> tuple[float, float]:
    """(volume, planes) bytes per lesion, from the shard files' sizes."""
    files = list((crops_dir / "shards").rglob("*.npy"))
    volume = sum(f.stat().st_size for f in files if f.name.startswith("crops-"))
    planes = sum(f.stat().st_size for f in files if f.name.startswith("planes-"))
    return volume / n_lesions, planes / n_lesions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=48, help="synthetic cohort size (48)")
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2],
                        help="numbers of shards to run at once (1 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cohort", type=Path, help="crop this existing cohort instead")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args(argv)

    from psma_lib.crop import load_crops, merge_shards

    work = args.keep or Path(tempfile.mkdtemp(prefix="psma-bench-shards-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        if args.cohort:
            manifest = args.cohort / "manifest.yaml"
        else:
            from psma_lib.synthetic import generate_cohort

            start = time.perf_counter()
            manifest = generate_cohort(work / "cohort", n_patients=args.patients, seed=args.seed,
                                       workers=2, progress=False)
            print(f"generated {args.patients} patients in {time.perf_counter() - start:.0f} s")
        print(f"sharded cropping benchmark: {os.cpu_count()} CPU(s), cohort {manifest.parent}, "
              "64 mm crops at 2 mm, float32")
        print(f"{'run':34} {'processes':>9} {'lesions':>7} {'wall s':>7} {'lesions/s':>9} "
              f"{'merge s':>7} {'load s':>6} {'same':>4} {'load':>5}")
        reference = None
        for n_shards in args.shards:
            out = work / f"shards{n_shards}"
            seconds = _crop_processes(manifest, out, [["--workers", "1", "--shard", f"{i}/{n_shards}"]
                                                      for i in range(n_shards)])
            load_average = os.getloadavg()[0]
            start = time.perf_counter()
            merge_shards(manifest, out)
            merge_seconds = time.perf_counter() - start
            start = time.perf_counter()
            crop_set = load_crops(out)
            load_seconds = time.perf_counter() - start
            reference = reference or crop_set
            same = "yes" if _same_crops(crop_set, reference) else "NO"
            print(f"{f'{n_shards} shard(s) at once, 1 worker each':34} {n_shards:>9} "
                  f"{crop_set.n_lesions:>7} {seconds:>7.1f} {crop_set.n_lesions / seconds:>9.2f} "
                  f"{merge_seconds:>7.2f} {load_seconds:>6.2f} {same:>4} {load_average:>5.1f}",
                  flush=True)
        seconds = _crop_processes(manifest, work / "pool", [["--workers", "2"]])
        crop_set = load_crops(work / "pool")
        same = "yes" if _same_crops(crop_set, reference) else "NO"
        print(f"{'unsharded, a pool of 2 workers':34} {1:>9} {crop_set.n_lesions:>7} {seconds:>7.1f} "
              f"{crop_set.n_lesions / seconds:>9.2f} {'':>7} {'':>6} {same:>4} "
              f"{os.getloadavg()[0]:>5.1f}", flush=True)

        print("\nstorage per lesion (volume [2, D, H, W] + three central planes); float16 error "
              "measured at crop time on this cohort")
        print(f"{'crop':>12} {'dtype':>7} {'volume B':>9} {'planes B':>8} {'total KiB':>9} "
              f"{'PET max abs SUV':>15} {'PET rel':>8} {'CT max abs HU':>13} {'CT rel':>8} "
              f"{'PET max SUV':>11}")
        for size_mm in (48, 64):
            for dtype in ("float32", "float16"):
                out = work / f"storage-{size_mm}-{dtype}"
                if size_mm == 64 and dtype == "float32":
                    out = work / "pool"
                else:
                    _crop_processes(manifest, out, [["--workers", "2", "--size-mm", str(size_mm),
                                                     "--dtype", dtype]])
                meta = json.loads((out / "crops.json").read_text())
                volume, planes = _bytes_per_lesion(out, meta["n_lesions"])
                error = meta["storage_error"]
                if error:
                    pet, ct = error["pet_suv"], error["ct_hu"]
                    shown = (f"{pet['max_abs']:>15.2e} {pet['max_rel']:>8.1e} {ct['max_abs']:>13.3f} "
                             f"{ct['max_rel']:>8.1e} {pet['max_value']:>11.1f}")
                else:
                    shown = f"{'exact':>15} {'':>8} {'exact':>13} {'':>8} {'':>11}"
                print(f"{f'{size_mm} mm/2 mm':>12} {dtype:>7} {volume:>9.0f} {planes:>8.0f} "
                      f"{(volume + planes) / 1024:>9.1f} {shown}", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
