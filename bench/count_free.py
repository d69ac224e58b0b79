"""Count-free control: does the imaging ResNet-18 learn from the pixels when lesion count is useless?

On cohorts in which every patient has exactly 4 lesions (``count_free``) and only the imaging
part drives the outcome (``--signal imaging``), the number of lesions carries no information, so
an imaging model can only rank patients by what their lesions look like. For each cohort seed
this prints, on the same patient-grouped folds (fold mean of the patient-level C-index):

* the imaging ResNet-18 (the library's default training: patient bags, fixed schedule, ...),
* a noise-output model through the same aggregation (200 draws: mean and 95th percentile),
* the best single measured features: total lesion volume and maximum SUVmax (crop-stage values),
* the oracle (true linear predictor, without frailty),
* what the measured lesion features reach without any network: a Cox model (fitted in each
  training fold) on the log total volume, log maximum SUVmax, bone fraction and mean
  log(SUVmean / SUVmax) of a patient's lesions; the same with the mean CT density (HU) of the
  lesions' masks added (the strongest reading of the tables: sclerotic bone lesions are dense,
  lytic ones are not), with the paired bootstrap CI of the network's difference to it (fold
  mean, patients resampled within folds); a lesion-level model linear in the same five measured quantities of each
  lesion, its hazards summed per patient as the network's are (what a network that read exactly
  these quantities and nothing else could reach); and the first model with the true
  volume-weighted necrosis added (a diagnostic, not a method: it shows how much an image model must read of the
  necrosis, which is in no table, to reach a given C-index),
* the lesion-level truth recovery: Spearman of the out-of-fold lesion log-hazards with necrosis,
  partial given volume and SUVmax.

Usage (about 25 minutes per seed with one torch thread and the default stem, two invocations side
by side on 2 CPU cores; about 9 with ``--stem standard``; generating and cropping a new cohort adds
about 100 s; ``--patients 300`` doubles both)::

    .venv/bin/python bench/count_free.py --seeds 7 8 9 --threads 1
    .venv/bin/python bench/count_free.py --seeds 1 2 3 --stem standard --reader <psma-pfs pretrain file>

Cohorts, crops and runs are cached under ``--out`` (``train_seconds`` is this invocation's: ~0 for a
run read back from its folder); a record per variant (and cohort size) keeps
one row per seed, so seeds can be added in several invocations.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from lifelines import CoxPHFitter

from psma_lib.biomarkers import mean_ct_density, patient_biomarkers
from psma_lib.cox import neg_partial_log_likelihood
from psma_lib.crop import crop_cohort, load_crops
from psma_lib.cv import CVConfig, lesion_target_values, load_result, run_cv
from psma_lib.io import sha256_file, write_json
from psma_lib.metrics import paired_bootstrap_delta_c
from psma_lib.models import segment_aggregate
from psma_lib.recovery import fold_mean_c, lesion_truth_table, noise_baseline, truth_recovery
from psma_lib.repro import provenance
from psma_lib.synthetic import Spec, count_free, generate_cohort, load_lesion_truth, load_truth
from psma_lib.vocabulary import AUX_TARGETS, input_channels


def cohort_name(seed: int, patients: int) -> str:
    """``seed{seed}``, with ``-n{patients}`` for a cohort size other than the default 150."""
    return f"seed{seed}" if patients == DEFAULT_PATIENTS else f"seed{seed}-n{patients}"


def prepare(root: Path, seed: int, patients: int) -> tuple[Path, Path]:
    cohort, crops = root / f"cohort-{cohort_name(seed, patients)}", root / f"crops-{cohort_name(seed, patients)}"
    if not (cohort / "manifest.yaml").is_file():
        generate_cohort(cohort, n_patients=patients, seed=seed, signal="imaging",
                        spec=count_free(Spec(), 4), progress=False)
    if (crops / "crops.json").is_file() and json.loads((crops / "crops.json").read_text())["version"] < 3:
        shutil.rmtree(crops)  # cropped before the CT density and the mask channel: crop again
    if not (crops / "crops.json").is_file():
        crop_cohort(cohort / "manifest.yaml", crops, size_mm=48, spacing_mm=2, progress=False)
    return cohort, crops


def patient_features(lesions: pd.DataFrame, lesion_truth: pd.DataFrame) -> pd.DataFrame:
    """Per patient: the measured aggregates (PSMA-TV, SUVmax and bone fraction as in
    :mod:`psma_lib.biomarkers`, the mean log(SUVmean / SUVmax), the mean lesion CT density in
    100 HU) and the true volume-weighted necrosis."""
    markers = patient_biomarkers(lesions).set_index("patient_id")
    les = lesions.merge(lesion_truth[["lesion_id", "necrosis"]], on="lesion_id", how="left", validate="1:1")
    les = les.assign(log_ratio=np.log(les["suvmean"] / les["suvmax"]),
                     weighted_necrosis=les["necrosis"] * les["volume_ml"])
    g = les.groupby("patient_id")
    return pd.DataFrame({"log_volume": np.log(markers["psma_tv_ml"]), "log_suvmax": np.log(markers["suvmax"]),
                         "bone": markers["bone_fraction"], "log_ratio": g["log_ratio"].mean(),
                         "hu_mean": mean_ct_density(lesions, markers.index) / 100,
                         "necrosis": g["weighted_necrosis"].sum() / g["volume_ml"].sum()})


def fold_cox(oof: pd.DataFrame, features: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Out-of-fold log partial hazards of a lifelines Cox model fitted in each training fold."""
    x = features.loc[oof["patient_id"], columns].reset_index(drop=True)
    frame = x.assign(time=oof["pfs_months"].to_numpy(), event=oof["event"].to_numpy())
    risk = np.zeros(len(oof))
    for k in sorted(oof["fold"].unique()):
        test = (oof["fold"] == k).to_numpy()
        model = CoxPHFitter(penalizer=0.01).fit(frame[~test], "time", "event")
        risk[test] = model.predict_log_partial_hazard(x[test]).to_numpy()
    return risk


