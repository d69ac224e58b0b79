"""The paper profile's cross-validations, timed: every modality x backbone the ``paper`` book runs
(one repeat; the book's profile repeats the whole cross-validation).

Generates the default 99-patient synthetic cohort, crops it at the paper profile's 64 mm / 2 mm
and cross-validates each configuration with the library's defaults (5 folds, the profile's
epochs), printing wall time and the patient-level fold-mean C-index per run. Meant for one GPU
(``bench/gpu_check.sh``); on a CPU it runs too, slowly. Needs no papermill or Jupyter.

    python bench/paper_profile.py --device cuda --out _build/bench/paper
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from psma_lib.book import PROFILES
from psma_lib.crop import crop_cohort
from psma_lib.cv import CVConfig, run_cv
from psma_lib.recovery import fold_mean_c
from psma_lib.repro import provenance
from psma_lib.synthetic import generate_cohort, load_truth

PAPER = PROFILES["paper"]  # the book's paper profile: epochs, crop size, backbones


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, default=PAPER.epochs)
    p.add_argument("--patients", type=int, default=99)
    p.add_argument("--size-mm", type=float, default=PAPER.size_mm)
    p.add_argument("--backbones", default=",".join(PAPER.backbones))
    p.add_argument("--modalities", default="imaging,multimodal")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--out", type=Path, default=Path("_build/bench/paper"))
    args = p.parse_args()
    t0 = time.perf_counter()
    cohort = args.out / "cohort"
    if not (cohort / "manifest.yaml").is_file():
        generate_cohort(cohort, n_patients=args.patients, seed=0, workers=args.workers, progress=False)
    crops = args.out / f"crops-{args.size_mm:g}"
    if not (crops / "crops.json").is_file():
        crop_cohort(cohort / "manifest.yaml", crops, size_mm=args.size_mm, spacing_mm=2.0,
                    workers=args.workers, progress=False)
    print(f"cohort + crops: {time.perf_counter() - t0:.1f} s ({args.workers} workers)", flush=True)
    truth = load_truth(cohort).set_index("patient_id")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    rows = []
    runs = [("clinical", "coxph", None)] + [(m, "resnet", b) for m in args.modalities.split(",")
                                            for b in args.backbones.split(",")]
    for modality, model, backbone in runs:
        config = CVConfig(modality=modality, model=model, backbone=backbone, epochs=args.epochs,
                          device=args.device, progress=False)
        t = time.perf_counter()
        result = run_cv(crops, args.out / "cv" / f"{config.name}-{args.epochs}", config)
        seconds = time.perf_counter() - t
        oof = result.oof.reset_index(drop=True)
        row = {"modality": modality, "backbone": backbone or model, "seconds": round(seconds, 1),
               "fold_mean_c": round(result.summary["fold_mean"], 3),
               "oracle_fold_mean_c": round(fold_mean_c(oof, truth["linear_predictor"]), 3)}
        rows.append(row)
        print(f"{modality:10s} {row['backbone']:9s} {seconds:7.1f} s  fold-mean C {row['fold_mean_c']:.3f} "
              f"(oracle {row['oracle_fold_mean_c']:.3f})", flush=True)
    total = time.perf_counter() - t0
    print(f"paper profile on {device}: {total:.0f} s in all")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "paper_profile.json").write_text(json.dumps(
        {"device": device, "total_seconds": total, "runs": rows, "provenance": provenance(bench="paper_profile")},
        indent=2))


if __name__ == "__main__":
    main()
