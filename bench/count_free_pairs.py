"""Paired ΔC of a method candidate against the default on count-free cohorts already run.

``bench/count_free.py`` records each variant's fold-mean C per seed; a decision between two
variants also needs the difference on the same patients and folds with its paired bootstrap CI.
This reads the two variants' run folders (``cv-seed<S>-<E>ep-<variant>`` under ``--root``) and
prints :func:`psma_lib.comparison.delta_table` per seed: nothing is trained or generated.

    python bench/count_free_pairs.py --seeds 22 23 24 25 \
        --candidate orthogonal-aux-log_suvmax-log_volume-log_suvmean_ratio-bone-stem_no-maxpool \
        --baseline orthogonal-aux-log_suvmax-log_volume-log_suvmean_ratio-bone

The folder suffixes are :func:`count_free.variant_name`'s; ``--baseline`` defaults to today's
default configuration, so a decision made against an earlier default names that one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
from count_free import variant_name  # noqa: E402

from psma_lib.comparison import delta_table  # noqa: E402
from psma_lib.cv import CVConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", required=True)
    parser.add_argument("--candidate", required=True, help="the candidate's run-folder suffix (variant name)")
    parser.add_argument("--baseline", default=variant_name(CVConfig()), help="default: the default's variant")
    parser.add_argument("--epochs", type=int, default=CVConfig().epochs)
    parser.add_argument("--root", type=Path, default=Path("_build/bench/count_free"))
    args = parser.parse_args()
    tables = []
    for seed in args.seeds:
        runs = {name: args.root / f"cv-seed{seed}-{args.epochs}ep-{suffix}"
                for name, suffix in (("candidate", args.candidate), ("baseline", args.baseline))}
        tables.append(delta_table(runs, [("candidate", "baseline")], seed=seed).assign(seed=seed))
    table = pd.concat(tables, ignore_index=True)
    print(f"{args.candidate} − {args.baseline}: fold-mean ΔC, paired bootstrap 95 % CI (patients resampled "
          f"within folds)")
    print(table[["seed", "c_a", "c_b", "delta", "ci_low", "ci_high", "p_value"]].to_string(
        index=False, float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()