def _lesion_sum_risk(x: torch.Tensor, w: torch.Tensor, bags: torch.Tensor, n_patients: int) -> torch.Tensor:
    return segment_aggregate(x @ w, bags, n_patients, "sum").double()


def _fit_lesion_sum(x: torch.Tensor, bags: torch.Tensor, train: np.ndarray, time_: torch.Tensor,
                    event: torch.Tensor, ridge: float) -> torch.Tensor:
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([w], max_iter=200)

    def closure():
        optimiser.zero_grad()
        risk = _lesion_sum_risk(x, w, bags, len(train))[train]
        loss = neg_partial_log_likelihood(risk, time_[train], event[train]) + ridge * w.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return w.detach()


def fold_lesion_sum_cox(oof: pd.DataFrame, lesions: pd.DataFrame, ridge: float = 0.01) -> np.ndarray:
    """Out-of-fold patient risks ``log Σₗ exp(w·zₗ)`` with zₗ a lesion's measured quantities
    (:data:`~psma_lib.vocabulary.AUX_TARGETS`, standardised on the training lesions, unknown -> 0) and w fitted
    by L-BFGS on the Cox partial likelihood of each training fold's patients (ridge penalty)."""
    z = lesion_target_values(lesions, AUX_TARGETS)
    bag = lesions["patient_id"].map({p: i for i, p in enumerate(oof["patient_id"])}).to_numpy()
    bags = torch.tensor(bag)
    time_, event = (torch.tensor(oof[c].to_numpy(), dtype=torch.float64) for c in ("pfs_months", "event"))
    risk = np.zeros(len(oof))
    for k in sorted(oof["fold"].unique()):
        test = (oof["fold"] == k).to_numpy()
        train_lesions = ~test[bag]
        mean, sd = np.nanmean(z[train_lesions], axis=0), np.nanstd(z[train_lesions], axis=0)
        x = torch.tensor(np.nan_to_num((z - mean) / np.where(sd > 0, sd, 1.0)), dtype=torch.float64)
        w = _fit_lesion_sum(x, bags, ~test, time_, event, ridge)
        risk[test] = _lesion_sum_risk(x, w, bags, len(oof))[test].numpy()
    return risk


def variant_name(config: CVConfig) -> str:
    """The run folder's suffix: the view, the auxiliary targets, any input channel beyond PET and
    CT, a risk head other than the MLP, a stem other than the standard one and a lesion aggregation
    other than ``sum`` (the variants compared here)."""
    extra = [c for c in input_channels(config.channels) if c not in ("pet", "ct")]
    head = [] if config.head == "mlp" else [f"head_{config.head}"]
    stem = [] if config.stem == "standard" else [f"stem_{config.stem}"]
    aggregation = [] if config.aggregation == "sum" else [f"agg_{config.aggregation}"]
    return "-".join([config.view, "aux", *config.aux_targets.split(","), *extra, *head, *stem, *aggregation])


