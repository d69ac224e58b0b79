"""How well can a model that sums its lesions' hazards rank patients, given the lesions' TRUE properties?

The book's networks score each lesion and combine the scores as ``log Σ_l exp(h_l)`` (``sum``):
a patient's hazard is the sum of the lesions' hazards. The default generator's outcome is a
Cox model in patient-level features (package docstring of :mod:`psma_lib.synthetic`): log max
SUVmax, log total volume, log count, the *fraction* of lesions in bone and the *volume-weighted
mean* necrosis. The first three a sum of lesion hazards can express (log Σ v_l is a sum; a max is
approached by one), the last two it cannot (a mean is not a sum). This measures what that costs
with nothing learned from pixels: on each cohort's tables (:func:`psma_lib.synthetic.sample_tables`,
the same draws as the cohort's, no images), on five event-stratified folds, fitted inside each
training fold:

* ``patient form``: a Cox model on the generator's five true patient features (its own form);
* ``lesion sum form``: a Cox model whose lesion log-hazards are linear in each lesion's true log
  SUVmax, log volume, bone site and necrosis, summed as the networks sum them
  (:func:`psma_lib.train.fit_lesion_linear`, the ninth round's linear term on true inputs);
* ``true imaging part``: the generator's imaging part itself (no fitting; its ceiling).

It prints, per cohort size, the mean fold-mean C of each over the cohort seeds and the mean paired
difference patient form − lesion sum form with its standard error over the seeds, and writes a
JSON record. Tables only: seconds per cohort (2 CPU cores)::

    .venv/bin/python bench/aggregation_ceiling.py                      # 99 and 300 patients, 20 seeds; 2000, 5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from psma_lib.cv import COXPH_PENALIZER, fit_coxph, lesion_scaling, make_folds, standardise_inputs
from psma_lib.io import write_json
from psma_lib.models import aggregate_lesion_risks
from psma_lib.recovery import fold_mean_c, true_lesion_properties
from psma_lib.repro import provenance
from psma_lib.synthetic.outcome import sample_tables
from psma_lib.train import fit_lesion_linear

PATIENT_FEATURES = ["feature_uptake", "feature_burden", "feature_count", "feature_bone", "feature_necrosis"]


def cohort_row(n_patients: int, seed: int, n_folds: int = 5) -> dict:
    """Fold-mean C of the three risks on one cohort's tables (folds and fits as the book's)."""
    tables = sample_tables(n_patients, seed)
    patients = tables.patients.merge(make_folds(tables.patients, n_folds, seed), on="patient_id")
    truth = tables.truth.set_index("patient_id")
    lesions = tables.lesions.reset_index(drop=True)
    values = true_lesion_properties(lesions).to_numpy()
    patient_risk, lesion_risk = pd.Series(np.nan, index=truth.index), pd.Series(np.nan, index=truth.index)
    for k in range(n_folds):
        train_ids = sorted(patients.loc[patients["fold"] != k, "patient_id"])
        test_ids = sorted(patients.loc[patients["fold"] == k, "patient_id"])
        outcome = patients.set_index("patient_id").loc[train_ids]
        features = truth.loc[train_ids, PATIENT_FEATURES]
        mean, sd = features.mean(), features.std(ddof=0)
        coef = fit_coxph(((features - mean) / sd).to_numpy(), outcome)
        patient_risk[test_ids] = ((truth.loc[test_ids, PATIENT_FEATURES] - mean) / sd).to_numpy() @ coef
        train_rows = lesions["patient_id"].isin(train_ids).to_numpy()
        centre, scale = lesion_scaling(values, train_rows)
        z = standardise_inputs(values, centre, scale)
        row_of = {pid: i for i, pid in enumerate(train_ids)}
        weight = fit_lesion_linear(z[train_rows], torch.tensor(lesions.loc[train_rows, "patient_id"].map(row_of)
                                                               .to_numpy()),
                                   torch.tensor(outcome["pfs_months"].to_numpy()),
                                   torch.tensor(outcome["event"].to_numpy()), "sum", COXPH_PENALIZER)
        test_rows = lesions["patient_id"].isin(test_ids).to_numpy()
        scores = lesions.loc[test_rows, ["patient_id"]].assign(log_hazard=(z[test_rows].double() @ weight).numpy())
        lesion_risk[test_ids] = aggregate_lesion_risks(scores, "sum").loc[test_ids].to_numpy()
    return {"patients": n_patients, "seed": seed, "patient form": fold_mean_c(patients, patient_risk),
            "lesion sum form": fold_mean_c(patients, lesion_risk),
            "true imaging part": fold_mean_c(patients, truth["imaging_part"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[99, 300, 2000])
    parser.add_argument("--seeds", type=int, default=20, help="cohort seeds 0..N-1 per size (2000 patients: 5)")
    parser.add_argument("--out", type=Path, default=Path("_build/bench/aggregation_ceiling.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = [cohort_row(n, seed) for n in args.sizes for seed in range(args.seeds if n < 1000 else min(args.seeds, 5))]
    table = pd.DataFrame(rows)
    table["difference"] = table["patient form"] - table["lesion sum form"]
    summary = table.groupby("patients").agg(
        seeds=("seed", "size"), patient_form=("patient form", "mean"), lesion_sum_form=("lesion sum form", "mean"),
        true_imaging_part=("true imaging part", "mean"), difference=("difference", "mean"),
        difference_se=("difference", lambda d: d.std(ddof=1) / np.sqrt(len(d))),
        difference_positive=("difference", lambda d: int((d > 0).sum())))
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print(summary.to_string())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, {"summary": summary.reset_index().to_dict("records"), "cohorts": rows,
                          "provenance": provenance(bench="aggregation_ceiling")})
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
