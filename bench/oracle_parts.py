"""How much the generator's clinical part can add to its imaging part (docs/METHOD.md, thirteenth round).

For each cohort seed, the default generator's outcome tables for the book's cohort size (stage 1
only, :func:`psma_lib.synthetic.sample_tables`: the same patients, outcomes and truth as the
rendered cohort of that seed, without images) are split into the book's folds, and the patients
are ranked by the true linear predictor, by its imaging part alone and by its clinical part
alone (:func:`psma_lib.analysis.oracle_c_index`). The fold-mean C of each is printed per seed
with the mean over seeds: the ceiling of an imaging-only model, of a clinical-only one, and what
a perfect reading of the clinical table adds to a perfect reading of the images. Seconds on a CPU.

Usage::

    .venv/bin/python bench/oracle_parts.py --seeds 0 1 2 3 4 5 6 7 8 9
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from psma_lib import book
from psma_lib.analysis import ORACLE_PARTS, oracle_c_index
from psma_lib.cv import make_folds
from psma_lib.io import write_json
from psma_lib.repro import provenance
from psma_lib.synthetic import sample_tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--profile", default="quick", choices=sorted(book.PROFILES))
    parser.add_argument("--out", type=Path, default=Path("_build/bench/oracle_parts.json"))
    args = parser.parse_args()
    s = book.settings(profile=args.profile)
    rows = []
    for seed in args.seeds:
        tables = sample_tables(s.patients, seed=seed)
        patients = tables.patients.astype({"patient_id": str})
        folds = make_folds(patients, s.folds, seed)
        rows.append({"seed": seed, **{part: oracle_c_index(tables.truth, patients, folds, n_boot=1, part=part)["fold_mean"]
                                      for part in ORACLE_PARTS}})
    table = pd.DataFrame(rows)
    table["clinical adds"] = table["linear_predictor"] - table["imaging_part"]
    summary = table.drop(columns="seed").agg(["mean", "sem", "min", "max"]).reset_index(names="seed")
    table = pd.concat([table, summary])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, {"profile": args.profile, "n_patients": s.patients, "folds": s.folds,
                          "rows": table.to_dict("records"), "provenance": provenance(bench="oracle_parts")})
    with pd.option_context("display.float_format", "{:.3f}".format, "display.width", 200):
        print(table.rename(columns=ORACLE_PARTS).to_string(index=False))


if __name__ == "__main__":
    main()
