"""Survival metrics (psma_lib.metrics) against lifelines, scikit-survival and psma_lib.evaluation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from lifelines.datasets import load_rossi
from lifelines.utils import concordance_index as lifelines_cindex
from sksurv.metrics import concordance_index_ipcw, cumulative_dynamic_auc
from sksurv.metrics import integrated_brier_score as sksurv_ibs
from sksurv.util import Surv

from psma_lib.errors import InputError
from psma_lib.evaluation import bootstrap_cindex, concordance_index, summarize_cv
from psma_lib.metrics import (
    TimeRangeWarning,
    _stratified_weights,
    bootstrap_fold_mean_c,
    breslow_survival,
    calibration_table,
    fold_mean_c_index,
    integrated_brier_score,
    paired_bootstrap_delta_c,
    standardise_by_training,
    time_dependent_auc,
    uno_c,
)


def cohort(n: int, seed: int, effect: float = 1.0, n_folds: int = 5, tied: bool = True) -> pd.DataFrame:
    """Patients with a true log-hazard ``x``, a weaker model ``noisy`` and fold labels.

    ``tied``: whole-month times and risks rounded to 0.1 (tied times and risks, as lifelines'
    tie handling must then match); otherwise continuous.
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    time = rng.exponential(12 * np.exp(-effect * x))
    censor = rng.uniform(1, 60, n)
    out = pd.DataFrame({
        "x": x,
        "noisy": x + rng.normal(scale=2.0, size=n),
        "time": np.minimum(time, censor),
        "event": (time <= censor).astype(int),
        "fold": rng.permutation(np.arange(n) % n_folds),
    })
    if tied:
        out["time"] = np.ceil(out["time"])
        out[["x", "noisy"]] = out[["x", "noisy"]].round(1)
    return out


def lifelines_c(df: pd.DataFrame, risk: str) -> float:
    """Harrell's C from lifelines, which expects predicted survival: pass -risk."""
    return lifelines_cindex(df["time"], -df[risk], df["event"])


# --------------------------------------------------------------------------------------------
# Paired bootstrap of the C-index difference
# --------------------------------------------------------------------------------------------


def test_delta_equals_difference_of_lifelines_harrell_c():
    df = cohort(120, seed=1)
    r = paired_bootstrap_delta_c(df.time, df.event, df.x, df.noisy, n_boot=200)
    assert r.c_a == pytest.approx(lifelines_c(df, "x"), abs=1e-12)
    assert r.c_b == pytest.approx(lifelines_c(df, "noisy"), abs=1e-12)
    assert r.delta == pytest.approx(lifelines_c(df, "x") - lifelines_c(df, "noisy"), abs=1e-12)
    assert r.statistic == "pooled" and r.n_folds == 1 and r.n_valid == r.n_boot == 200
    assert r.lo <= r.delta <= r.hi and len(r.boot) == 200


def test_identical_risks_give_zero_delta_and_zero_width_ci():
    df = cohort(80, seed=2)
    for folds in (None, df.fold):
        r = paired_bootstrap_delta_c(df.time, df.event, df.noisy, df.noisy.copy(), n_boot=300, folds=folds)
        assert r.delta == 0.0 and r.lo == 0.0 and r.hi == 0.0
        assert r.p_value == 1.0
        assert np.all(r.boot == 0.0)


def test_strongly_better_model_has_ci_excluding_zero_and_small_p():
    df = cohort(150, seed=3, effect=2.0)
    r = paired_bootstrap_delta_c(df.time, df.event, df.x, df.noisy, n_boot=2000, folds=df.fold)
    assert r.delta > 0.1 and r.lo > 0
    assert r.p_value == pytest.approx(1 / 2001)  # no resample at or below 0: the floor
    swapped = paired_bootstrap_delta_c(df.time, df.event, df.noisy, df.x, n_boot=2000, folds=df.fold)
    assert swapped.delta == pytest.approx(-r.delta) and swapped.hi < 0
    assert swapped.p_value == r.p_value


def test_p_value_is_twice_the_share_of_resampled_deltas_across_zero():
    df = cohort(60, seed=4, effect=0.3)
    r = paired_bootstrap_delta_c(df.time, df.event, df.x, df.noisy, n_boot=1000, seed=5)
    across = np.mean(r.boot <= 0) if r.delta > 0 else np.mean(r.boot >= 0)
    assert 0.01 < r.p_value < 1  # a weak effect in 60 patients: not significant at the floor
    assert r.p_value == pytest.approx(min(1.0, 2 * across))
    lo, hi = np.quantile(r.boot, [0.025, 0.975])
    assert (r.lo, r.hi) == (pytest.approx(lo), pytest.approx(hi))


