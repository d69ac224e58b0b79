"""What do the images add? Models compared on the same patients and folds, from finished CV runs.

Every function here reads the outputs of :func:`psma_lib.cv.run_cv` (``oof_predictions.csv``:
each patient's out-of-fold risk from the fold model that never saw them; ``train_predictions.csv``:
the risks the same fold model gave its own training patients) and fits nothing but what a
training fold allows:

* :func:`model_summary` -- the headline figure of a run: the **fold mean** of the patient-level
  C-index with a bootstrap CI (patients resampled within their fold), beside a pooled C of risks
  **standardised by each fold's training-patient distribution** (raw pooled risks of five separately
  trained models live on five scales).
* :func:`delta_table` -- ΔC between two models on the same patients with a paired bootstrap CI and
  p-value (the same resamples for both models; :func:`psma_lib.metrics.paired_bootstrap_delta_c`).
* :func:`survival_metrics` -- beyond Harrell's C: Uno's C (τ = 36 months), time-dependent AUC at
  12/24/36 months and the integrated Brier score, from a Breslow baseline hazard fitted on each
  training fold (scikit-survival), averaged over folds.
* :func:`calibration` -- predicted vs Kaplan-Meier PSA-PFS at 24 months by risk group.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .metrics import (
    DeltaC,
    TimeRangeWarning,
    bootstrap_fold_mean_c,
    breslow_survival,
    calibration_table,
    integrated_brier_score,
    paired_bootstrap_delta_c,
    standardise_by_training,
    time_dependent_auc,
    uno_c,
)

AUC_TIMES = (12.0, 24.0, 36.0)
UNO_TAU = 36.0
CALIBRATION_MONTHS = 24.0


def read_run(run_dir: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(oof, train)`` of a CV run: out-of-fold risks and training-patient risks per fold, each
    with ``patient_id, fold, risk, pfs_months, event``."""
    run_dir = Path(run_dir)
    oof = pd.read_csv(run_dir / "oof_predictions.csv", dtype={"patient_id": str})
    train = pd.read_csv(run_dir / "train_predictions.csv", dtype={"patient_id": str})
    outcome = oof.set_index("patient_id")[["pfs_months", "event"]]
    train = train.join(outcome, on="patient_id")
    return oof.sort_values("patient_id").reset_index(drop=True), train


def standardised_oof(oof: pd.DataFrame, train: pd.DataFrame) -> pd.Series:
    """Each out-of-fold risk in sd units of its fold model's training-patient risks."""
    out = pd.Series(np.nan, index=oof.index)
    for k, g in oof.groupby("fold"):
        out[g.index] = standardise_by_training(g["risk"].to_numpy(), train.loc[train["fold"] == k, "risk"].to_numpy())
    return out


def model_summary(run_dir: str | os.PathLike, n_boot: int = 2000, seed: int = 0) -> dict:
    """Fold-mean C with its CI, fold range, and pooled C of training-standardised risks."""
    from .evaluation import concordance_index

    oof, train = read_run(run_dir)
    c, lo, hi = bootstrap_fold_mean_c(oof["pfs_months"], oof["event"], oof["risk"], oof["fold"], n_boot, seed)
    per_fold = [concordance_index(g["pfs_months"], g["risk"], g["event"]) for _, g in oof.groupby("fold")]
    pooled = concordance_index(oof["pfs_months"], standardised_oof(oof, train), oof["event"])
    return {"fold_mean": c, "ci_low": lo, "ci_high": hi, "fold_min": min(per_fold), "fold_max": max(per_fold),
            "pooled_standardised": pooled, "n_patients": len(oof)}


def summary_table(runs: Mapping[str, str | os.PathLike], n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """:func:`model_summary` of each named run, one row per model (in the given order)."""
    return pd.DataFrame([{"model": name, **model_summary(d, n_boot, seed)} for name, d in runs.items()])


def delta_table(runs: Mapping[str, str | os.PathLike], pairs: Sequence[tuple[str, str]],
                n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """ΔC (fold mean of per-fold differences) of each pair ``(a, b)`` of named runs, paired bootstrap.

    The runs must hold the same patients in the same folds (one ``run_cv`` seed and cohort).
    """
    rows = []
    for a, b in pairs:
        oof_a, oof_b = read_run(runs[a])[0], read_run(runs[b])[0]
        if not (oof_a["patient_id"].equals(oof_b["patient_id"]) and oof_a["fold"].equals(oof_b["fold"])):
            raise ValueError(f"runs {a!r} and {b!r} do not share patients and folds")
        d = paired_bootstrap_delta_c(oof_a["pfs_months"], oof_a["event"], oof_a["risk"], oof_b["risk"],
                                     n_boot=n_boot, seed=seed, folds=oof_a["fold"])
        rows.append(delta_row(f"{a} − {b}", d))
    return pd.DataFrame(rows)


def delta_row(comparison: str, d: DeltaC) -> dict:
    """One row of :func:`delta_table` from a paired ΔC (``comparison, c_a, c_b, delta, ci_low,
    ci_high, p_value``)."""
    return {"comparison": comparison, "c_a": d.c_a, "c_b": d.c_b, "delta": d.delta,
            "ci_low": d.lo, "ci_high": d.hi, "p_value": d.p_value}


def _fold_survival(oof: pd.DataFrame, train: pd.DataFrame, k, times) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    test, fit = oof[oof["fold"] == k], train[train["fold"] == k]
    surv = breslow_survival(fit["risk"], fit["pfs_months"], fit["event"], test["risk"], times)
    return test, fit, surv


def survival_metrics(run_dir: str | os.PathLike, tau: float = UNO_TAU,
                     auc_times: Sequence[float] = AUC_TIMES) -> pd.DataFrame:
    """Per fold and mean: Uno's C (τ), time-dependent AUC at ``auc_times`` and the integrated
    Brier score over [3, 36] months (Breslow survival fitted on the fold's training patients)."""
    oof, train = read_run(run_dir)
    grid = np.linspace(3.0, max(auc_times), 12)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TimeRangeWarning)  # NaN marks an unsupported time
        for k in sorted(oof["fold"].unique()):
            test, fit, surv = _fold_survival(oof, train, k, grid)
            args = (fit["pfs_months"], fit["event"], test["pfs_months"], test["event"])
            auc = time_dependent_auc(*args, test["risk"], auc_times)
            try:
                ibs = integrated_brier_score(*args, surv, grid)
            except Exception:  # too few usable times in a small fold
                ibs = np.nan
            rows.append({"fold": k, "uno_c": uno_c(*args, test["risk"], tau=tau),
                         **{f"auc_{t:g}": float(a) for t, a in zip(auc_times, auc, strict=True)},
                         "ibs": ibs})
    table = pd.DataFrame(rows)
    mean = table.drop(columns="fold").mean().to_dict()
    return pd.concat([table, pd.DataFrame([{"fold": "mean", **mean}])], ignore_index=True)


def calibration(run_dir: str | os.PathLike, t: float = CALIBRATION_MONTHS, groups: int = 3) -> pd.DataFrame:
    """Predicted vs observed PSA-PFS at ``t`` months by risk group, over all test patients; each
    patient's predicted S(t) comes from their fold model's Breslow baseline (training fold)."""
    oof, train = read_run(run_dir)
    pred = pd.Series(np.nan, index=oof.index)
    for k in sorted(oof["fold"].unique()):
        test, _, surv = _fold_survival(oof, train, k, [t])
        pred[test.index] = surv[:, 0]
    return calibration_table(pred.to_numpy(), oof["pfs_months"], oof["event"], t=t, groups=groups)
