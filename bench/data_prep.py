"""Benchmark of data preparation: synthetic cohort generation and lesion cropping.

For the default cohort (99 patients) and a 4x larger one (396 patients) it prints, per stage,
the wall time, throughput in lesions/s, the peak resident memory (``resource.getrusage`` of the
stage's process and of its largest child, in MiB), the peak summed PSS of the stage's whole
process tree (sampled from /proc every 0.1 s, Linux only; PSS does not double-count pages that
a fork shares, which getrusage's child figure does), the output's size on disk, and the 1-minute
load average when the stage ended (throughput on a shared machine is only comparable at equal
load).

Each (stage, cohort) runs in a fresh Python process so the peak-memory figures of one do not
carry over into the next. Everything happens in a temporary directory that is removed at the end.

Usage::

    .venv/bin/python bench/data_prep.py            # 99 and 396 patients
    .venv/bin/python bench/data_prep.py --quick    # 12 and 48 patients
    .venv/bin/python bench/data_prep.py --patients 20 --workers 2 --keep /tmp/bench
    .venv/bin/python bench/data_prep.py --cohort COHORT_DIR   # crop an existing cohort only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _stage(stage: str, patients: int, directory: Path, workers: int, seed: int) -> dict:
    """Run one stage in this process and return its measurements."""
    start = time.perf_counter()
    if stage == "generate":
        from psma_lib.synthetic import generate_cohort

        generate_cohort(directory / "cohort", n_patients=patients, seed=seed, workers=workers,
                        progress=False)
        from psma_lib.manifest import load_manifest

        cohort = load_manifest(directory / "cohort")
        n_patients, n_lesions = len(cohort.patients), len(cohort.lesions)
        output = directory / "cohort"
    else:
        from psma_lib.crop import crop_cohort, load_crops

        crop_cohort(directory / "cohort", directory / "crops", workers=workers, progress=False)
        crop_set = load_crops(directory / "crops")
        n_patients, n_lesions = len(crop_set.patients), crop_set.n_lesions
        output = directory / "crops"
    seconds = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss is KiB on Linux, bytes on macOS.
    unit = 1024 if sys.platform != "darwin" else 1024 * 1024
    return {
        "seconds": seconds,
        "patients": n_patients,
        "lesions": n_lesions,
        "maxrss_self_mib": own / unit,
        "maxrss_children_mib": children / unit,
        "disk_mib": sum(f.stat().st_size for f in output.rglob("*") if f.is_file()) / 2**20,
    }


def _tree_pss_mib(root_pid: int) -> float:
    """Summed proportional set size (MiB) of ``root_pid`` and its descendants, from /proc.

    PSS splits shared pages between the processes sharing them, so a forked helper or a
    read-only mapping is not counted twice (plain RSS sums would be).
    """
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # The command name may contain spaces; fields after the last ')' are fixed.
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        tree.update(children)
        frontier.extend(children)
    total_kib = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total_kib += int(line.split()[1])
                        break
        except OSError:
            continue
    return total_kib / 1024


def _run_stage(stage: str, patients: int, directory: Path, workers: int, seed: int) -> dict:
    """Run a stage in a child Python process, sampling its process tree's RSS meanwhile."""
    command = [sys.executable, __file__, "--stage", stage, "--patients", str(patients),
               "--dir", str(directory), "--workers", str(workers), "--seed", str(seed)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    peak_tree = 0.0
    sample = Path("/proc").is_dir()
    while process.poll() is None:
        if sample:
            peak_tree = max(peak_tree, _tree_pss_mib(process.pid))
        time.sleep(0.1)
    output = process.stdout.read()
    if process.returncode != 0:
        raise SystemExit(f"{stage} of {patients} patients failed (exit {process.returncode})")
    result = json.loads(output.strip().splitlines()[-1])
    result["peak_tree_pss_mib"] = peak_tree if sample else float("nan")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="12 and 48 patients instead of 99 and 396")
    parser.add_argument("--patients", type=int, nargs="+", help="cohort sizes (overrides the defaults)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes for generation and cropping (2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    parser.add_argument("--cohort", type=Path,
                        help="skip generation: only crop this existing cohort folder")
    parser.add_argument("--stage", choices=("generate", "crop"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.stage:  # internal: one stage in this (fresh) process
        print(json.dumps(_stage(args.stage, args.patients[0], args.dir, args.workers, args.seed)))
        return 0

    sizes = args.patients or ([12, 48] if args.quick else [99, 396])
    if args.cohort:
        sizes = [0]  # the cohort's own size
    work = args.keep or Path(tempfile.mkdtemp(prefix="psma-bench-"))
    print(f"data-prep benchmark: {os.cpu_count()} CPU(s), crop workers {args.workers}, "
          f"seed {args.seed}, in {work}")
    header = (f"{'stage':9} {'patients':>8} {'lesions':>7} {'seconds':>8} {'lesions/s':>9} "
              f"{'maxrss MiB':>10} {'child MiB':>9} {'tree PSS':>8} {'disk MiB':>8} {'load':>5}")
    print(header)
    try:
        for patients in sizes:
            directory = work / f"n{patients}"
            directory.mkdir(parents=True, exist_ok=True)
            stages = ("generate", "crop")
            if args.cohort:
                (directory / "cohort").symlink_to(args.cohort.resolve(), target_is_directory=True)
                stages = ("crop",)
            for stage in stages:
                r = _run_stage(stage, patients, directory, args.workers, args.seed)
                print(f"{stage:9} {r['patients']:>8} {r['lesions']:>7} {r['seconds']:>8.1f} "
                      f"{r['lesions'] / r['seconds']:>9.2f} {r['maxrss_self_mib']:>10.0f} "
                      f"{r['maxrss_children_mib']:>9.0f} {r['peak_tree_pss_mib']:>8.0f} "
                      f"{r['disk_mib']:>8.1f} {os.getloadavg()[0]:>5.1f}", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