def test_same_seed_gives_identical_result_and_another_seed_does_not():
    df = cohort(100, seed=6)
    args = (df.time, df.event, df.x, df.noisy)
    a = paired_bootstrap_delta_c(*args, n_boot=300, seed=11, folds=df.fold)
    b = paired_bootstrap_delta_c(*args, n_boot=300, seed=11, folds=df.fold)
    c = paired_bootstrap_delta_c(*args, n_boot=300, seed=12, folds=df.fold)
    assert a == b and np.array_equal(a.boot, b.boot)
    assert a.delta == c.delta and not np.array_equal(a.boot, c.boot)


def test_folds_delta_equals_mean_of_per_fold_lifelines_differences():
    df = cohort(150, seed=7)
    r = paired_bootstrap_delta_c(df.time, df.event, df.x, df.noisy, n_boot=200, folds=df.fold)
    per_fold = [lifelines_c(part, "x") - lifelines_c(part, "noisy") for _, part in df.groupby("fold")]
    assert r.delta == pytest.approx(np.mean(per_fold), abs=1e-12)
    assert r.c_a == pytest.approx(np.mean([lifelines_c(p, "x") for _, p in df.groupby("fold")]), abs=1e-12)
    assert r.statistic == "fold mean" and r.n_folds == 5


def test_fold_mean_c_index_equals_summarize_cv_fold_mean():
    df = cohort(100, seed=8)
    oof = pd.DataFrame({"patient_id": [f"P{i}" for i in range(len(df))], "fold": df.fold, "risk": df.noisy,
                        "pfs_months": df.time, "event": df.event})
    expected = summarize_cv(oof, n_boot=10)["fold_mean"]
    assert fold_mean_c_index(df.time, df.event, df.noisy, df.fold) == pytest.approx(expected, abs=1e-12)


def test_fold_without_comparable_pairs_is_left_out_of_the_mean():
    df = cohort(60, seed=9, n_folds=3)
    df.loc[df.fold == 2, "event"] = 0  # no events: no comparable pair in fold 2
    kept = df[df.fold != 2]
    expected = np.mean([concordance_index(p.time, p.x, p.event) for _, p in kept.groupby("fold")])
    assert fold_mean_c_index(df.time, df.event, df.x, df.fold) == pytest.approx(expected)
    assert paired_bootstrap_delta_c(df.time, df.event, df.x, df.noisy, n_boot=50, folds=df.fold).n_folds == 2


def test_one_fold_bootstrap_equals_evaluation_bootstrap_cindex():
    df = cohort(90, seed=10)
    ours = bootstrap_fold_mean_c(df.time, df.event, df.noisy, None, n_boot=500, seed=3)
    theirs = bootstrap_cindex(df.time, df.noisy, df.event, n_boot=500, seed=3)
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_stratified_resampling_keeps_every_fold_size():
    folds = np.repeat([0, 1, 2], [5, 7, 9])
    groups = [np.flatnonzero(folds == k) for k in range(3)]
    w = _stratified_weights(groups, len(folds), 400, np.random.default_rng(0))
    for k, idx in enumerate(groups):
        assert np.all(w[:, idx].sum(axis=1) == len(idx)), f"fold {k} resampled across folds"
    assert w.sum(axis=0).min() > 0  # every patient drawn at some point


def test_fold_mean_bootstrap_ignores_per_fold_risk_offsets_but_pooled_does_not():
    df = cohort(120, seed=11)
    shifted = df.noisy + 3.0 * df.fold  # what separately trained fold models may do to the scale
    fold_mean = bootstrap_fold_mean_c(df.time, df.event, df.noisy, df.fold, n_boot=300)
    assert bootstrap_fold_mean_c(df.time, df.event, shifted, df.fold, n_boot=300) == pytest.approx(fold_mean)
    pooled = bootstrap_fold_mean_c(df.time, df.event, df.noisy, None, n_boot=300)
    assert bootstrap_fold_mean_c(df.time, df.event, shifted, None, n_boot=300) != pytest.approx(pooled)


def test_bootstrap_rejects_bad_arguments():
    df = cohort(30, seed=12)
    with pytest.raises(InputError, match="folds has 29 values"):
        paired_bootstrap_delta_c(df.time, df.event, df.x, df.noisy, folds=df.fold[:-1])
    with pytest.raises(InputError, match="n_boot"):
        paired_bootstrap_delta_c(df.time, df.event, df.x, df.noisy, n_boot=0)
    with pytest.raises(InputError, match="risk has 29 values"):
        bootstrap_fold_mean_c(df.time, df.event, df.x[:-1], df.fold)


# --------------------------------------------------------------------------------------------
# Standardising risks by the training fold
# --------------------------------------------------------------------------------------------


