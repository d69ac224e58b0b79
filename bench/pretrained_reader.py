"""A pretrained lesion reader kept fixed, and a Cox risk linear in what it reads (docs/METHOD.md,
eleventh round).

For each cohort seed of the default generator, with the quick (or any) profile's cohort, crops
and the book's imaging run's folds:

* the encoder pretrained on another cohort's lesions (``psma-pfs pretrain``, the tenth round's:
  ``--pretrain-seed``, ``--pretrain-patients``, ``--pretrain-epochs``; cached in the results folder)
  reads every lesion's five measured quantities from its pixels (``pretrain.read_lesions``: a
  fixed function, fitted on no lesion of this cohort);
* in each fold, those readings are standardised on the training fold's lesions and a
  lesion-level Cox model of the training patients, through the ``sum`` aggregation, gives the
  weights (``train.fit_lesion_linear``, penalizer 0.01); the test patients' risks are their
  lesions' scores summed as hazards;
* the same fit on the crop stage's *measured* quantities (the ninth round's linear term), on the
  same folds.

It prints the fold-mean C of both beside the book's imaging run, the lesion-count and biomarker +
CT-density Cox models and the oracle, paired ΔC (patients resampled within folds) of the reader
against each, and the truth recovery of the reader's lesion scores; one JSON record per seed goes
to ``--out``. About a minute per seed on 2 CPU cores when the cohort, crops and the book's runs
are cached (``make book``, ``bench/default_cohort.py --seed S``); otherwise those are made first.

Usage::

    .venv/bin/python bench/pretrained_reader.py --seeds 1 2 3 4 5 6 7 8
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from psma_lib import book, comparison
from psma_lib.analysis import oracle_c_index
from psma_lib.cv import fit_lesion_cox, lesion_cox_log_hazards, lesion_target_values
from psma_lib.io import write_json
from psma_lib.metrics import paired_bootstrap_delta_c
from psma_lib.models import aggregate_lesion_risks
from psma_lib.pretrain import (
    PretrainConfig,
    read_lesions,
    read_pretrained_meta,
    reading_correlations,
)
from psma_lib.recovery import lesion_truth_table, noise_baseline, truth_recovery
from psma_lib.repro import provenance
from psma_lib.synthetic import load_lesion_truth, load_truth

READER, TABLE = "pretrained reader + Cox (sum)", "measured quantities + Cox (sum)"


def fold_linear_risks(values: np.ndarray, lesions: pd.DataFrame, oof: pd.DataFrame) -> tuple[pd.Series, np.ndarray]:
    """Out-of-fold patient risks (indexed by patient) and lesion scores of a lesion-level Cox model
    linear in ``values`` ``[L, K]``, fitted in each fold of ``oof`` on its training patients
    (:func:`psma_lib.cv.fit_lesion_cox`: standardisation and weights; ``sum`` aggregation), as
    ``psma-pfs cv --model reader`` scores the reader's readings.

    >>> lesions = pd.DataFrame({"patient_id": list("aabbccdd"), "x": [3, 2, 0, 1, 2, 2, 0, 0.5]})
    >>> oof = pd.DataFrame({"patient_id": list("abcd"), "fold": [0, 1, 0, 1],
    ...                     "pfs_months": [1.0, 4.0, 2.0, 3.0], "event": [1, 1, 1, 0]})
    >>> risk, scores = fold_linear_risks(lesions[["x"]].to_numpy(), lesions, oof)
    >>> list(risk.index), scores.shape
    (['a', 'b', 'c', 'd'], (8,))
    """
    scores = np.full(len(lesions), np.nan)
    for k in sorted(oof["fold"].unique()):
        train_ids = sorted(oof.loc[oof["fold"] != k, "patient_id"])
        fit = fit_lesion_cox(values, lesions, oof, train_ids, "sum")
        test = lesions["patient_id"].isin(oof.loc[oof["fold"] == k, "patient_id"]).to_numpy()
        scores[test] = lesion_cox_log_hazards(values[test], lesions[test], fit)
    risk = aggregate_lesion_risks(lesions.assign(log_hazard=scores), "sum")
    return risk, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="cohort seeds (the book's: 0)")
    parser.add_argument("--profile", default="quick", choices=sorted(book.PROFILES))
    parser.add_argument("--pretrain-seed", type=int, default=1000)
    parser.add_argument("--pretrain-patients", type=int, default=400)
    parser.add_argument("--pretrain-epochs", type=int, default=PretrainConfig.epochs)
    parser.add_argument("--out", type=Path, default=Path("_build/bench/pretrained_reader"))
    parser.add_argument("--n-boot", type=int, default=2000)
    args = parser.parse_args()
    if args.pretrain_seed in args.seeds:
        raise SystemExit("--pretrain-seed must differ from every --seeds: the pretraining cohort is another cohort")
    rows = []
    for seed in args.seeds:
        s = book.settings(profile=args.profile, seed=seed)
        weights = book.pretrained_encoder(s, seed=args.pretrain_seed, patients=args.pretrain_patients,
                                          epochs=args.pretrain_epochs)
        crops = book.crops(s)
        lesions = crops.lesions.astype({"patient_id": str}).reset_index(drop=True)
        runs = {"imaging (book)": book.cv(s, "imaging"),
                **{name: book.cv(s, **book.BASELINE_RUNS[name])
                   for name in ("lesion count (Cox)", "biomarkers + CT density (Cox)")}}
        oof = runs["imaging (book)"].oof.sort_values("patient_id").reset_index(drop=True)
        readings = read_lesions(weights, crops, lesions)
        targets = list(readings.columns)
        risks, scores = {}, {}
        risks[READER], scores[READER] = fold_linear_risks(readings.to_numpy(), lesions, oof)
        risks[TABLE], scores[TABLE] = fold_linear_risks(lesion_target_values(lesions, targets), lesions, oof)
        for name, run in runs.items():
            risks[name] = run.oof.set_index("patient_id")["risk"]
        truth = load_truth(book.cohort(s).root)
        oracle = oracle_c_index(truth, oof[["patient_id", "pfs_months", "event"]], oof[["patient_id", "fold"]],
                                n_boot=args.n_boot, seed=seed)
        ids = oof["patient_id"]
        deltas = []
        for a, b in [(READER, name) for name in (TABLE, *runs)] + [(TABLE, "imaging (book)")]:
            d = paired_bootstrap_delta_c(oof["pfs_months"], oof["event"], risks[a].loc[ids].to_numpy(),
                                         risks[b].loc[ids].to_numpy(), n_boot=args.n_boot, seed=seed, folds=oof["fold"])
            deltas.append(comparison.delta_row(f"{a} − {b}", d))
        deltas = pd.DataFrame(deltas)
        noise = noise_baseline(oof, lesions, "sum", n_draws=200, seed=seed)  # noise lesion outputs through `sum`
        c = {**{row["comparison"].split(" − ")[1]: row["c_b"] for row in deltas.to_dict("records")},
             READER: deltas["c_a"].iloc[0], "oracle": oracle["fold_mean"], "noise (sum): mean of 200": noise["mean"],
             "noise (sum): 95th pct": noise["p95"]}
        recovered = truth_recovery(lesion_truth_table(lesions.assign(log_hazard=scores[READER]),
                                                      load_lesion_truth(book.cohort(s).root)), n_boot=1000, seed=seed)
        reading = reading_correlations(readings.to_numpy(), lesion_target_values(lesions, targets), targets)
        with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
            print(f"\nseed {seed}: fold-mean C " + ", ".join(f"{k} {v:.3f}" for k, v in c.items()))
            print(deltas.to_string(index=False))
            print(f"reader vs measured (Pearson r, all lesions): {', '.join(f'{k} {v:.3f}' for k, v in reading.items())}")
            print(f"lesion truth recovery of the reader's scores:\n{recovered.to_string()}")
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / f"{s.profile}-seed{seed}-reader_s{args.pretrain_seed}.json",
                   {"fold_mean": c, "deltas": deltas.to_dict("records"), "reading_r": reading,
                    "truth_recovery": recovered.reset_index().to_dict("records"),
                    "weights": str(weights), "pretrained": read_pretrained_meta(weights),
                    "provenance": provenance(bench="pretrained_reader", seed=seed)})
        necrosis = recovered.loc["necrosis | volume, SUVmax", "spearman"]
        rows.append({"seed": seed, **{k: v for k, v in c.items()},
                     **{f"Δ {r['comparison']}": r["delta"] for r in deltas.to_dict("records")},
                     "necrosis partial ρ": necrosis})
    table = pd.DataFrame(rows)
    if len(table) > 1:
        table = pd.concat([table, pd.DataFrame([{"seed": "mean", **table.drop(columns="seed").mean()}])])
    with pd.option_context("display.width", 300, "display.max_columns", 30, "display.float_format", "{:.3f}".format):
        print("\n" + table.to_string(index=False))


if __name__ == "__main__":
    main()
