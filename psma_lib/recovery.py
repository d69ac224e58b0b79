"""Does the network learn from the pixels? Lesion-level truth recovery and structural baselines.

A patient-level C-index cannot tell whether an imaging model reads the images or only counts
lesions: with ``sum`` aggregation a patient's risk is ``log sum_l exp(h_l)``, which for an
uninformative lesion output ``h`` is ``h + log(number of lesions)``. Two checks separate them:

* :func:`noise_baseline`: the C-index of **i.i.d. noise** lesion outputs passed through the same
  aggregation and folds (what the aggregation alone earns, e.g. through the lesion count).
* :func:`truth_recovery`: on a synthetic cohort, the Spearman correlation of the out-of-fold lesion
  log-hazards with each lesion's true log volume, log SUVmax, bone site and necrosis, with
  patient-bootstrap CIs, and the **partial** correlation with necrosis at fixed volume and SUVmax.
  Necrosis is in no table (only the pixels show it: a photopenic PET core, lytic bone on CT), so a
  partial correlation above 0 is evidence that the network reads image texture.

>>> lesions = pd.DataFrame({"patient_id": ["a", "a", "b", "c"], "lesion_id": ["1", "2", "3", "4"]})
>>> noise_risks(lesions, "sum", seed=0).index.tolist()
['a', 'b', 'c']
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from .metrics import fold_mean_c_index
from .models import aggregate_lesion_risks

TRUTH_TARGETS = ("log_volume", "log_suvmax", "bone", "necrosis")


def noise_risks(lesions: pd.DataFrame, aggregation: str = "sum", seed: int = 0) -> pd.Series:
    """Patient risks from i.i.d. standard-normal lesion outputs, aggregated like the network's.

    ``lesions``: one row per lesion with ``patient_id``. Returns a Series indexed by patient.
    """
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"patient_id": lesions["patient_id"].to_numpy(),
                          "log_hazard": rng.standard_normal(len(lesions))})
    return aggregate_lesion_risks(frame, aggregation)


def fold_mean_c(patients: pd.DataFrame, risk: pd.Series | np.ndarray) -> float:
    """:func:`psma_lib.metrics.fold_mean_c_index` of a patient table.

    ``patients``: ``patient_id, fold, pfs_months, event``; ``risk`` aligned with its rows, or a
    Series indexed by patient (e.g. a truth column or a per-patient feature).
    """
    r = risk.reindex(patients["patient_id"]).to_numpy() if isinstance(risk, pd.Series) else np.asarray(risk)
    return fold_mean_c_index(patients["pfs_months"].to_numpy(), patients["event"].to_numpy(), r,
                             patients["fold"].to_numpy())


def noise_baseline(patients: pd.DataFrame, lesions: pd.DataFrame, aggregation: str = "sum",
                   n_draws: int = 200, seed: int = 0) -> dict:
    """Fold-mean C of ``n_draws`` noise-output models (:func:`noise_risks`) on the same folds.

    Returns ``mean``, ``low``/``high`` (2.5/97.5 percentiles), ``p95`` and the draws: what an
    imaging network that learned nothing would score through this aggregation.
    """
    ss = np.random.SeedSequence(seed)
    draws = np.array([fold_mean_c(patients, noise_risks(lesions, aggregation, int(s.generate_state(1)[0])))
                      for s in ss.spawn(n_draws)])
    return {"mean": float(draws.mean()), "low": float(np.percentile(draws, 2.5)),
            "high": float(np.percentile(draws, 97.5)), "p95": float(np.percentile(draws, 95)),
            "draws": draws}


def structural_baselines(oof: pd.DataFrame, lesions: pd.DataFrame, aggregation: str = "sum",
                         n_draws: int = 200, seed: int = 0) -> dict:
    """What a run's folds give without reading any image: fold-mean C of log(lesion count) and
    the :func:`noise_baseline` of the run's aggregation.

    ``oof``: the run's ``oof_predictions`` (``patient_id, fold, pfs_months, event``);
    ``lesions``: its lesion table (``patient_id``). Returns ``{"log_count": C, "noise": {...}}``.
    """
    oof = oof.reset_index(drop=True)
    lesions = lesions.assign(patient_id=lesions["patient_id"].astype(str))
    log_count = np.log(lesions.groupby("patient_id").size())
    return {"log_count": fold_mean_c(oof, log_count),
            "noise": noise_baseline(oof, lesions, aggregation, n_draws=n_draws, seed=seed)}


def true_lesion_properties(lesion_truth: pd.DataFrame) -> pd.DataFrame:
    """:data:`TRUTH_TARGETS` of each lesion of ``lesion_truth`` (``volume_ml``, ``suvmax_true``,
    ``site``, ``necrosis``; ``truth/lesion_truth.csv`` or the lesion table of
    :func:`psma_lib.synthetic.sample_tables`), rows in its order (index reset).

    >>> true_lesion_properties(pd.DataFrame({"volume_ml": [1.0], "suvmax_true": [np.e], "site": ["bone"],
    ...                                      "necrosis": [0.5]})).iloc[0].tolist()
    [0.0, 1.0, 1.0, 0.5]
    """
    return pd.DataFrame({
        "log_volume": np.log(lesion_truth["volume_ml"].to_numpy(float)),
        "log_suvmax": np.log(lesion_truth["suvmax_true"].to_numpy(float)),
        "bone": (lesion_truth["site"] == "bone").to_numpy(float),
        "necrosis": lesion_truth["necrosis"].to_numpy(float),
    })[list(TRUTH_TARGETS)]


def lesion_truth_table(oof_lesions: pd.DataFrame, lesion_truth: pd.DataFrame) -> pd.DataFrame:
    """Out-of-fold lesion log-hazards beside each lesion's true properties.

    ``oof_lesions``: ``patient_id, lesion_id, log_hazard`` (``oof_lesion_predictions.csv``);
    ``lesion_truth``: ``truth/lesion_truth.csv`` (``volume_ml``, ``suvmax_true``, ``site``,
    ``necrosis``). Returns ``patient_id, lesion_id, log_hazard`` + :data:`TRUTH_TARGETS`.
    """
    truth = lesion_truth.set_index(lesion_truth["lesion_id"].astype(str))
    missing = sorted(set(oof_lesions["lesion_id"].astype(str)) - set(truth.index))
    if missing:
        raise KeyError(f"lesions without truth: {missing[:5]}")
    properties = true_lesion_properties(truth.loc[oof_lesions["lesion_id"].astype(str)])
    return pd.DataFrame({
        "patient_id": oof_lesions["patient_id"].astype(str).to_numpy(),
        "lesion_id": oof_lesions["lesion_id"].astype(str).to_numpy(),
        "log_hazard": oof_lesions["log_hazard"].to_numpy(float),
        **{name: properties[name].to_numpy() for name in TRUTH_TARGETS},
    })


def _rank_columns(x: np.ndarray) -> np.ndarray:
    return np.column_stack([rankdata(col) for col in x.T])


def _spearman_all(h: np.ndarray, targets: np.ndarray, control: np.ndarray) -> np.ndarray:
    """Spearman of ``h`` with each target column, then partial Spearman with the last target
    (necrosis) given the ``control`` columns (ranks regressed out, residuals correlated)."""
    rh, rt, rc = rankdata(h), _rank_columns(targets), _rank_columns(control)
    out = [np.corrcoef(rh, rt[:, j])[0, 1] for j in range(rt.shape[1])]
    design = np.column_stack([np.ones(len(h)), rc])
    resid = lambda y: y - design @ np.linalg.lstsq(design, y, rcond=None)[0]  # noqa: E731
    out.append(np.corrcoef(resid(rh), resid(rt[:, -1]))[0, 1])
    return np.array(out)


def truth_recovery(table: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Spearman correlations of lesion log-hazards with the true lesion properties, with CIs.

    ``table``: :func:`lesion_truth_table`. Rows: each of :data:`TRUTH_TARGETS`, then
    ``necrosis | volume, SUVmax`` (partial Spearman: ranks of the log-hazard and of necrosis with
    the ranks of log volume and log SUVmax regressed out). CIs: percentile bootstrap over
    **patients** (a patient's lesions are resampled together, as they are not independent).

    >>> rng = np.random.default_rng(0)
    >>> t = pd.DataFrame({"patient_id": np.repeat(np.arange(40), 3), "log_volume": rng.normal(size=120),
    ...                   "log_suvmax": rng.normal(size=120), "bone": rng.integers(0, 2, 120),
    ...                   "necrosis": rng.random(120)})
    >>> t["log_hazard"] = t["necrosis"] + 0.1 * rng.normal(size=120)
    >>> r = truth_recovery(t, n_boot=200)
    >>> bool(r.loc["necrosis | volume, SUVmax", "ci_low"] > 0.5)
    True
    """
    h = table["log_hazard"].to_numpy(float)
    targets = table[list(TRUTH_TARGETS)].to_numpy(float)
    control = table[["log_volume", "log_suvmax"]].to_numpy(float)
    estimate = _spearman_all(h, targets, control)
    groups = table["patient_id"].astype(str).to_numpy()
    ids, inverse = np.unique(groups, return_inverse=True)
    rows_of = [np.flatnonzero(inverse == i) for i in range(len(ids))]
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        rows = np.concatenate([rows_of[i] for i in rng.integers(0, len(ids), len(ids))])
        boots.append(_spearman_all(h[rows], targets[rows], control[rows]))
    boots = np.array(boots)
    names = [*TRUTH_TARGETS, "necrosis | volume, SUVmax"]
    return pd.DataFrame({"spearman": estimate, "ci_low": np.nanpercentile(boots, 2.5, axis=0),
                         "ci_high": np.nanpercentile(boots, 97.5, axis=0)}, index=pd.Index(names, name="truth"))
