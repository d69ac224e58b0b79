"""The book's lesion reader on draws of the default generator (docs/METHOD.md, twelfth and thirteenth rounds).

For each cohort seed S, with the quick (or any) profile's cohort, crops and folds:

* the reader the book itself uses (:func:`psma_lib.book.reader_weights`: pretrained without
  outcomes on another draw of the generator, S + 1000, with the profile's ``pretrain_patients``
  and ``pretrain_epochs``), or the one in ``--weights``;
* ``psma-pfs cv --model reader``, imaging (a Cox model on its five readings of each lesion,
  summed as hazards) and multimodal (the same with the clinical columns beside them, their ridge
  penalty chosen on inner folds), as the chapters run them, and the twelfth round's multimodal
  reader (the clinical columns with the Cox baselines' fixed penalty);
* beside the Cox baselines of the book (clinical, and :data:`psma_lib.book.BASELINE_RUNS`: lesion
  count, the PSMA PET biomarkers, clinical + biomarkers with the fixed and with the tuned clinical
  penalty, biomarkers + CT density), noise lesion outputs through the
  same ``sum`` (200 draws) and the oracle (and the true imaging part alone); and,
  with ``--networks``, the book's imaging and multimodal ResNet-18 (trained here if not cached:
  about 5 minutes per seed on 2 CPU cores).

It prints the fold-mean C-index of each, paired ΔC (patients resampled within folds) of the two
reader runs against each baseline (the multimodal reader also against the clinical + biomarkers
Cox model with its clinical penalty chosen on inner folds too, as the book runs it), the truth
recovery of the imaging reader's lesion scores, and
the reader's pretraining (cohort, lesions, held-out reading, time); one JSON record per seed goes
to ``--out``. About two minutes per new seed (cohort, crops, pretraining cohort and reader) on 2
CPU cores, seconds when cached.

Usage::

    .venv/bin/python bench/book_reader.py --seeds 1 2 3 4 5 6 7 8
    .venv/bin/python bench/book_reader.py --seeds 0 --networks
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from psma_lib import book, comparison
from psma_lib.analysis import oracle_c_index
from psma_lib.io import sha256_file, write_json
from psma_lib.pretrain import read_pretrained_meta
from psma_lib.recovery import lesion_truth_table, noise_baseline, truth_recovery
from psma_lib.repro import provenance
from psma_lib.synthetic import load_lesion_truth, load_truth

READER, MM_READER = book.READER_RUNS  # "imaging reader", "multimodal reader"
MM_FIXED = "multimodal reader, fixed clinical penalty"
#: The twelfth round's multimodal reader, which the book's replaced (docs/METHOD.md, thirteenth round:
#: the clinical columns' ridge penalty chosen on inner folds instead of the Cox baselines' fixed one).
SUPERSEDED = {MM_FIXED: dict(modality="multimodal", model="reader", clinical_penalty="fixed")}
#: The sceptic's baseline for the multimodal reader: its clinical penalty chosen on inner folds too.
CB_TUNED = "clinical + biomarkers (Cox, tuned)"
BASELINES = {"clinical (Cox)": dict(modality="clinical", model="coxph"), **book.BASELINE_RUNS}
NETWORKS = {"imaging ResNet-18 (book)": dict(modality="imaging"), "multimodal ResNet-18 (book)": dict(modality="multimodal")}


def evaluate_seed(s: book.BookSettings, networks: bool, n_boot: int) -> dict:
    """Every run and comparison of one cohort seed (see the module docstring)."""
    t0 = time.monotonic()
    weights = book.reader_weights(s)
    pretrain_seconds = time.monotonic() - t0
    specs = {**book.READER_RUNS, **SUPERSEDED, **BASELINES, **(NETWORKS if networks else {})}
    runs = {name: book.cv(s, **spec) for name, spec in specs.items()}
    folders = {name: run.out_dir for name, run in runs.items()}
    pairs = [(READER, b) for b in ("lesion count (Cox)", "biomarkers + CT density (Cox)")] + \
            [(MM_READER, b) for b in ("lesion count (Cox)", "clinical + biomarkers (Cox)", "biomarkers + CT density (Cox)",
                                      READER)] + \
            [(MM_READER, CB_TUNED), (MM_READER, MM_FIXED)]
    if networks:
        pairs += [(READER, "imaging ResNet-18 (book)"), (MM_READER, "multimodal ResNet-18 (book)"),
                  (MM_FIXED, "multimodal ResNet-18 (book)"), ("multimodal ResNet-18 (book)", CB_TUNED)]
    deltas = comparison.delta_table(folders, pairs, n_boot=n_boot, seed=s.seed)
    oof = runs[READER].oof.reset_index(drop=True)
    lesions = book.crops(s).lesions.astype({"patient_id": str})
    noise = noise_baseline(oof, lesions, runs[READER].config.aggregation, n_draws=200, seed=s.seed)
    oracle = oracle_c_index(load_truth(book.cohort(s).root), oof[["patient_id", "pfs_months", "event"]],
                            oof[["patient_id", "fold"]], n_boot=n_boot, seed=s.seed)
    recovered = truth_recovery(lesion_truth_table(runs[READER].oof_lesions, load_lesion_truth(book.cohort(s).root)),
                               n_boot=1000, seed=s.seed)
    meta = read_pretrained_meta(weights)
    fold_mean = {name: run.summary["fold_mean"] for name, run in runs.items()}
    imaging_oracle = oracle_c_index(load_truth(book.cohort(s).root), oof[["patient_id", "pfs_months", "event"]],
                                    oof[["patient_id", "fold"]], n_boot=1, part="imaging_part")
    fold_mean.update({"noise (sum): mean of 200": noise["mean"], "noise (sum): 95th pct": noise["p95"],
                      "oracle": oracle["fold_mean"], "oracle, imaging part": imaging_oracle["fold_mean"]})
    return {"seed": s.seed, "fold_mean": fold_mean, "deltas": deltas.to_dict("records"),
            "truth_recovery": recovered.reset_index().to_dict("records"),
            "necrosis_partial": float(recovered.loc["necrosis | volume, SUVmax", "spearman"]),
            "inner_penalizers": [str(n) for n in runs[MM_READER].fold_results["notes"]],
            "clinical_biomarker_inner_penalizers": [str(n) for n in runs[CB_TUNED].fold_results["notes"]],
            "reader": {"path": str(weights), "sha256": sha256_file(weights),
                       "seconds_to_get": round(pretrain_seconds, 1),
                       **{k: meta.get(k) for k in ("config", "n_train_lesions", "n_holdout_patients",
                                                   "holdout_reading_r", "data_checksum")}},
            "runs": {name: str(folder) for name, folder in folders.items()},
            "provenance": provenance(bench="book_reader", seed=s.seed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="cohort seeds (the book's: 0)")
    parser.add_argument("--profile", default="quick", choices=sorted(book.PROFILES))
    parser.add_argument("--weights", type=Path, default=None,
                        help="a psma-pfs pretrain file instead of the book's own reader (the same for every seed)")
    parser.add_argument("--networks", action="store_true",
                        help="also the book's imaging and multimodal ResNet-18 (trained if not cached)")
    parser.add_argument("--out", type=Path, default=Path("_build/bench/book_reader"))
    parser.add_argument("--n-boot", type=int, default=2000)
    args = parser.parse_args()
    tag = "book" if args.weights is None else f"w{sha256_file(args.weights)[:12]}"
    rows = []
    for seed in args.seeds:
        s = book.settings(profile=args.profile, seed=seed, reader_weights=args.weights)
        record = evaluate_seed(s, args.networks, args.n_boot)
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / f"{s.profile}-seed{seed}-{tag}.json", record)
        deltas = pd.DataFrame(record["deltas"])
        with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
            print(f"\nseed {seed}: fold-mean C " + ", ".join(f"{k} {v:.3f}" for k, v in record["fold_mean"].items()))
            print(deltas.drop(columns="p_value").to_string(index=False))
            print(f"reader: {record['reader']['n_train_lesions']} training lesions, held-out reading r "
                  + ", ".join(f"{k} {v:.3f}" for k, v in record["reader"]["holdout_reading_r"].items())
                  + f"; {record['reader']['seconds_to_get']:.0f} s to generate, crop and pretrain (0 when cached)")
            print(f"necrosis partial ρ of the imaging reader's lesion scores: {record['necrosis_partial']:.3f}")
        rows.append({"seed": seed, **record["fold_mean"],
                     **{f"Δ {r['comparison']}": r["delta"] for r in record["deltas"]},
                     "necrosis partial ρ": record["necrosis_partial"]})
    table = pd.DataFrame(rows)
    if len(table) > 1:
        summary = table.drop(columns="seed").agg(["mean", "sem"])
        table = pd.concat([table, summary.reset_index(names="seed")])
    with pd.option_context("display.width", 400, "display.max_columns", 40, "display.float_format", "{:.3f}".format):
        print("\n" + table.to_string(index=False))


if __name__ == "__main__":
    main()
