"""Survival evaluation: C-index and its summaries, leakage-free risk groups, Kaplan-Meier, Cox HRs.

Conventions (``docs/ARCHITECTURE.md``): times in months, ``event = 1`` = PSA progression
observed, ``risk`` is a log-hazard (higher = shorter expected PFS). Every function here is
patient-level and uses numpy/pandas/lifelines only (no torch).

Main entry points:

* :func:`concordance_index`, :func:`bootstrap_cindex` - Harrell's C and its percentile CI.
* :func:`summarize_cv` - the paper's statistic (min-max over the folds), mean +- sd over folds,
  and the pooled out-of-fold C-index with a bootstrap 95 % CI (stored by ``psma_lib.cv`` in each
  run's ``results.json``).
* :func:`assign_risk_groups` - high/low risk split at the median of each fold's *training*
  patients' risks, so no test-fold information sets the cutoff.
* :func:`km_summary`, :func:`km_curves`, :func:`at_risk_counts`, :func:`logrank` - Kaplan-Meier.
* :func:`cox_hazard_ratios` - descriptive multivariable Cox hazard ratios.

Formatting (Table 1, the book's tables) lives in :mod:`psma_lib.report`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import logrank_test, multivariate_logrank_test
from lifelines.utils import median_survival_times

from .errors import InputError

OOF_COLUMNS = ("patient_id", "fold", "risk", "pfs_months", "event")
TRAIN_PREDICTION_COLUMNS = ("fold", "patient_id", "risk")


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _vector(values, name: str, n: int | None = None) -> np.ndarray:
    """1-D float array; InputError if it is not 1-D, has the wrong length or is not finite."""
    arr = np.asarray(values, dtype=float)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.ravel()
    if arr.ndim != 1:
        raise InputError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise InputError(f"{name} has {arr.shape[0]} values, expected {n}")
    if not np.isfinite(arr).all():
        raise InputError(f"{name} contains {int((~np.isfinite(arr)).sum())} missing or non-finite value(s)")
    return arr


def _survival_arrays(time, event) -> tuple[np.ndarray, np.ndarray]:
    """Validated (time > 0, event in {0, 1} as bool) arrays."""
    time = _vector(time, "time")
    event = _vector(event, "event", len(time))
    if (time <= 0).any():
        raise InputError(f"time must be > 0 months; {int((time <= 0).sum())} value(s) are not")
    if not np.isin(event, (0, 1)).all():
        raise InputError("event must be 0 (censored) or 1 (progression)")
    return time, event.astype(bool)


def _numeric_column(df: pd.DataFrame, column: str) -> pd.Series:
    """``df[column]`` as float (empty cells -> NaN); InputError naming the column if not numeric."""
    try:
        return pd.to_numeric(df[column], errors="raise").astype(float)
    except (TypeError, ValueError) as exc:
        raise InputError(f"column {column!r} must be numeric ({exc})") from None


def _require_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{what} lacks column(s) {', '.join(missing)}")


def _check_oof(oof: pd.DataFrame, what: str = "out-of-fold predictions") -> None:
    """Columns present, one row per patient (patient-level), outcome and risk valid."""
    _require_columns(oof, OOF_COLUMNS, what)
    duplicated = oof["patient_id"][oof["patient_id"].duplicated()].unique()
    if len(duplicated):
        raise InputError(f"{what}: appears more than once (patient-level table expected)", patient=str(duplicated[0]))
    _survival_arrays(oof["pfs_months"], oof["event"])
    _vector(oof["risk"], f"{what}: risk")


# --------------------------------------------------------------------------------------------
# Concordance
# --------------------------------------------------------------------------------------------


_ROW_BLOCK = 1024  # rows of the pair matrices built at once: memory O(1024 n)
_MAX_BOOTSTRAP_N = 5000  # the bootstrap keeps two [n, n] float64 matrices (400 MB at 5000)


def _pair_matrices(
    time: np.ndarray, risk: np.ndarray, event: np.ndarray, rows: slice = slice(None)
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``rows`` of the ``[n, n]`` comparable-pair and score matrices (row i = earlier event).

    Pair (i, j) is comparable when i had the event and either ``t_i < t_j`` or ``t_i == t_j``
    with j censored (censored at the event time = still at risk), as in lifelines; two events
    at the same time are not comparable. Its score is 1 if ``risk_i > risk_j``, 0.5 if equal.
    """
    t_i, r_i, e_i = time[rows, None], risk[rows, None], event[rows, None]
    comparable = e_i & ((t_i < time[None, :]) | ((t_i == time[None, :]) & ~event[None, :]))
    score = comparable * ((r_i > risk[None, :]) + 0.5 * (r_i == risk[None, :]))
    return comparable.astype(float), score