def test_standardise_by_training_uses_training_mean_and_sd_only():
    train = np.array([1.0, 2.0, 4.0, 9.0])
    test = np.array([0.0, 5.0, 100.0])
    out = standardise_by_training(test, train)
    assert out == pytest.approx((test - train.mean()) / train.std(ddof=1))
    on_train = standardise_by_training(train, train)
    assert on_train.mean() == pytest.approx(0) and on_train.std(ddof=1) == pytest.approx(1)
    assert standardise_by_training(test[:2], train) == pytest.approx(out[:2])  # no test statistics
    with pytest.raises(InputError, match="sd 0"):
        standardise_by_training(test, [2.0, 2.0])


# --------------------------------------------------------------------------------------------
# Uno's C, time-dependent AUC, integrated Brier score (scikit-survival)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split():
    """Training and test folds, test follow-up (48 months) inside the training one (60)."""
    rng = np.random.default_rng(20)

    def part(n, admin):
        x = rng.normal(size=n)
        t = rng.exponential(20 * np.exp(-x))
        c = np.minimum(rng.uniform(0, 80, n), admin)
        return x, np.minimum(t, c), t <= c

    x_tr, t_tr, e_tr = part(200, 60.0)
    x_te, t_te, e_te = part(100, 48.0)
    return {"x_tr": x_tr, "t_tr": t_tr, "e_tr": e_tr, "x_te": x_te, "t_te": t_te, "e_te": e_te,
            "y_tr": Surv.from_arrays(e_tr, t_tr), "y_te": Surv.from_arrays(e_te, t_te)}


def test_uno_c_equals_sksurv_concordance_index_ipcw(split):
    s = split
    ours = uno_c(s["t_tr"], s["e_tr"], s["t_te"], s["e_te"], s["x_te"], tau=36.0)
    theirs = concordance_index_ipcw(s["y_tr"], s["y_te"], s["x_te"], tau=36.0)[0]
    assert ours == pytest.approx(theirs, abs=1e-12)
    assert uno_c(s["t_tr"], s["e_tr"], s["t_te"], s["e_te"], s["x_te"], tau=24.0) != pytest.approx(ours)


def test_uno_c_equals_harrell_c_without_censoring():
    df = cohort(80, seed=21, tied=False)
    df["event"] = 1
    ours = uno_c(df.time, df.event, df.time, df.event, df.noisy, tau=None)
    assert ours == pytest.approx(concordance_index(df.time, df.noisy, df.event), abs=1e-12)


def test_uno_c_lowers_tau_instead_of_failing_beyond_training_follow_up(split):
    s = split
    short = s["t_tr"] < 30  # a training fold followed only up to 30 months
    with pytest.warns(TimeRangeWarning, match="tau=36 lowered"):
        ours = uno_c(s["t_tr"][short], s["e_tr"][short], s["t_te"], s["e_te"], s["x_te"], tau=36.0)
    first = s["t_te"][s["e_te"] & (s["t_te"] > s["t_tr"][short].max())].min()
    y_tr = Surv.from_arrays(s["e_tr"][short], s["t_tr"][short])
    assert ours == pytest.approx(concordance_index_ipcw(y_tr, s["y_te"], s["x_te"], tau=first)[0])


def test_time_dependent_auc_equals_sksurv_cumulative_dynamic_auc(split):
    s = split
    ours = time_dependent_auc(s["t_tr"], s["e_tr"], s["t_te"], s["e_te"], s["x_te"], times=(12, 24, 36))
    for t in (12, 24, 36):
        theirs = cumulative_dynamic_auc(s["y_tr"], s["y_te"], s["x_te"], [t])[0][0]
        assert ours[t] == pytest.approx(theirs, abs=1e-12)
    assert ours.index.name == "months" and ours.name == "auc"


def test_time_dependent_auc_skips_times_beyond_the_test_follow_up(split):
    s = split
    with pytest.warns(TimeRangeWarning, match=r"\[60.0\] months skipped"):
        ours = time_dependent_auc(s["t_tr"], s["e_tr"], s["t_te"], s["e_te"], s["x_te"], times=(24, 60))
    assert np.isnan(ours[60])
    assert ours[24] == pytest.approx(cumulative_dynamic_auc(s["y_tr"], s["y_te"], s["x_te"], [24])[0][0])


def test_integrated_brier_score_equals_sksurv(split):
    s = split
    times = np.arange(3.0, 37.0, 3.0)
    surv = breslow_survival(s["x_tr"], s["t_tr"], s["e_tr"], s["x_te"], times)
    ours = integrated_brier_score(s["t_tr"], s["e_tr"], s["t_te"], s["e_te"], surv, times)
    assert ours == pytest.approx(sksurv_ibs(s["y_tr"], s["y_te"], surv, times), abs=1e-12)
    worse = integrated_brier_score(s["t_tr"], s["e_tr"], s["t_te"], s["e_te"], np.full_like(surv, 0.5), times)
    assert ours < worse


