"""Survival metrics for "what do the images add, and how sure are we?" (issue 8, items 3 and 5).

Conventions as in :mod:`psma_lib.evaluation`: times in months, ``event = 1`` = PSA progression
observed, ``risk`` is a log-hazard (higher = shorter expected PFS). Arguments here are ordered
``(time, event, risk, ...)``; note that :func:`psma_lib.evaluation.concordance_index` takes
``(time, risk, event)``.

Main entry points:

* :func:`paired_bootstrap_delta_c` - difference of two models' Harrell C on the same patients
  with a paired bootstrap CI and p-value; with ``folds`` the statistic is the fold mean of the
  per-fold differences, resampled within folds (the project's headline comparison).
* :func:`fold_mean_c_index`, :func:`bootstrap_fold_mean_c` - one model's fold-mean C and its CI.
* :func:`standardise_by_training` - put a fold model's out-of-fold risks on a common scale.
* :func:`uno_c`, :func:`time_dependent_auc`, :func:`integrated_brier_score` - thin wrappers of
  ``sksurv.metrics`` that skip (with a :class:`TimeRangeWarning`) time points outside the range
  the data can support instead of failing with sksurv's error.
* :func:`breslow_survival`, :func:`calibration_table` - predicted S(t | x) from a Cox-type risk
  and the training fold's Breslow baseline; predicted vs Kaplan-Meier observed PSA-PFS at t.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from lifelines import KaplanMeierFitter
from sksurv import metrics as sk_metrics
from sksurv.exceptions import NoComparablePairException
from sksurv.linear_model.coxph import BreslowEstimator
from sksurv.nonparametric import CensoringDistributionEstimator
from sksurv.util import Surv

from .errors import InputError
from .evaluation import _MAX_BOOTSTRAP_N, _pair_matrices, _survival_arrays, _vector

__all__ = [
    "DeltaC",
    "TimeRangeWarning",
    "bootstrap_fold_mean_c",
    "breslow_survival",
    "calibration_table",
    "fold_mean_c_index",
    "integrated_brier_score",
    "paired_bootstrap_delta_c",
    "standardise_by_training",
    "time_dependent_auc",
    "uno_c",
]


class TimeRangeWarning(UserWarning):
    """A requested time point or truncation time was outside what the data support and was
    skipped or clipped (the message says which and why)."""


# --------------------------------------------------------------------------------------------
# Harrell's C: fold means and paired bootstrap
# --------------------------------------------------------------------------------------------


def _fold_groups(folds, n: int) -> tuple[list, list[np.ndarray]]:
    """Fold labels (sorted) and the patient indices of each; one group of all if ``folds`` is None."""
    if folds is None:
        return [None], [np.arange(n)]
    labels = pd.Series(np.asarray(folds, dtype=object).ravel())
    if len(labels) != n:
        raise InputError(f"folds has {len(labels)} values, expected {n}")
    if labels.isna().any():
        raise InputError("folds contains missing labels")
    codes, uniques = pd.factorize(labels, sort=True)
    return list(uniques), [np.flatnonzero(codes == k) for k in range(len(uniques))]


def _stratified_weights(groups: Sequence[np.ndarray], n: int, n_boot: int, rng) -> np.ndarray:
    """``[n_boot, n]`` bootstrap multiplicities: each group's patients resampled within the group.

    With one group of all patients the draws are those of
    :func:`psma_lib.evaluation.bootstrap_cindex` for the same seed.
    """
    weights = np.zeros((n_boot, n))
    for idx in groups:
        k = len(idx)
        weights[:, idx] = rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot)
    return weights


def _check_boot_args(n_boot: int, alpha: float) -> None:
    if int(n_boot) != n_boot or n_boot < 1 or not 0 < alpha < 1:
        raise InputError(f"n_boot must be an integer >= 1 and 0 < alpha < 1, got {n_boot}, {alpha}")


def _fold_mean_bootstrap(
    time, event, risks: Sequence, folds, n_boot: int, seed: int
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Fold-mean Harrell C of each risk vector, on the full sample and on stratified resamples.

    The C of fold k in a resample with multiplicities ``w`` is ``w' S w / w' P w`` (the pair
    matrices of fold k's patients), exact as in :func:`psma_lib.evaluation.bootstrap_cindex`.
    Folds without a comparable pair in the full sample are left out of every mean; resamples in
    which a used fold has no comparable pair are dropped.

    Returns:
        ``(full, boot, n_folds, n_valid)``: ``full`` ``[m]`` fold-mean C per risk vector,
        ``boot`` ``[n_valid, m]`` the same per kept resample, the number of folds averaged and of
        resamples kept.
    """
    time, event = _survival_arrays(time, event)
    n = len(time)
    risks = [_vector(r, "risk", n) for r in risks]
    if n > _MAX_BOOTSTRAP_N:
        raise InputError(f"bootstrap C-index supports up to {_MAX_BOOTSTRAP_N} patients, got {n}")
    _, groups = _fold_groups(folds, n)
    weights = _stratified_weights(groups, n, n_boot, np.random.default_rng(seed))
    full = np.zeros(len(risks))
    boot = np.zeros((n_boot, len(risks)))
    valid = np.ones(n_boot, dtype=bool)
    n_folds = 0
    for idx in groups:
        t, e, w = time[idx], event[idx], weights[:, idx]
        comparable, _ = _pair_matrices(t, risks[0][idx], e)
        n_pairs = comparable.sum()
        if n_pairs == 0:
            continue
        n_folds += 1
        boot_pairs = ((w @ comparable) * w).sum(axis=1)
        valid &= boot_pairs > 0
        denominator = np.where(boot_pairs > 0, boot_pairs, 1.0)
        for j, risk in enumerate(risks):
            _, score = _pair_matrices(t, risk[idx], e)
            full[j] += score.sum() / n_pairs
            boot[:, j] += ((w @ score) * w).sum(axis=1) / denominator
    if n_folds == 0:
        raise InputError("no comparable pairs for the C-index in any fold (are there any events?)")
    return full / n_folds, boot[valid] / n_folds, n_folds, int(valid.sum())


