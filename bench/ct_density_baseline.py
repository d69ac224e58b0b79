"""The sceptic's table-only baseline with the lesions' CT density, beside the book's networks.

The conventional PSMA PET biomarkers (log lesion count, log PSMA-TV, log SUVmax, SUVmean, bone
fraction; :mod:`psma_lib.biomarkers`) leave out one quantity that every lesion mask measures: the
mean CT density of the lesion (``hu_mean`` in the crop stage's ``lesions.csv``; sclerotic bone
lesions are dense, lytic ones are not). On the count-free cohorts of ``bench/count_free.py`` a Cox
model that adds it beats the imaging network (docs/METHOD.md). This script asks the same of a
finished book: on the book's own folds it fits, inside each training fold, a lifelines Cox model on
the biomarkers with and without the patient's mean lesion CT density (per 100 HU), and sets the
book's imaging and multimodal ResNet-18 beside them with paired bootstrap CIs of the fold-mean
difference (patients resampled within folds).

Usage, after ``make book`` (reads only; a few seconds)::

    .venv/bin/python bench/ct_density_baseline.py --results _build/results/quick
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from count_free import fold_cox

from psma_lib.biomarkers import FEATURE_COLUMNS, biomarker_features, patient_biomarkers
from psma_lib.errors import InputError
from psma_lib.metrics import bootstrap_fold_mean_c, paired_bootstrap_delta_c


def one_folder(parent: Path, pattern: str) -> Path:
    """The single folder of ``parent`` matching ``pattern`` (the book names runs by a hash)."""
    found = sorted(parent.glob(pattern))
    if len(found) != 1:
        raise InputError(f"expected one folder matching {pattern!r}, found {len(found)} (run make book first)",
                         file=str(parent))
    return found[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("_build/results/quick"),
                        help="a book's results folder (crops-*/ and cv/)")
    parser.add_argument("--n-boot", type=int, default=2000)
    args = parser.parse_args()

    lesions_csv = one_folder(args.results, "crops-*") / "lesions.csv"
    lesions = pd.read_csv(lesions_csv, dtype={"patient_id": str})
    if "hu_mean" not in lesions or lesions["hu_mean"].isna().any():
        raise InputError("no CT density (hu_mean) for every lesion: crop again with this psma_lib",
                         file=str(lesions_csv))
    features = biomarker_features(patient_biomarkers(lesions)).set_index("patient_id")
    features["ct_density"] = lesions.groupby("patient_id")["hu_mean"].mean() / 100

    runs = {name: pd.read_csv(one_folder(args.results / "cv", f"{name}-resnet18-*") / "oof_predictions.csv",
                              dtype={"patient_id": str}).reset_index(drop=True)
            for name in ("imaging", "multimodal")}
    oof = runs["imaging"]
    for name, other in runs.items():  # every risk below is on the imaging run's patients and folds
        if not other["patient_id"].equals(oof["patient_id"]) or not other["fold"].equals(oof["fold"]):
            raise InputError(f"the {name} run's patients or folds differ from the imaging run's")
    risks = {
        "biomarkers (Cox)": fold_cox(oof, features, list(FEATURE_COLUMNS)),
        "biomarkers + CT density (Cox)": fold_cox(oof, features, [*FEATURE_COLUMNS, "ct_density"]),
        "imaging ResNet-18": oof["risk"].to_numpy(),
        "multimodal ResNet-18": runs["multimodal"]["risk"].to_numpy(),
    }
    time, event, folds = oof["pfs_months"].to_numpy(), oof["event"].to_numpy(), oof["fold"].to_numpy()
    print(f"{args.results}: {len(oof)} patients, {oof['fold'].nunique()} folds; fold-mean C (95 % CI)")
    for name, risk in risks.items():
        c, lo, hi = bootstrap_fold_mean_c(time, event, risk, folds, n_boot=args.n_boot)
        print(f"  {name:32s} {c:.3f} ({lo:.3f}-{hi:.3f})")
    print("paired differences, fold mean (95 % CI, p)")
    for a, b in [("biomarkers + CT density (Cox)", "biomarkers (Cox)"),
                 ("imaging ResNet-18", "biomarkers + CT density (Cox)"),
                 ("multimodal ResNet-18", "biomarkers + CT density (Cox)")]:
        d = paired_bootstrap_delta_c(time, event, risks[a], risks[b], n_boot=args.n_boot, folds=folds)
        print(f"  {a} - {b}: {d.delta:+.3f} ({d.lo:+.3f} to {d.hi:+.3f}, p {d.p_value:.3g})")


if __name__ == "__main__":
    try:
        main()
    except InputError as exc:
        raise SystemExit(f"ct_density_baseline: {exc}") from None