DEFAULT_PATIENTS = 150
MEASURED = ["log_volume", "log_suvmax", "bone", "log_ratio"]


def evaluate_seed(root: Path, seed: int, patients: int, config: CVConfig, reader: Path | None = None) -> dict:
    cohort, crops_dir = prepare(root, seed, patients)
    t0 = time.perf_counter()
    folder = root / f"cv-{cohort_name(seed, patients)}-{config.epochs}ep-{variant_name(config)}"
    # a finished run is read back (its checkpoints may have been deleted to save disk), as pipeline.run_cv does
    run = load_result(folder) if (folder / "results.json").is_file() else run_cv(crops_dir, folder, config)
    seconds = time.perf_counter() - t0
    oof = run.oof.reset_index(drop=True)
    crops = load_crops(crops_dir)
    lesions = crops.lesions.assign(patient_id=crops.lesions["patient_id"].astype(str))
    truth = load_truth(cohort).set_index("patient_id")
    measured = lesions.groupby("patient_id").agg(volume=("volume_ml", "sum"), suvmax=("suvmax", "max"))
    noise = noise_baseline(oof, lesions, config.aggregation, n_draws=200, seed=seed)
    lesion_truth = load_lesion_truth(cohort)
    features = patient_features(lesions, lesion_truth)
    measured_hu = fold_cox(oof, features, [*MEASURED, "hu_mean"])
    delta = paired_bootstrap_delta_c(oof["pfs_months"], oof["event"], oof["risk"], measured_hu, folds=oof["fold"],
                                     seed=seed)
    recovery = truth_recovery(lesion_truth_table(run.oof_lesions, lesion_truth), n_boot=300, seed=seed)
    lesion_sum = fold_lesion_sum_cox(oof, lesions)
    row = {
        "seed": seed, "patients": len(oof), "train_seconds": round(seconds, 1),
        "imaging_resnet18": fold_mean_c(oof, oof["risk"].to_numpy()),
        "noise_mean": noise["mean"], "noise_p95": noise["p95"],
        "total_volume": fold_mean_c(oof, measured["volume"]),
        "max_suvmax": fold_mean_c(oof, measured["suvmax"]),
        "measured_cox": fold_mean_c(oof, fold_cox(oof, features, MEASURED)),
        "measured_cox_hu": fold_mean_c(oof, measured_hu),
        "delta_vs_measured_cox_hu": [delta.delta, delta.lo, delta.hi],
        "measured_lesion_sum": fold_mean_c(oof, lesion_sum),
        "with_true_necrosis": fold_mean_c(oof, fold_cox(oof, features, [*MEASURED, "necrosis"])),
        "oracle": fold_mean_c(oof, truth["linear_predictor"]),
        "necrosis_partial": float(recovery.loc["necrosis | volume, SUVmax", "spearman"]),
        "necrosis_partial_ci": [float(recovery.loc["necrosis | volume, SUVmax", c]) for c in ("ci_low", "ci_high")],
        "fold_c": [round(float(c), 3) for c in run.fold_results["c_index"]],
    }
    if reader is not None:  # the fixed pretrained reader + a Cox model on its readings, on the same folds
        reader_config = CVConfig(modality="imaging", model="reader", weights=str(reader), seed=config.seed,
                                 folds=config.folds, progress=False)
        reader_run = run_cv(crops_dir, root / f"cv-{cohort_name(seed, patients)}-reader-{sha256_file(reader)[:12]}",
                            reader_config)
        reader_oof = reader_run.oof.reset_index(drop=True)
        if not (reader_oof["patient_id"].equals(oof["patient_id"]) and reader_oof["fold"].equals(oof["fold"])):
            raise SystemExit(f"seed {seed}: the reader run's folds differ from the network's")
        risk = reader_oof["risk"].to_numpy()
        row["reader"] = fold_mean_c(oof, risk)
        for name, other in (("imaging_resnet18", oof["risk"]), ("measured_lesion_sum", lesion_sum),
                            ("measured_cox_hu", measured_hu)):
            d = paired_bootstrap_delta_c(oof["pfs_months"], oof["event"], risk, other, folds=oof["fold"], seed=seed)
            row[f"reader_minus_{name}"] = [d.delta, d.lo, d.hi]
        reader_recovery = truth_recovery(lesion_truth_table(reader_run.oof_lesions, lesion_truth), n_boot=300, seed=seed)
        row["reader_necrosis_partial"] = float(reader_recovery.loc["necrosis | volume, SUVmax", "spearman"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--patients", type=int, default=DEFAULT_PATIENTS)
    parser.add_argument("--epochs", type=int, default=CVConfig().epochs)
    parser.add_argument("--aux-targets", default=CVConfig().aux_targets,
                        help="the imaging model's auxiliary lesion targets (psma-pfs cv --aux-targets)")
    parser.add_argument("--view", default=CVConfig().view, help="axial or orthogonal (psma-pfs cv --view)")
    parser.add_argument("--head", default=CVConfig().head, help="mlp or concepts (psma-pfs cv --head)")
    parser.add_argument("--aggregation", default=CVConfig().aggregation,
                        help="lesion log-hazards -> patient risk (psma-pfs cv --aggregation)")
    parser.add_argument("--stem", default=CVConfig().stem, help="standard or no-maxpool (psma-pfs cv --stem)")
    parser.add_argument("--channels", default=CVConfig().channels,
                        help="pet,ct or pet,ct,mask (psma-pfs cv --channels)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--out", type=Path, default=Path("_build/bench/count_free"))
    parser.add_argument("--reader", type=Path, default=None,
                        help="also score each cohort with the fixed pretrained reader in this psma-pfs pretrain file "
                             "and a Cox model on its readings (psma-pfs cv --model reader; eleventh round), on the "
                             "network's folds")
    args = parser.parse_args()
    config = CVConfig(modality="imaging", backbone="resnet18", epochs=args.epochs, num_threads=args.threads,
                      aux_targets=args.aux_targets, view=args.view, channels=args.channels,
                      head=args.head, stem=args.stem, aggregation=args.aggregation,
                      progress=False)
    rows = [evaluate_seed(args.out, seed, args.patients, config, args.reader) for seed in args.seeds]
    table = pd.DataFrame(rows)
    cols = ["seed", "imaging_resnet18", "noise_mean", "noise_p95", "total_volume", "max_suvmax", "measured_cox",
            "measured_cox_hu", "measured_lesion_sum", "with_true_necrosis", "oracle", "necrosis_partial", "train_seconds"]
    if args.reader is not None:
        cols[2:2] = ["reader", "reader_necrosis_partial"]
    print(f"count-free imaging-only cohorts ({args.patients} patients x 4 lesions, 48 mm / 2 mm crops, "
          f"{args.epochs} epochs, CPU; {variant_name(config)}); patient-level fold-mean C-index")
    print(table[cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"mean over seeds: imaging {table['imaging_resnet18'].mean():.3f}, oracle {table['oracle'].mean():.3f}, "
          f"noise {table['noise_mean'].mean():.3f}")
    if args.reader is not None:
        for name in ("imaging_resnet18", "measured_lesion_sum", "measured_cox_hu"):
            deltas = np.array([r[f"reader_minus_{name}"] for r in rows])
            print(f"reader − {name}: " + ", ".join(f"{d:+.3f} ({lo:+.3f}, {hi:+.3f})" for d, lo, hi in deltas)
                  + f"; mean {deltas[:, 0].mean():+.3f}")
        print(f"reader >= 0.65 on {(table['reader'] >= 0.65).sum()} of {len(table)} cohorts (mean {table['reader'].mean():.3f})")
    args.out.mkdir(parents=True, exist_ok=True)
    size = "" if args.patients == DEFAULT_PATIENTS else f"-n{args.patients}"
    path = args.out / f"count_free-{variant_name(config)}{size}.json"  # named by variant: defaults change
    # Seeds run earlier with this variant are kept: one record per variant, one row per seed.
    earlier = json.loads(path.read_text())["rows"] if path.is_file() else []
    rows = sorted([r for r in earlier if r["seed"] not in args.seeds] + rows, key=lambda r: r["seed"])
    record = {"rows": rows, "config": config.run_defining(), "provenance": provenance(bench="count_free")}
    write_json(path, record)
    print(f"written {path} (seeds {', '.join(str(r['seed']) for r in rows)})")
    assert np.isfinite(table["imaging_resnet18"]).all()


if __name__ == "__main__":
    main()