def fold_mean_c_index(time, event, risk, folds) -> float:
    """Mean over folds of the Harrell C-index of each fold's patients.

    Each fold's C compares only patients scored by the same fold model, so differences in risk
    scale between fold models do not matter. Folds without a comparable pair are left out (as
    ``fold_mean`` of :func:`psma_lib.evaluation.summarize_cv`, which this equals).

    Args:
        time: ``[n]`` follow-up in months (> 0).
        event: ``[n]`` 1 = progression observed, 0 = censored.
        risk: ``[n]`` predicted log-hazard (higher = shorter expected PFS).
        folds: ``[n]`` fold label of each patient (the fold in which it was a test patient).

    Example:
        >>> fold_mean_c_index([2, 5, 7, 9, 3, 4, 8, 6], [1, 1, 0, 1, 1, 0, 1, 1],
        ...                   [1.0, 0.5, 0.7, -1.0, 9.0, 8.0, 6.0, 7.0], [0, 0, 0, 0, 1, 1, 1, 1])
        0.9
    """
    return float(_fold_mean_bootstrap(time, event, [risk], folds, 0, 0)[0][0])


def bootstrap_fold_mean_c(
    time, event, risk, folds=None, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """Fold-mean C-index with a percentile bootstrap ``1 - alpha`` CI, patients resampled within folds.

    The resampling is that of :func:`paired_bootstrap_delta_c` with the same ``folds`` and
    ``seed``. With ``folds=None`` (one fold) this is
    :func:`psma_lib.evaluation.bootstrap_cindex` (same draws, same result).

    Args:
        time, event, risk, folds: ``[n]`` each, as in :func:`fold_mean_c_index`.

    Returns:
        ``(c, lo, hi)``: fold-mean C of the full sample and the CI bounds.

    Example:
        >>> c, lo, hi = bootstrap_fold_mean_c([2, 5, 7, 9, 3, 4, 8, 6], [1, 1, 0, 1, 1, 0, 1, 1],
        ...     [1.0, 0.5, 0.7, -1.0, 9.0, 8.0, 6.0, 7.0], [0, 0, 0, 0, 1, 1, 1, 1], n_boot=200)
        >>> round(c, 2), lo <= c <= hi
        (0.9, True)
    """
    _check_boot_args(n_boot, alpha)
    full, boot, _, n_valid = _fold_mean_bootstrap(time, event, [risk], folds, n_boot, seed)
    if n_valid == 0:
        return float(full[0]), float("nan"), float("nan")
    lo, hi = np.quantile(boot[:, 0], [alpha / 2, 1 - alpha / 2])
    return float(full[0]), float(lo), float(hi)


@dataclass(frozen=True)
class DeltaC:
    """Result of :func:`paired_bootstrap_delta_c` (``to_dict()`` for a table row).

    Attributes:
        c_a, c_b: C-index of each model (fold means if folds were given).
        delta: ``c_a - c_b``.
        lo, hi: percentile bootstrap ``1 - alpha`` CI of ``delta``.
        p_value: two-sided bootstrap p-value of ``delta = 0``.
        n_boot: resamples drawn; n_valid: resamples kept (all with a comparable pair per fold).
        alpha: CI level; statistic: ``"pooled"`` or ``"fold mean"``; n_folds: folds averaged.
        boot: ``[n_valid]`` resampled deltas (for a histogram).
    """

    c_a: float
    c_b: float
    delta: float
    lo: float
    hi: float
    p_value: float
    n_boot: int
    n_valid: int
    alpha: float
    statistic: str
    n_folds: int
    boot: np.ndarray = field(repr=False, compare=False)

    def to_dict(self) -> dict:
        """All fields but ``boot``."""
        out = asdict(self)
        out.pop("boot")
        return out


def paired_bootstrap_delta_c(
    time, event, risk_a, risk_b, n_boot: int = 2000, seed: int = 0, folds=None, alpha: float = 0.05
) -> DeltaC:
    """Difference of two models' Harrell C on the same patients, with a paired bootstrap CI.

    Both models are scored on the SAME resamples of patients, so the patient-to-patient noise
    that the two C-indices share cancels in the difference (two separate CIs that overlap say
    little about the difference).

    * ``folds=None``: ``delta = C(risk_a) - C(risk_b)`` over all patients together (pooled);
      patients are resampled with replacement.
    * ``folds`` given: the statistic is the fold mean of the per-fold differences
      ``C_k(risk_a) - C_k(risk_b)``, and patients are resampled within their fold (stratified),
      so every resample keeps the folds' sizes. Use this for out-of-fold risks of separately
      trained fold models, whose risk scales differ: each C then compares only patients scored
      by one model. Folds without a comparable pair are left out.

    The CI is the percentile interval of the resampled deltas. The p-value is twice the
    proportion of resampled deltas on the other side of 0 from ``delta`` (0 included), at least
    ``1 / (n_valid + 1)`` and at most 1. Resamples with a fold without a comparable pair are
    dropped (``n_valid < n_boot``; rare unless a fold has very few events). Vectorised over
    resamples (multiplicity weights on the pair matrices): 2000 resamples of ~150 patients take
    well under a second.

    Args:
        time: ``[n]`` follow-up in months (> 0).
        event: ``[n]`` 1 = progression observed, 0 = censored.
        risk_a, risk_b: ``[n]`` each model's predicted log-hazard (higher = shorter PFS).
        n_boot: number of resamples; seed: seed of ``numpy.random.default_rng``.
        folds: ``[n]`` fold label per patient, or None.
        alpha: the CI is ``1 - alpha``.

    Example:
        >>> time, event = [2, 5, 7, 9, 4, 6, 3, 8], [1, 1, 0, 1, 1, 0, 1, 1]
        >>> a = [1.0, 0.5, 0.7, -1.0, 0.6, 0.0, 0.9, -0.5]  # a good model
        >>> b = [0.0, 0.3, 0.1, 0.2, -0.2, 0.4, 0.1, 0.0]   # an uninformative one
        >>> r = paired_bootstrap_delta_c(time, event, a, b, n_boot=500)
        >>> round(r.c_a, 3), round(r.c_b, 3), round(r.delta, 3), r.lo <= r.delta <= r.hi
        (0.913, 0.304, 0.609, True)
    """
    _check_boot_args(n_boot, alpha)
    full, boot, n_folds, n_valid = _fold_mean_bootstrap(time, event, [risk_a, risk_b], folds, n_boot, seed)
    c_a, c_b = float(full[0]), float(full[1])
    delta = c_a - c_b
    deltas = boot[:, 0] - boot[:, 1]
    if n_valid == 0:
        lo = hi = p = float("nan")
    else:
        lo, hi = (float(q) for q in np.quantile(deltas, [alpha / 2, 1 - alpha / 2]))
        if delta > 0:
            other_side = np.mean(deltas <= 0)
        elif delta < 0:
            other_side = np.mean(deltas >= 0)
        else:
            other_side = 0.5
        p = float(min(1.0, max(2.0 * other_side, 1.0 / (n_valid + 1))))
    return DeltaC(c_a=c_a, c_b=c_b, delta=delta, lo=lo, hi=hi, p_value=p, n_boot=int(n_boot),
                  n_valid=n_valid, alpha=alpha, statistic="pooled" if folds is None else "fold mean",
                  n_folds=n_folds, boot=deltas)


def standardise_by_training(risk_test, risk_train) -> np.ndarray:
    """``(risk_test - mean(risk_train)) / sd(risk_train)``, for one fold model.

    Why: each fold's model is trained separately, and a Cox-type log-hazard has no fixed origin
    (the partial likelihood does not change if a constant is added) nor a common spread across
    training runs. Pooling raw out-of-fold risks of several fold models (a pooled C-index, a
    pooled risk split) therefore mixes scales. Expressing each test patient's risk in standard
    deviations of the risks that the SAME model gave its own TRAINING patients puts the folds
    on a comparable scale without using any test-fold information (no leakage: the mean and sd
    are what a prospective user of that model would know). It fixes location and spread only,
    not differences in how well the models rank; fold-level C-indices are unaffected.

    Args:
        risk_test: ``[n_test]`` risks of one fold's test patients.
        risk_train: ``[n_train]`` risks the same fold model gave that fold's training patients.

    Returns:
        ``[n_test]`` standardised risks.

    Raises:
        InputError: fewer than two training risks, or all equal (sd 0).

    Example:
        >>> standardise_by_training([1.0, 3.0], [0.0, 2.0, 4.0]).tolist()
        [-0.5, 0.5]
    """
    test = _vector(risk_test, "risk_test")
    train = _vector(risk_train, "risk_train")
    if len(train) < 2:
        raise InputError(f"risk_train needs at least 2 values to estimate a spread, got {len(train)}")
    sd = float(train.std(ddof=1))
    if sd == 0:
        raise InputError("risk_train values are all equal (sd 0); cannot standardise")
    return (test - train.mean()) / sd


# --------------------------------------------------------------------------------------------
# Beyond Harrell's C (scikit-survival)
# --------------------------------------------------------------------------------------------


def _train_test(train_time, train_event, test_time, test_event):
    train_time, train_event = _survival_arrays(train_time, train_event)
    test_time, test_event = _survival_arrays(test_time, test_event)
    return train_time, train_event, test_time, test_event


def _times_vector(times) -> np.ndarray:
    times = _vector(np.atleast_1d(np.asarray(times, dtype=float)), "times")
    if len(times) == 0:
        raise InputError("times is empty")
    if (np.diff(times) <= 0).any():
        raise InputError(f"times must be strictly increasing, got {times.tolist()}")
    return times


def _usable_times(times: np.ndarray, train_time, test_time, what: str) -> np.ndarray:
    """Boolean mask of the time points sksurv can evaluate; warns about the others.

    A time t is usable when ``min(test time) <= t < min(max(test time), max(train time))``:
    sksurv needs t inside the test follow-up, and the censoring distribution (Kaplan-Meier of
    the training fold's censoring) is unknown beyond the longest training follow-up.
    """
    lower, upper = float(test_time.min()), float(min(test_time.max(), train_time.max()))
    ok = (times >= lower) & (times < upper)
    if not ok.all():
        warnings.warn(
            f"{what}: time(s) {times[~ok].tolist()} months skipped: only [{lower:g}, {upper:g}) can be "
            f"evaluated (from the shortest test follow-up to the longest follow-up of the test set "
            f"({test_time.max():g}) or the training set ({train_time.max():g}), whichever is shorter)",
            TimeRangeWarning, stacklevel=3)
    return ok


def _capped_test(test_time, test_event, t_max: float, train_max: float):
    """Test outcome as a structured array, follow-up beyond ``t_max`` capped at the training maximum.

    A patient followed beyond the last evaluated time ``t_max`` enters every metric at
    ``t <= t_max`` only as "event-free at t"; marking it censored at ``min(time, train_max)``
    (still > t_max) leaves all results unchanged but keeps sksurv from looking up the censoring
    distribution beyond the training follow-up (which raises an error there).
    """
    beyond = test_time > t_max
    time = np.where(beyond, np.minimum(test_time, train_max), test_time)
    return Surv.from_arrays(event=test_event & ~beyond, time=time)


def _censoring_unknown(train_time, train_event, time) -> np.ndarray:
    """Where the training fold's censoring survival G(t) is unknown (t beyond its follow-up) or 0."""
    beyond = time > train_time.max()
    g = np.zeros(len(time))
    cens = CensoringDistributionEstimator().fit(Surv.from_arrays(event=train_event, time=train_time))
    g[~beyond] = cens.predict_proba(time[~beyond])
    return beyond | (g <= 0)


def uno_c(train_time, train_event, test_time, test_event, risk, tau: float | None = 36.0) -> float:
    """Uno's IPCW C-index truncated at ``tau`` months (``sksurv.metrics.concordance_index_ipcw``).

    Harrell's C depends on the censoring pattern of the test set; Uno's weights each comparable
    pair by the inverse squared probability of remaining uncensored (Kaplan-Meier of the
    TRAINING fold's censoring), so it estimates a censoring-free concordance for events before
    ``tau``. If a test progression before ``tau`` lies beyond the longest training follow-up (or
    where the training fold's censoring survival has dropped to 0), its weight is unknown, so
    ``tau`` is lowered to the first such progression time, with a :class:`TimeRangeWarning`. ``tau=None``: no truncation (apart from that clipping).
    On uncensored data all weights are 1 and Uno's C equals Harrell's C (events before ``tau``).

    Args:
        train_time, train_event: ``[n_train]`` training-fold outcome (censoring distribution).
        test_time, test_event: ``[n_test]`` test-fold outcome.
        risk: ``[n_test]`` predicted log-hazard of the test patients (higher = shorter PFS).
        tau: truncation time in months.

    Raises:
        InputError: bad input, or no comparable pair before ``tau``.

    Example:
        >>> t, e = [2, 5, 7, 9, 4, 6, 3, 8], [1, 1, 0, 1, 1, 0, 1, 1]
        >>> round(uno_c(t, e, t, e, [1.0, 0.5, 0.7, -1.0, 0.6, 0.0, 0.9, -0.5], tau=None), 3)
        0.923
    """
    train_time, train_event, test_time, test_event = _train_test(train_time, train_event, test_time, test_event)
    risk = _vector(risk, "risk", len(test_time))
    tau = np.inf if tau is None else float(tau)
    if not tau > 0:
        raise InputError(f"tau must be > 0 months, got {tau}")
    unknown = test_event & (test_time < tau) & _censoring_unknown(train_time, train_event, test_time)
    if unknown.any():
        new_tau = float(test_time[unknown].min())
        warnings.warn(
            f"uno_c: tau={tau:g} lowered to {new_tau:g} months: the censoring distribution of the "
            f"training fold (longest follow-up {train_time.max():g}) is unknown or zero at the test "
            f"progression(s) from there on", TimeRangeWarning, stacklevel=2)
        tau = new_tau
    try:
        c = sk_metrics.concordance_index_ipcw(
            Surv.from_arrays(event=train_event, time=train_time),
            Surv.from_arrays(event=test_event, time=test_time),
            risk, tau=None if np.isinf(tau) else tau)[0]
    except NoComparablePairException:
        raise InputError(f"no comparable pairs for Uno's C before tau = {tau:g} months") from None
    if not np.isfinite(c):
        raise InputError(f"no comparable pairs for Uno's C before tau = {tau:g} months")
    return float(c)


def time_dependent_auc(
    train_time, train_event, test_time, test_event, risk, times: Sequence[float] = (12, 24, 36)
) -> pd.Series:
    """Cumulative/dynamic AUC at each time: cases progressed by t vs controls event-free at t.

    ``sksurv.metrics.cumulative_dynamic_auc`` (IPCW with the training fold's censoring
    distribution). Times outside what the data support (see :func:`integrated_brier_score`), or
    without a case or a control, are NaN, with a :class:`TimeRangeWarning` naming them.

    Args:
        train_time, train_event: ``[n_train]`` training-fold outcome.
        test_time, test_event: ``[n_test]`` test-fold outcome.
        risk: ``[n_test]`` predicted log-hazard (higher = shorter PFS).
        times: ``[k]`` strictly increasing time points in months.

    Returns:
        Series ``auc`` indexed by ``months``.

    Example:
        >>> t, e = [2, 5, 7, 9, 4, 6, 3, 8], [1, 1, 0, 1, 1, 0, 1, 1]
        >>> time_dependent_auc(t, e, t, e, [1.0, 0.5, 0.7, -1.0, 0.6, 0.0, 0.9, -0.5], times=[4, 6]).round(3).tolist()
        [0.933, 0.833]
    """
    train_time, train_event, test_time, test_event = _train_test(train_time, train_event, test_time, test_event)
    risk = _vector(risk, "risk", len(test_time))
    times = _times_vector(times)
    ok = _usable_times(times, train_time, test_time, "time_dependent_auc")
    has_cases = np.array([(test_event & (test_time <= t)).any() for t in times])
    has_controls = np.array([(test_time > t).any() for t in times])
    if (ok & ~has_cases).any():
        warnings.warn(f"time_dependent_auc: no progression by {times[ok & ~has_cases].tolist()} months "
                      "in the test set: AUC undefined there", TimeRangeWarning, stacklevel=2)
    ok &= has_cases & has_controls
    auc = np.full(len(times), np.nan)
    if ok.any():
        auc[ok] = sk_metrics.cumulative_dynamic_auc(
            Surv.from_arrays(event=train_event, time=train_time),
            _capped_test(test_time, test_event, float(times[ok].max()), float(train_time.max())),
            risk, times[ok])[0]
    return pd.Series(auc, index=pd.Index(times, name="months"), name="auc")


def integrated_brier_score(train_time, train_event, test_time, test_event, surv, times) -> float:
    """Integrated Brier score (IPCW, ``sksurv.metrics.integrated_brier_score``) of predicted S(t | x).

    The mean over [first, last usable time] of the squared error between predicted PSA-PFS
    probability and observed status, weighted by the training fold's censoring distribution;
    lower is better (0.25 = predicting 0.5 for everyone). Time points outside
    ``[min(test time), min(max test time, max training time))`` are dropped with a
    :class:`TimeRangeWarning`; so the integration range can differ between folds.

    Args:
        train_time, train_event: ``[n_train]`` training-fold outcome.
        test_time, test_event: ``[n_test]`` test-fold outcome.
        surv: ``[n_test, k]`` predicted S(t | x) at ``times`` (e.g. :func:`breslow_survival`).
        times: ``[k]`` strictly increasing time points in months.

    Raises:
        InputError: fewer than two usable time points, or NaN / values outside [0, 1] at one.

    Example:
        >>> t, e = [2, 5, 7, 9, 4, 6, 3, 8], [1, 1, 0, 1, 1, 0, 1, 1]
        >>> risk = [1.0, 0.5, 0.7, -1.0, 0.6, 0.0, 0.9, -0.5]
        >>> surv = breslow_survival(risk, t, e, risk, [3, 4, 5, 6])
        >>> round(integrated_brier_score(t, e, t, e, surv, [3, 4, 5, 6]), 3)
        0.146
    """
    train_time, train_event, test_time, test_event = _train_test(train_time, train_event, test_time, test_event)
    times = _times_vector(times)
    surv = np.asarray(surv, dtype=float)
    if surv.shape != (len(test_time), len(times)):
        raise InputError(f"surv has shape {surv.shape}, expected {(len(test_time), len(times))} (patients x times)")
    ok = _usable_times(times, train_time, test_time, "integrated_brier_score")
    if ok.sum() < 2:
        raise InputError(f"integrated Brier score needs at least two usable time points, got {times[ok].tolist()}")
    used = surv[:, ok]
    if not (np.isfinite(used).all() and (used >= 0).all() and (used <= 1).all()):
        raise InputError("surv must hold probabilities in [0, 1] (no NaN) at the usable time points")
    return float(sk_metrics.integrated_brier_score(
        Surv.from_arrays(event=train_event, time=train_time),
        _capped_test(test_time, test_event, float(times[ok].max()), float(train_time.max())),
        used, times[ok]))


# --------------------------------------------------------------------------------------------
# Predicted survival and calibration
# --------------------------------------------------------------------------------------------


def breslow_survival(train_risk, train_time, train_event, test_risk, times) -> np.ndarray:
    """Predicted PSA-PFS ``S(t | x) = exp(-H0(t) exp(risk))`` with the training fold's Breslow H0.

    ``H0`` is Breslow's estimator (``sksurv.linear_model.coxph.BreslowEstimator``) fitted on the
    training patients' risks and outcomes: ``H0(t) = sum over event times s <= t of
    d(s) / sum_{j at risk at s} exp(risk_j)``. Use risks of ONE fold model for both arguments
    (its training and its test patients); adding a constant to both leaves S(t | x) unchanged.
    Breslow's H0 is known only up to the longest training follow-up: later times are NaN, with
    a :class:`TimeRangeWarning`.

    Args:
        train_risk: ``[n_train]`` log-hazards the model gave its training patients.
        train_time, train_event: ``[n_train]`` their outcome.
        test_risk: ``[n_test]`` log-hazards of the patients to predict.
        times: ``[k]`` strictly increasing time points in months (>= 0).

    Returns:
        ``[n_test, k]`` survival probabilities.

    Example:
        >>> s = breslow_survival([0.0, 0.0, 0.0, 0.0], [1, 2, 3, 4], [1, 1, 1, 0], [0.0, 1.0], [2.5])
        >>> s.round(3).tolist()  # H0(2.5) = 1/4 + 1/3
        [[0.558], [0.205]]
    """
    train_time, train_event = _survival_arrays(train_time, train_event)
    train_risk = _vector(train_risk, "train_risk", len(train_time))
    test_risk = _vector(test_risk, "test_risk")
    times = _times_vector(times)
    if (times < 0).any():
        raise InputError("times must be >= 0 months")
    if not train_event.any():
        raise InputError("no events among the training patients: the baseline hazard is zero")
    ok = times <= train_time.max()
    if not ok.all():
        warnings.warn(f"breslow_survival: time(s) {times[~ok].tolist()} months are beyond the longest "
                      f"training follow-up ({train_time.max():g}); predictions there are NaN",
                      TimeRangeWarning, stacklevel=2)
    baseline = BreslowEstimator().fit(train_risk, train_event, train_time)
    cumulative_hazard = np.full(len(times), np.nan)
    cumulative_hazard[ok] = baseline.cum_baseline_hazard_(times[ok])
    return np.exp(-np.exp(test_risk)[:, None] * cumulative_hazard[None, :])


def calibration_table(pred_surv_at_t, time, event, t: float = 24.0, groups: int = 3,
                      alpha: float = 0.05) -> pd.DataFrame:
    """Calibration at ``t`` months: mean predicted PSA-PFS probability vs Kaplan-Meier, per risk group.

    Patients are split into ``groups`` equal-sized groups by predicted ``S(t | x)``
    (quantiles; group 1 = highest predicted survival = lowest risk). For each group: mean
    predicted probability, and the Kaplan-Meier estimate at ``t`` with lifelines' pointwise
    ``1 - alpha`` CI (exponential Greenwood). A well-calibrated model has ``predicted`` inside
    the observed CI. If a group's follow-up ends before ``t`` with survival > 0, its observed
    value is NaN (with a :class:`TimeRangeWarning`).

    Args:
        pred_surv_at_t: ``[n]`` predicted S(t | x) (e.g. a column of :func:`breslow_survival`).
        time, event: ``[n]`` outcome of the same patients.
        t: horizon in months; groups: number of groups.

    Returns:
        DataFrame indexed by ``group`` (1..groups) with ``n, events`` (progressions by t),
        ``pred_min, pred_max, predicted, observed, observed_lo, observed_hi``.

    Example:
        >>> table = calibration_table([0.9, 0.8, 0.7, 0.4, 0.3, 0.2], [30, 25, 26, 10, 12, 27],
        ...                           [0, 0, 1, 1, 1, 0], t=24, groups=2)
        >>> table[["n", "predicted", "observed"]].round(2).values.tolist()
        [[3.0, 0.8, 1.0], [3.0, 0.3, 0.33]]
    """
    time, event = _survival_arrays(time, event)
    pred = _vector(pred_surv_at_t, "pred_surv_at_t", len(time))
    if ((pred < 0) | (pred > 1)).any():
        raise InputError("pred_surv_at_t must be probabilities in [0, 1]")
    if int(groups) != groups or not 1 <= groups <= len(time):
        raise InputError(f"groups must be an integer between 1 and the number of patients, got {groups}")
    # Rank by risk (1 - S), ties broken by order, so the groups are equal-sized even with ties.
    rank = pd.Series(-pred).rank(method="first").to_numpy()
    labels = np.asarray(pd.qcut(rank, int(groups), labels=False)) + 1
    rows = []
    for g in range(1, int(groups) + 1):
        sel = labels == g
        kmf = KaplanMeierFitter(alpha=alpha).fit(time[sel], event[sel])
        observed = float(kmf.predict(t))
        ci = kmf.confidence_interval_survival_function_.loc[:t].iloc[-1]
        lo, hi = float(ci.iloc[0]), float(ci.iloc[1])
        if time[sel].max() < t and observed > 0:
            warnings.warn(f"calibration_table: group {g}'s follow-up ends at {time[sel].max():g} < t = {t:g} "
                          "months; its observed survival at t is NaN", TimeRangeWarning, stacklevel=2)
            observed = lo = hi = float("nan")
        rows.append({"group": g, "n": int(sel.sum()), "events": int((event[sel] & (time[sel] <= t)).sum()),
                     "pred_min": float(pred[sel].min()), "pred_max": float(pred[sel].max()),
                     "predicted": float(pred[sel].mean()), "observed": observed,
                     "observed_lo": lo, "observed_hi": hi})
    return pd.DataFrame(rows).set_index("group")