def concordance_index(time, risk, event) -> float:
    """Harrell's C-index: the fraction of comparable pairs whose earlier event has the higher risk.

    Args:
        time: ``[n]`` follow-up in months (> 0).
        risk: ``[n]`` predicted log-hazard (higher = shorter expected PFS).
        event: ``[n]`` 1 = progression observed, 0 = censored.

    Ties in risk count 0.5; tied times are handled as ``lifelines.utils.concordance_index``
    does (which expects survival-like scores: ours equals lifelines' with ``-risk``).
    O(n²) time, O(n) memory (pairs are counted in blocks of rows).

    Raises:
        InputError: bad input, or no comparable pair (e.g. no events).

    Example:
        >>> concordance_index([2, 5, 7, 9], [1.0, 0.5, 0.7, -1.0], [1, 1, 0, 1])
        0.8
    """
    time, event = _survival_arrays(time, event)
    risk = _vector(risk, "risk", len(time))
    n_pairs = n_concordant = 0.0
    for start in range(0, len(time), _ROW_BLOCK):
        comparable, score = _pair_matrices(time, risk, event, slice(start, start + _ROW_BLOCK))
        n_pairs += comparable.sum()
        n_concordant += score.sum()
    if n_pairs == 0:
        raise InputError("no comparable pairs for the C-index (are there any events?)")
    return float(n_concordant / n_pairs)


