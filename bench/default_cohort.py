"""The book's ResNet-18 runs on its default cohort, and on other draws of the same generator.

The book's headline comparison (chapter 6: do the images add to counting lesions?) is made on one
cohort with one configuration. This runs the same comparison, with the `quick` (or any) profile's
cohort, crops, folds and settings, in two directions:

* ``--stem`` / ``--epochs`` / ``--lesion-inputs`` / ``--pretrain-seed``: the profile's imaging and
  multimodal ResNet-18 with one setting changed (e.g. the library's default stem, which the CPU
  profiles do not use for its cost, the lesions' measured quantities added linearly to their
  log-hazards, or an encoder pretrained to read those quantities on another cohort's lesions,
  ``psma-pfs pretrain``), paired against the book's own runs (``--modalities imaging`` trains the
  imaging one alone);
* ``--seed S``: another cohort of the default generator (the book's is seed 0), so a figure can be
  judged as typical of the generator or as one lucky draw.

It prints, on the same patients and folds (fold mean of the patient-level C-index, bootstrap CIs
with patients resampled within folds): the imaging and multimodal runs, the lesion-count Cox model,
the PSMA PET biomarkers (+ CT density) Cox models, a noise output per lesion through the runs'
aggregation (mean and 95th percentile of 200 draws) and the oracle (true linear predictor); paired
ΔC of the runs against the count baseline, the strongest Cox baseline and (for a variant) the
book's runs (issue 7's item 4: imaging − count ≥ 0.03, multimodal ≥ 0.77); the lesion-level truth
recovery of the imaging run (Spearman with the true lesion properties; necrosis partial given
volume and SUVmax) and, with ``--lesion-inputs``, of the network's part of its lesion scores alone
(the log-hazard less the linear term in the measured quantities). ``--table`` prints one row per
seed of a variant already run.

Usage (the book's runs are read back from ``make book``'s results folder, or computed there:
about 7 minutes per new cohort seed on 2 CPU cores; a variant adds its own runs, e.g. about 14
minutes for the two ``--stem no-maxpool`` ones)::

    .venv/bin/python bench/default_cohort.py --stem no-maxpool        # the book's cohort, seed 0
    .venv/bin/python bench/default_cohort.py --seed 1                 # another draw, the book's runs
    .venv/bin/python bench/default_cohort.py --table                  # one row per seed so far
    .venv/bin/python bench/default_cohort.py --seed 1 --modalities imaging --lesion-inputs \
log_suvmax,log_volume,log_suvmean_ratio,bone,hu_mean               # ninth round (docs/METHOD.md)
    .venv/bin/python bench/default_cohort.py --patients 300            # a larger draw (records -n300)
    .venv/bin/python bench/default_cohort.py --seed 1 --modalities imaging --pretrain-seed 1000  # tenth round
    .venv/bin/python bench/default_cohort.py --seed 1 --modalities imaging --pretrain-seed 1000 \
--freeze-encoder --head concepts                                  # eleventh round

Every run is cached in the book's results folder under its own configuration key (the book never
reads a run of a configuration it does not use); a record per seed and variant goes to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import pandas as pd

from psma_lib import book, comparison, pipeline
from psma_lib.analysis import oracle_c_index
from psma_lib.io import write_json
from psma_lib.metrics import paired_bootstrap_delta_c
from psma_lib.models import aggregate_lesion_risks
from psma_lib.pretrain import PretrainConfig, read_pretrained_meta
from psma_lib.recovery import lesion_truth_table, noise_baseline, truth_recovery
from psma_lib.repro import provenance
from psma_lib.synthetic import load_lesion_truth, load_truth
from psma_lib.vocabulary import RISK_HEADS, STEMS

BASELINES = {"lesion count (Cox)": "count", "biomarkers (Cox)": "biomarkers",
             "biomarkers + CT density (Cox)": "biomarkers+ct"}
TABLE_PART = "its linear term in the measured quantities alone"
SHORT = {"lesion count": "count", "biomarkers + CT density": "bio+CT", "imaging": "book", "multimodal": "book",
         TABLE_PART: "linear term"}
NOISE_MEAN, NOISE_P95 = "noise through the aggregation: mean of 200", "noise through the aggregation: 95th pct"


def variant_name(changes: dict) -> str:
    """File and label suffix of the fields changed from the book's run: ``book`` for none.

    >>> variant_name({}), variant_name({"stem": "no-maxpool", "epochs": 10})
    ('book', 'stem_no-maxpool-epochs_10')
    >>> variant_name({"lesion_inputs": "log_suvmax,bone"})
    'lesion_inputs_log_suvmax+bone'
    """
    return "-".join(f"{k}_{str(v).replace(',', '+')}" for k, v in changes.items()) or "book"


def record_prefix(profile: str, patients: int, profile_patients: int) -> str:
    """Record file prefix: the profile, and the cohort size where it is not the profile's.

    >>> record_prefix("quick", 99, 99), record_prefix("quick", 300, 99)
    ('default_cohort-quick', 'default_cohort-quick-n300')
    """
    return f"default_cohort-{profile}" + (f"-n{patients}" if patients != profile_patients else "")


def seed_table(out: Path, prefix: str, variant: str) -> pd.DataFrame:
    """One row per cohort seed recorded in ``out`` for ``profile`` and ``variant`` (read back,
    nothing recomputed): the baselines', the networks' and the oracle's fold-mean C, each network's
    ΔC to the count baseline (and, for a variant, to the book's run) with its paired CI, and the
    necrosis partial correlation."""
    rows = []
    for path in sorted(out.glob(f"{prefix}-seed*-{variant}.json")):
        record = json.loads(path.read_text())
        c = {r["model"]: r["fold_mean"] for r in record["summary"]}
        row = {"seed": int(path.stem.split("-seed")[1].split("-")[0]), "count": c["lesion count (Cox)"],
               "biomarkers + CT": c["biomarkers + CT density (Cox)"],
               "noise p95": c.get(NOISE_P95), "linear term": c.get(TABLE_PART), "imaging": c[f"imaging ({variant})"],
               "multimodal": c.get(f"multimodal ({variant})"), "oracle": c.get("oracle (true linear predictor)")}
        for d in record["deltas"]:
            a, b = d["comparison"].split(" − ")
            if b in ("lesion count (Cox)", "biomarkers + CT density (Cox)", "imaging (book)", "multimodal (book)",
                     TABLE_PART):
                name = f"{a.split(' (')[0]} − {SHORT[b.split(' (')[0]]}"
                row[name] = d["delta"]
                row[f"{name} 95 % CI"] = f"({d['ci_low']:+.3f}, {d['ci_high']:+.3f})"
        for key, label in (("truth_recovery", "necrosis"), ("truth_recovery_network_part", "network part: necrosis")):
            necrosis = [r for r in record.get(key) or [] if r["truth"] == "necrosis | volume, SUVmax"]
            if necrosis:
                row[f"{label} partial ρ"] = necrosis[0]["spearman"]
                row[f"{label} 95 % CI"] = f"({necrosis[0]['ci_low']:+.3f}, {necrosis[0]['ci_high']:+.3f})"
        rows.append(row)
    if not rows:
        raise SystemExit(f"no records {prefix}-seed*-{variant}.json in {out}")
    table = pd.DataFrame(rows).sort_values("seed")
    means = table.mean(numeric_only=True).drop("seed")
    return pd.concat([table, pd.DataFrame([{"seed": "mean", **means}])], ignore_index=True).fillna("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="quick", choices=sorted(book.PROFILES))
    parser.add_argument("--stem", default=None, choices=STEMS, help="the ResNets' stem (default: the book's)")
    parser.add_argument("--epochs", type=int, default=None, help="the ResNets' epochs (default: the book's)")
    parser.add_argument("--lesion-inputs", default=None,
                        help="measured lesion quantities added linearly to the lesions' log-hazards "
                             "(default: the book's, none)")
    parser.add_argument("--pretrain-seed", type=int, default=None,
                        help="start the ResNets from an encoder pretrained (psma-pfs pretrain) on the measured "
                             "quantities of another cohort of the default generator, drawn with this seed "
                             "(default: the book's, from scratch; tenth round, docs/METHOD.md)")
    parser.add_argument("--pretrain-patients", type=int, default=400, help="the pretraining cohort's size")
    parser.add_argument("--pretrain-epochs", type=int, default=PretrainConfig.epochs, help="pretraining epochs")
    parser.add_argument("--freeze-encoder", action="store_true",
                        help="keep the pretrained encoder fixed, train the heads only (with --pretrain-seed; "
                             "eleventh round)")
    parser.add_argument("--head", default=None, choices=RISK_HEADS, help="the ResNets' risk head (default: the book's)")
    parser.add_argument("--modalities", default="imaging,multimodal",
                        help="the ResNets to train with the change (comma-separated; default both)")
    parser.add_argument("--seed", type=int, default=0, help="cohort and fold seed (the book's: 0)")
    parser.add_argument("--patients", type=int, default=None,
                        help="cohort size (default: the profile's; another size records under -n<patients>)")
    parser.add_argument("--output", default=None, help="the book's results folder (default: the profile's)")
    parser.add_argument("--out", type=Path, default=Path("_build/bench/default_cohort"))
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--table", action="store_true",
                        help="train nothing: one row per cohort seed of this variant already recorded in --out")
    args = parser.parse_args()

    s = book.settings(profile=args.profile, output_dir=args.output, seed=args.seed, patients=args.patients)
    prefix = record_prefix(s.profile, s.patients, book.PROFILES[s.profile].patients)
    book_config = book.cv_config(s, "imaging")
    changes = {k: v for k, v in (("stem", args.stem), ("epochs", args.epochs), ("lesion_inputs", args.lesion_inputs),
                                 ("head", args.head))
               if v is not None and v != getattr(book_config, k)}
    modalities = [m.strip() for m in args.modalities.split(",") if m.strip()]
    if not modalities or set(modalities) - {"imaging", "multimodal"}:
        raise SystemExit(f"--modalities: imaging and/or multimodal, not {args.modalities!r}")
    if args.pretrain_seed is not None:
        if args.pretrain_seed == s.seed:
            raise SystemExit("--pretrain-seed must differ from --seed: the pretraining cohort is another cohort")
        changes["pretrained"] = f"s{args.pretrain_seed}-n{args.pretrain_patients}-e{args.pretrain_epochs}"
        if args.freeze_encoder:
            changes["frozen"] = "encoder"
    elif args.freeze_encoder:
        raise SystemExit("--freeze-encoder keeps a pretrained encoder fixed: give --pretrain-seed")
    variant = variant_name(changes)
    if args.table:
        with pd.option_context("display.width", 300, "display.max_columns", 30,
                               "display.float_format", "{:.3f}".format):
            print(seed_table(args.out, prefix, variant).to_string(index=False))
        return

    crops = book.crops(s)
    config_changes = {k: v for k, v in changes.items() if k not in ("pretrained", "frozen")}
    if "frozen" in changes:
        config_changes["freeze_encoder"] = True
    if args.pretrain_seed is not None:  # an encoder pretrained on another cohort's lesions (no outcome read)
        start = time.perf_counter()
        config_changes["weights"] = str(book.pretrained_encoder(
            s, seed=args.pretrain_seed, patients=args.pretrain_patients, epochs=args.pretrain_epochs))
        pretrain_seconds = round(time.perf_counter() - start, 1)
        print(f"pretrained encoder {config_changes['weights']} ({pretrain_seconds} s, 0: read back); held-out "
              f"reading r: {read_pretrained_meta(config_changes['weights'])['holdout_reading_r']}")
    runs, seconds = {}, {}
    for name, covariates in BASELINES.items():
        runs[name] = book.cv(s, "clinical", model="coxph", covariates=covariates)
    for modality in modalities:
        start = time.perf_counter()
        runs[f"{modality} (book)"] = book.cv(s, modality)
        if changes:
            start = time.perf_counter()
            config = dataclasses.replace(book.cv_config(s, modality), **config_changes)
            runs[f"{modality} ({variant})"] = pipeline.run_cv(crops, s.output_dir, config)
        seconds[modality] = round(time.perf_counter() - start, 1)
    folders = {name: run.out_dir for name, run in runs.items()}

    summary = comparison.summary_table(folders, n_boot=args.n_boot, seed=s.seed)
    oof = runs["lesion count (Cox)"].oof
    noise = noise_baseline(oof.reset_index(drop=True), crops.lesions.astype({"patient_id": str}),
                           book_config.aggregation, n_draws=200, seed=s.seed)
    summary.loc[len(summary), ["model", "fold_mean"]] = [NOISE_MEAN, noise["mean"]]
    summary.loc[len(summary), ["model", "fold_mean"]] = [NOISE_P95, noise["p95"]]
    if crops.synthetic:
        truth = load_truth(book.cohort(s).root)
        oracle = oracle_c_index(truth, oof[["patient_id", "pfs_months", "event"]], oof[["patient_id", "fold"]],
                                n_boot=args.n_boot, seed=s.seed)
        summary.loc[len(summary), ["model", "fold_mean", "fold_min", "fold_max"]] = [
            "oracle (true linear predictor)", oracle["fold_mean"], oracle["fold_min"], oracle["fold_max"]]
    read = f"{modalities[0]} ({variant})"  # whose lesion scores the truth recovery reads
    pairs = [(f"{m} ({variant})", baseline) for m in modalities
             for baseline in ("lesion count (Cox)", "biomarkers + CT density (Cox)")]
    if changes:
        pairs += [(f"{m} ({variant})", f"{m} (book)") for m in modalities]
    deltas = comparison.delta_table(folders, pairs, n_boot=args.n_boot, seed=s.seed)
    for m in modalities:  # with lesion inputs: the run against its own linear term alone (the table's part)
        run = runs[f"{m} ({variant})"]
        if "input_term" in run.oof_lesions:
            oof_m = run.oof.sort_values("patient_id").reset_index(drop=True)
            table_part = aggregate_lesion_risks(run.oof_lesions, run.config.aggregation, column="input_term")
            d = paired_bootstrap_delta_c(oof_m["pfs_months"], oof_m["event"], oof_m["risk"],
                                         table_part.loc[oof_m["patient_id"]].to_numpy(), n_boot=args.n_boot,
                                         seed=s.seed, folds=oof_m["fold"])
            if m == modalities[0]:
                summary.loc[len(summary), ["model", "fold_mean"]] = [TABLE_PART, d.c_b]
            deltas.loc[len(deltas)] = comparison.delta_row(f"{m} ({variant}) − {TABLE_PART}", d)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.3f}".format):
        print(f"\nprofile {s.profile}, cohort seed {s.seed}, {len(oof)} patients, {s.folds} folds; the book's "
              f"ResNets: {book_config.epochs} epochs, {book_config.stem} stem; variant: {variant}; "
              f"training (0: read back): {seconds} s\n")
        print(summary.to_string(index=False), "\n")
        print(deltas.to_string(index=False), "\n")
        recovered = network_part = None
        if crops.synthetic:
            lesion_truth = load_lesion_truth(book.cohort(s).root)
            scores = runs[read].oof_lesions
            recovered = truth_recovery(lesion_truth_table(scores, lesion_truth), n_boot=1000, seed=s.seed)
            print(f"lesion truth recovery of {read}:\n{recovered.to_string()}\n")
            if "input_term" in scores:  # what the network adds to the linear term in the measured quantities
                network = scores.assign(log_hazard=scores["log_hazard"] - scores["input_term"])
                network_part = truth_recovery(lesion_truth_table(network, lesion_truth), n_boot=1000, seed=s.seed)
                print(f"lesion truth recovery of {read}, the network's part alone:\n{network_part.to_string()}\n")

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{prefix}-seed{s.seed}-{variant}.json"
    write_json(path, {"summary": summary.to_dict("records"), "deltas": deltas.to_dict("records"),
                      "truth_recovery": None if recovered is None else recovered.reset_index().to_dict("records"),
                      "truth_recovery_network_part": None if network_part is None
                      else network_part.reset_index().to_dict("records"),
                      "train_seconds": seconds, "changes": changes,
                      "pretrained": read_pretrained_meta(config_changes["weights"]) if "weights" in config_changes
                      else None, "runs": {k: str(v) for k, v in folders.items()},
                      "provenance": provenance(bench="default_cohort")})
    print(f"written {path}")


if __name__ == "__main__":
    main()
