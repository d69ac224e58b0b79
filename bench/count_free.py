"""Count-free control: does the imaging ResNet-18 learn from the pixels when lesion count is useless?

On cohorts in which every patient has exactly 4 lesions (``count_free``) and only the imaging
part drives the outcome (``--signal imaging``), the number of lesions carries no information, so
an imaging model can only rank patients by what their lesions look like. For each cohort seed
this prints, on the same patient-grouped folds (fold mean of the patient-level C-index):

* the imaging ResNet-18 (the library's default training: patient bags, fixed schedule, ...),
* a noise-output model through the same aggregation (200 draws: mean and 95th percentile),
* the best single measured features: total lesion volume and maximum SUVmax (crop-stage values),
* the oracle (true linear predictor, without frailty),
* the lesion-level truth recovery: Spearman of the out-of-fold lesion log-hazards with necrosis,
  partial given volume and SUVmax.

Usage (2 CPU cores: about 3-4 minutes per seed)::

    .venv/bin/python bench/count_free.py --seeds 1 2 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from psma_lib.crop import crop_cohort, load_crops
from psma_lib.cv import CVConfig, run_cv
from psma_lib.recovery import fold_mean_c, lesion_truth_table, noise_baseline, truth_recovery
from psma_lib.repro import provenance
from psma_lib.synthetic import Spec, count_free, generate_cohort, load_truth


def prepare(root: Path, seed: int, patients: int) -> tuple[Path, Path]:
    cohort, crops = root / f"cohort-seed{seed}", root / f"crops-seed{seed}"
    if not (cohort / "manifest.yaml").is_file():
        generate_cohort(cohort, n_patients=patients, seed=seed, signal="imaging",
                        spec=count_free(Spec(), 4), progress=False)
    if not (crops / "crops.json").is_file():
        crop_cohort(cohort / "manifest.yaml", crops, size_mm=48, spacing_mm=2, progress=False)
    return cohort, crops


def evaluate_seed(root: Path, seed: int, patients: int, config: CVConfig) -> dict:
    cohort, crops_dir = prepare(root, seed, patients)
    t0 = time.perf_counter()
    run = run_cv(crops_dir, root / f"cv-seed{seed}-{config.epochs}ep", config)
    seconds = time.perf_counter() - t0
    oof = run.oof.reset_index(drop=True)
    crops = load_crops(crops_dir)
    lesions = crops.lesions.assign(patient_id=crops.lesions["patient_id"].astype(str))
    truth = load_truth(cohort).set_index("patient_id")
    measured = lesions.groupby("patient_id").agg(volume=("volume_ml", "sum"), suvmax=("suvmax", "max"))
    noise = noise_baseline(oof, lesions, config.aggregation, n_draws=200, seed=seed)
    oof_lesions = pd.read_csv(run.out_dir / "oof_lesion_predictions.csv", dtype={"patient_id": str, "lesion_id": str})
    lesion_truth = pd.read_csv(cohort / "truth" / "lesion_truth.csv", dtype={"patient_id": str, "lesion_id": str})
    recovery = truth_recovery(lesion_truth_table(oof_lesions, lesion_truth), n_boot=300, seed=seed)
    return {
        "seed": seed, "patients": len(oof), "train_seconds": round(seconds, 1),
        "imaging_resnet18": fold_mean_c(oof, oof["risk"].to_numpy()),
        "noise_mean": noise["mean"], "noise_p95": noise["p95"],
        "total_volume": fold_mean_c(oof, measured["volume"]),
        "max_suvmax": fold_mean_c(oof, measured["suvmax"]),
        "oracle": fold_mean_c(oof, truth["linear_predictor"]),
        "necrosis_partial": float(recovery.loc["necrosis | volume, SUVmax", "spearman"]),
        "necrosis_partial_ci": [float(recovery.loc["necrosis | volume, SUVmax", c]) for c in ("ci_low", "ci_high")],
        "fold_c": [round(float(c), 3) for c in run.fold_results["c_index"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--patients", type=int, default=150)
    parser.add_argument("--epochs", type=int, default=CVConfig().epochs)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--out", type=Path, default=Path("_build/bench/count_free"))
    args = parser.parse_args()
    config = CVConfig(modality="imaging", backbone="resnet18", epochs=args.epochs, num_threads=args.threads,
                      progress=False)
    rows = [evaluate_seed(args.out, seed, args.patients, config) for seed in args.seeds]
    table = pd.DataFrame(rows)
    cols = ["seed", "imaging_resnet18", "noise_mean", "noise_p95", "total_volume", "max_suvmax", "oracle",
            "necrosis_partial", "train_seconds"]
    print(f"count-free imaging-only cohorts ({args.patients} patients x 4 lesions, 48 mm / 2 mm crops, "
          f"{args.epochs} epochs, CPU); patient-level fold-mean C-index")
    print(table[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"mean over seeds: imaging {table['imaging_resnet18'].mean():.3f}, oracle {table['oracle'].mean():.3f}, "
          f"noise {table['noise_mean'].mean():.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"rows": rows, "config": config.run_defining(), "provenance": provenance(bench="count_free")}
    (args.out / "count_free.json").write_text(json.dumps(record, indent=2, default=float))
    print(f"written {args.out / 'count_free.json'}")
    assert np.isfinite(table["imaging_resnet18"]).all()


if __name__ == "__main__":
    main()