def bootstrap_cindex(
    time, risk, event, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """C-index with a percentile bootstrap ``1 - alpha`` CI, resampling patients with replacement.

    Each resample is a vector of multiplicities ``w`` (multinomial), and its C-index is
    ``w' S w / w' P w`` with the pair matrices ``S`` (scores) and ``P`` (comparable pairs) of the
    original sample: exact, since copies of one patient are never comparable with each other.
    Resamples without any comparable pair are skipped. n is limited to 5000.

    Returns:
        ``(c, lo, hi)``: the C-index of the full sample and the CI bounds (NaN if no resample
        had a comparable pair).

    Example:
        >>> c, lo, hi = bootstrap_cindex([2, 5, 7, 9, 4], [1, .5, .7, -1, .2], [1, 1, 0, 1, 1], n_boot=200)
        >>> lo <= c <= hi
        True
    """
    if n_boot < 1 or not 0 < alpha < 1:
        raise InputError(f"n_boot must be >= 1 and 0 < alpha < 1, got {n_boot}, {alpha}")
    c = concordance_index(time, risk, event)
    time, event = _survival_arrays(time, event)
    n = len(time)
    if n > _MAX_BOOTSTRAP_N:
        raise InputError(f"bootstrap C-index supports up to {_MAX_BOOTSTRAP_N} patients, got {n}")
    comparable, score = _pair_matrices(time, _vector(risk, "risk", n), event)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(float)
    pairs = ((weights @ comparable) * weights).sum(axis=1)
    concordant = ((weights @ score) * weights).sum(axis=1)
    valid = pairs > 0
    if not valid.any():
        return c, float("nan"), float("nan")
    boot = concordant[valid] / pairs[valid]
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return c, float(lo), float(hi)


def fold_cindices(oof: pd.DataFrame) -> pd.Series:
    """Patient-level C-index of each fold's test patients (index: fold; NaN if no comparable pair)."""
    _check_oof(oof)
    out = {}
    for fold, part in oof.groupby("fold", sort=True):
        try:
            out[fold] = concordance_index(part["pfs_months"], part["risk"], part["event"])
        except InputError:  # a fold without comparable pairs has no C-index
            out[fold] = float("nan")
    return pd.Series(out, name="c_index", dtype=float).rename_axis("fold")


def summarize_cv(oof: pd.DataFrame, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Summary statistics of one cross-validated configuration.

    Args:
        oof: out-of-fold patient predictions, columns ``patient_id, fold, risk, pfs_months, event``
            (``CV/oof_predictions.csv``), one row per patient.

    Returns:
        dict with ``fold_c_index`` (dict fold -> C), ``fold_min``, ``fold_max`` (the paper's
        statistic), ``fold_mean``, ``fold_sd`` (ddof = 1), ``n_folds`` (folds with a C-index),
        ``pooled`` (C-index of all out-of-fold risks together), ``pooled_lo``, ``pooled_hi``
        (percentile bootstrap CI over patients), ``n_patients``, ``n_events``.

    The pooled C-index compares risks from different folds' models, whose scales may differ
    (which usually lowers it); the fold statistics never mix models but rest on ~20 patients each.

    Example:
        >>> oof = pd.DataFrame({"patient_id": list("abcdef"), "fold": [0, 0, 0, 1, 1, 1],
        ...                     "risk": [2.0, 1.0, 0.0, 2.5, 0.5, -1.0],
        ...                     "pfs_months": [3.0, 6, 9, 4, 8, 12], "event": [1, 1, 0, 1, 0, 1]})
        >>> s = summarize_cv(oof, n_boot=100)
        >>> s["fold_c_index"], round(s["pooled"], 3)   # the pooled C mixes the folds' models
        ({0: 1.0, 1: 1.0}, 0.917)
    """
    per_fold = fold_cindices(oof)
    valid = per_fold.dropna()
    pooled, lo, hi = bootstrap_cindex(oof["pfs_months"], oof["risk"], oof["event"], n_boot, seed, alpha)
    return {
        "fold_c_index": {int(k) if isinstance(k, (int, np.integer)) else k: float(v) for k, v in per_fold.items()},
        "fold_min": float(valid.min()) if len(valid) else float("nan"),
        "fold_max": float(valid.max()) if len(valid) else float("nan"),
        "fold_mean": float(valid.mean()) if len(valid) else float("nan"),
        "fold_sd": float(valid.std(ddof=1)) if len(valid) > 1 else float("nan"),
        "n_folds": int(len(valid)),
        "pooled": pooled,
        "pooled_lo": lo,
        "pooled_hi": hi,
        "n_patients": int(len(oof)),
        "n_events": int(oof["event"].sum()),
    }


# --------------------------------------------------------------------------------------------
# Risk groups without test-fold leakage
# --------------------------------------------------------------------------------------------


def risk_group_cutoffs(train_predictions: pd.DataFrame, quantile: float = 0.5) -> pd.Series:
    """Per fold, the ``quantile`` of that fold's TRAINING patients' risks (index: fold).

    Args:
        train_predictions: ``CV/train_predictions.csv``: ``fold, patient_id, risk``, the risks that
            fold k's model gives to fold k's training patients.
    """
    _require_columns(train_predictions, TRAIN_PREDICTION_COLUMNS, "training predictions")
    if not 0 < quantile < 1:
        raise InputError(f"quantile must be in (0, 1), got {quantile}")
    _vector(train_predictions["risk"], "training predictions: risk")
    cutoffs = train_predictions.groupby("fold", sort=True)["risk"].quantile(quantile)
    return cutoffs.rename("cutoff")


def assign_risk_groups(oof: pd.DataFrame, train_predictions: pd.DataFrame, quantile: float = 0.5) -> pd.DataFrame:
    """Split out-of-fold patients into ``"low"``/``"high"`` risk without using any test risk.

    Each test patient of fold k is compared with the ``quantile`` (default median) of the risks
    that fold k's model gave its own training patients: ``risk > cutoff`` -> ``"high"``,
    otherwise ``"low"``. The cutoff depends on no test patient, so the split is what a
    prospective user of that fold's model would have done.

    Returns:
        A copy of ``oof`` with columns ``cutoff`` and ``group``.

    Raises:
        InputError: a fold without training predictions, or a patient who is in both the test
            and the training set of one fold (leakage).

    Example:
        >>> oof = pd.DataFrame({"patient_id": ["a", "b"], "fold": [0, 0], "risk": [0.2, 0.9],
        ...                     "pfs_months": [10.0, 4.0], "event": [0, 1]})
        >>> train = pd.DataFrame({"fold": [0, 0, 0], "patient_id": ["c", "d", "e"], "risk": [0.1, 0.5, 0.7]})
        >>> assign_risk_groups(oof, train)["group"].tolist()
        ['low', 'high']
    """
    _check_oof(oof)
    cutoffs = risk_group_cutoffs(train_predictions, quantile)
    missing = sorted(set(oof["fold"]) - set(cutoffs.index))
    if missing:
        raise InputError(f"no training predictions for fold(s) {missing}")
    train_pairs = set(zip(train_predictions["fold"], train_predictions["patient_id"].astype(str), strict=True))
    for fold, pid in zip(oof["fold"], oof["patient_id"].astype(str), strict=True):
        if (fold, pid) in train_pairs:
            raise InputError(f"is both a test and a training patient of fold {fold} (leakage)", patient=pid)
    out = oof.copy()
    out["cutoff"] = oof["fold"].map(cutoffs).to_numpy(dtype=float)
    out["group"] = np.where(out["risk"] > out["cutoff"], "high", "low")
    return out


# --------------------------------------------------------------------------------------------
# Kaplan-Meier and log-rank
# --------------------------------------------------------------------------------------------


def _group_order(groups: np.ndarray) -> list:
    """``low`` before ``high`` when those are the labels, else sorted."""
    labels = list(pd.unique(groups))
    if set(labels) <= {"low", "high"}:
        return [g for g in ("low", "high") if g in labels]
    return sorted(labels)


def _km_inputs(time, event, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    time, event = _survival_arrays(time, event)
    groups = np.asarray(groups, dtype=object)
    if groups.shape != time.shape:
        raise InputError(f"groups has {groups.size} values, expected {len(time)}")
    if pd.isna(groups).any():
        raise InputError("groups contains missing labels")
    return time, event, groups


def km_summary(time, event, groups, alpha: float = 0.05) -> pd.DataFrame:
    """Per group: n, events and Kaplan-Meier median PFS with its ``1 - alpha`` CI (months).

    The median is lifelines' (the first time with S(t) <= 1/2).
    The CI is lifelines' (exponential Greenwood pointwise band, read off where it crosses 0.5,
    via ``median_survival_times(kmf.confidence_interval_)``). A median that is not reached is
    ``inf`` (lifelines' convention); so is an upper bound that is not reached.

    Returns:
        DataFrame indexed by ``group`` with ``n, events, median, median_lo, median_hi``.

    Example:
        >>> km_summary([3, 5, 8, 9, 12, 15], [1, 1, 0, 1, 1, 0], ["a", "a", "a", "b", "b", "b"])["median"].tolist()
        [5.0, 12.0]
    """
    time, event, groups = _km_inputs(time, event, groups)
    rows = []
    for g in _group_order(groups):
        sel = groups == g
        kmf = KaplanMeierFitter(alpha=alpha).fit(time[sel], event[sel])
        ci = median_survival_times(kmf.confidence_interval_)
        rows.append({
            "group": g,
            "n": int(sel.sum()),
            "events": int(event[sel].sum()),
            "median": float(kmf.median_survival_time_),
            "median_lo": float(ci.iloc[0, 0]),
            "median_hi": float(ci.iloc[0, 1]),
        })
    return pd.DataFrame(rows).set_index("group")


def km_curves(time, event, groups, alpha: float = 0.05) -> pd.DataFrame:
    """Kaplan-Meier step functions with pointwise ``1 - alpha`` CI, long format, for plotting.

    Returns:
        Columns ``group, time, survival, lo, hi`` (time in months, starting at 0 with S = 1);
        draw with ``plt.step(..., where="post")`` per group.
    """
    time, event, groups = _km_inputs(time, event, groups)
    parts = []
    for g in _group_order(groups):
        sel = groups == g
        kmf = KaplanMeierFitter(alpha=alpha).fit(time[sel], event[sel])
        ci = kmf.confidence_interval_survival_function_
        parts.append(pd.DataFrame({
            "group": g,
            "time": kmf.survival_function_.index.to_numpy(dtype=float),
            "survival": kmf.survival_function_.iloc[:, 0].to_numpy(),
            "lo": ci.iloc[:, 0].to_numpy(),
            "hi": ci.iloc[:, 1].to_numpy(),
        }))
    return pd.concat(parts, ignore_index=True)


def at_risk_counts(time, groups, at_times: Sequence[float]) -> pd.DataFrame:
    """Number still at risk (follow-up >= t) per group at each time: the table under a KM plot.

    Returns:
        DataFrame indexed by group, one column per time in ``at_times``.

    Example:
        >>> at_risk_counts([3, 5, 8, 9], ["a", "a", "b", "b"], [0, 5, 10]).loc["a"].tolist()
        [2, 1, 0]
    """
    time = _vector(time, "time")
    groups = np.asarray(groups, dtype=object)
    if groups.shape != time.shape:
        raise InputError(f"groups has {groups.size} values, expected {len(time)}")
    rows = {g: [int(((groups == g) & (time >= t)).sum()) for t in at_times] for g in _group_order(groups)}
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(at_times)).rename_axis("group")


def logrank(time, event, groups) -> tuple[float, float]:
    """Log-rank test of equal survival across groups: ``(chi-square statistic, p-value)``.

    Two groups: ``lifelines.statistics.logrank_test``; more: ``multivariate_logrank_test``
    (k - 1 degrees of freedom).

    Example:
        >>> stat, p = logrank([3, 5, 8, 9, 12, 15], [1, 1, 0, 1, 1, 0], ["a", "a", "a", "b", "b", "b"])
        >>> 0 < p < 1
        True
    """
    time, event, groups = _km_inputs(time, event, groups)
    labels = _group_order(groups)
    if len(labels) < 2:
        raise InputError(f"log-rank test needs at least two groups, got {labels}")
    if len(labels) == 2:
        a, b = (groups == labels[0]), (groups == labels[1])
        result = logrank_test(time[a], time[b], event[a], event[b])
    else:
        result = multivariate_logrank_test(time, groups, event)
    return float(result.test_statistic), float(result.p_value)


# --------------------------------------------------------------------------------------------
# Hazard ratios
# --------------------------------------------------------------------------------------------


def cox_hazard_ratios(
    patients: pd.DataFrame,
    covariates: Sequence[str],
    duration_col: str = "pfs_months",
    event_col: str = "event",
    standardize: bool = False,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Multivariable Cox hazard ratios with ``1 - alpha`` CI and Wald p-values (lifelines, Efron).

    Descriptive only (the forest plot of chapter 02): missing covariate values are replaced by
    the covariate's median over ALL patients given here. A predictive model must instead impute
    inside each training fold, as ``psma_lib.cv`` does. Transform skewed covariates (e.g.
    ``log(PSA + 1)``) before calling if a per-unit HR is not meaningful.

    Args:
        covariates: columns of ``patients`` to put in the model (numeric).
        standardize: if True, each covariate is divided by its standard deviation, so each HR is
            per 1 SD; otherwise per 1 unit.

    Returns:
        DataFrame indexed by ``covariate`` with ``coef, se, hr, hr_lo, hr_hi, p, n_imputed``.

    Raises:
        InputError: a covariate missing, entirely empty or constant.
    """
    covariates = list(covariates)
    _require_columns(patients, [*covariates, duration_col, event_col], "patients table")
    time, event = _survival_arrays(patients[duration_col], patients[event_col])
    x = pd.DataFrame({c: _numeric_column(patients, c) for c in covariates}, index=patients.index)
    n_imputed = x.isna().sum()
    for column in covariates:
        if x[column].isna().all():
            raise InputError(f"covariate {column!r} has no values")
        x[column] = x[column].fillna(x[column].median())
        if x[column].nunique() < 2:
            raise InputError(f"covariate {column!r} is constant; its hazard ratio is undefined")
        if standardize:
            x[column] = x[column] / x[column].std(ddof=1)
    data = x.assign(_time=time, _event=event.astype(int))
    cph = CoxPHFitter(alpha=alpha).fit(data, duration_col="_time", event_col="_event")
    s = cph.summary
    lo_col, hi_col = [c for c in s.columns if c.startswith("exp(coef) ") and "%" in c]
    out = pd.DataFrame({
        "coef": s["coef"],
        "se": s["se(coef)"],
        "hr": s["exp(coef)"],
        "hr_lo": s[lo_col],
        "hr_hi": s[hi_col],
        "p": s["p"],
        "n_imputed": n_imputed.reindex(s.index).astype(int),
    })
    return out.rename_axis("covariate")