def test_integrated_brier_score_drops_times_beyond_follow_up_with_a_warning(split):
    s = split
    times = np.array([6.0, 12.0, 24.0, 50.0])
    surv = breslow_survival(s["x_tr"], s["t_tr"], s["e_tr"], s["x_te"], times)
    with pytest.warns(TimeRangeWarning, match=r"\[50.0\] months skipped"):
        ours = integrated_brier_score(s["t_tr"], s["e_tr"], s["t_te"], s["e_te"], surv, times)
    assert ours == pytest.approx(sksurv_ibs(s["y_tr"], s["y_te"], surv[:, :3], times[:3]))
    with pytest.warns(TimeRangeWarning), pytest.raises(InputError, match="two usable time points"):
        integrated_brier_score(s["t_tr"], s["e_tr"], s["t_te"], s["e_te"], surv[:, 2:], times[2:])


# --------------------------------------------------------------------------------------------
# Breslow survival and calibration
# --------------------------------------------------------------------------------------------


def test_breslow_baseline_equals_lifelines_on_rossi():
    rossi = load_rossi()
    cph = CoxPHFitter().fit(rossi, duration_col="week", event_col="arrest")
    x = rossi.drop(columns=["week", "arrest"])
    # lifelines' baseline refers to the mean covariates: use the centred linear predictor.
    risk = ((x - x.mean()) @ cph.params_).to_numpy()
    baseline = cph.baseline_cumulative_hazard_.iloc[:, 0]
    times = baseline.index.to_numpy(dtype=float)
    surv = breslow_survival(risk, rossi.week, rossi.arrest, [0.0], times)
    assert -np.log(surv[0]) == pytest.approx(baseline.to_numpy(), abs=1e-10)
    expected = cph.predict_survival_function(x.iloc[:3], times=times).to_numpy().T
    assert breslow_survival(risk, rossi.week, rossi.arrest, risk[:3], times) == pytest.approx(expected, abs=1e-10)


def test_breslow_survival_is_nan_beyond_training_follow_up():
    with pytest.warns(TimeRangeWarning, match="beyond the longest training follow-up"):
        s = breslow_survival([0.0, 0.5, 1.0], [3.0, 5.0, 8.0], [1, 0, 1], [0.0], [4.0, 8.0, 9.0])
    assert np.isfinite(s[0, :2]).all() and np.isnan(s[0, 2])


def model_cohort(n: int, seed: int, t: float = 24.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exponential PFS with log-hazard x: S(t | x) = exp(-(t / 20) e^x); uniform censoring."""
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=0.8, size=n)
    time = rng.exponential(20 * np.exp(-x))
    censor = rng.uniform(0, 80, n)
    return x, np.minimum(time, censor), (time <= censor).astype(int), np.exp(-(t / 20) * np.exp(x))


def test_calibration_table_true_model_predicts_the_kaplan_meier_observed():
    x, time, event, true_surv = model_cohort(3000, seed=30)
    table = calibration_table(true_surv, time, event, t=24, groups=3)
    assert table["n"].tolist() == [1000, 1000, 1000]
    assert table["predicted"].is_monotonic_decreasing  # group 1 = lowest risk
    assert np.abs(table["predicted"] - table["observed"]).max() < 0.03
    assert ((table.observed_lo <= table.predicted) & (table.predicted <= table.observed_hi)).all()
    off = calibration_table(true_surv**2, time, event, t=24, groups=3)  # too pessimistic
    assert np.abs(off["predicted"] - off["observed"]).max() > 0.1


def test_breslow_fitted_on_training_half_is_calibrated_on_the_other_half():
    x, time, event, _ = model_cohort(20000, seed=31)  # large: baseline and KM noise ~0.01
    train, test = slice(0, 10000), slice(10000, None)
    surv = breslow_survival(x[train] + 5.0, time[train], event[train], x[test] + 5.0, [24.0])[:, 0]
    table = calibration_table(surv, time[test], event[test], t=24, groups=3)
    assert np.abs(table["predicted"] - table["observed"]).max() < 0.03


def test_calibration_table_observed_is_nan_when_follow_up_ends_before_t():
    with pytest.warns(TimeRangeWarning, match="follow-up ends"):
        table = calibration_table([0.9, 0.8, 0.3, 0.2], [30.0, 28.0, 10.0, 12.0], [0, 0, 1, 0], t=24, groups=2)
    assert table.loc[1, "observed"] == 1.0 and np.isnan(table.loc[2, "observed"])


def test_docstring_examples_run():
    import doctest

    import psma_lib.metrics

    result = doctest.testmod(psma_lib.metrics)
    assert result.attempted > 0 and result.failed == 0
