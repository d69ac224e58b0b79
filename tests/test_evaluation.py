"""Survival statistics against lifelines, statsmodels and hand computation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.datasets import load_rossi
from lifelines.statistics import logrank_test
from lifelines.utils import concordance_index as lifelines_cindex
from lifelines.utils import median_survival_times
from statsmodels.duration.survfunc import survdiff

from psma_lib.errors import InputError
from psma_lib.evaluation import (
    assign_risk_groups,
    at_risk_counts,
    bootstrap_cindex,
    concordance_index,
    cox_hazard_ratios,
    fold_cindices,
    km_curves,
    km_summary,
    logrank,
    risk_group_cutoffs,
    summarize_cv,
)
from psma_lib.testing import tiny_patients


def random_survival(n: int, seed: int, n_folds: int = 5) -> pd.DataFrame:
    """Out-of-fold-like table with many tied times and tied risks; risk weakly informative."""
    rng = np.random.default_rng(seed)
    risk = np.round(rng.normal(size=n), 1)  # rounding makes tied risks
    time = np.ceil(rng.exponential(12 * np.exp(-0.7 * risk)))  # whole months: tied times
    return pd.DataFrame({
        "patient_id": [f"P{i:03d}" for i in range(n)],
        "fold": rng.permutation(np.arange(n) % n_folds),
        "risk": risk,
        "pfs_months": time,
        "event": (rng.random(n) < 0.65).astype(int),
    })


# ---------------------------------------------------------------------------- concordance


@pytest.mark.parametrize("seed", range(5))
def test_concordance_matches_lifelines_with_tied_times_and_risks(seed):
    df = random_survival(80, seed)
    assert df["pfs_months"].duplicated().any() and df["risk"].duplicated().any()
    ours = concordance_index(df.pfs_months, df.risk, df.event)
    reference = lifelines_cindex(df.pfs_months, -df.risk, df.event)
    assert ours == pytest.approx(reference, abs=1e-12)


def test_concordance_counted_in_row_blocks_matches_lifelines_for_large_n():
    df = random_survival(2500, seed=21)  # more rows than one block of 1024
    ours = concordance_index(df.pfs_months, df.risk, df.event)
    assert ours == pytest.approx(lifelines_cindex(df.pfs_months, -df.risk, df.event), abs=1e-12)


def test_concordance_hand_example_with_tied_event_and_censoring_time():
    # Comparable pairs (earlier event first): the event at 2 with all 4 others (concordant);
    # the event at 5 with the censoring at 5 (still at risk; equal risks: 0.5), with 7
    # (discordant) and with 9 (concordant). The event at 9 has no later patient.
    time = [2, 5, 5, 7, 9]
    event = [1, 1, 0, 0, 1]
    risk = [1.0, 0.5, 0.5, 0.7, -1.0]
    assert concordance_index(time, risk, event) == pytest.approx((5 + 0.5) / 7)


def test_concordance_without_comparable_pairs_raises():
    with pytest.raises(InputError, match="comparable"):
        concordance_index([1, 2, 3], [0.1, 0.2, 0.3], [0, 0, 0])


def test_concordance_rejects_missing_risk_and_bad_event():
    with pytest.raises(InputError, match="risk"):
        concordance_index([1, 2, 3], [0.1, np.nan, 0.3], [1, 0, 1])
    with pytest.raises(InputError, match="event"):
        concordance_index([1, 2, 3], [0.1, 0.2, 0.3], [1, 2, 1])
    with pytest.raises(InputError, match="time"):
        concordance_index([1, 0, 3], [0.1, 0.2, 0.3], [1, 0, 1])


def test_bootstrap_matches_explicit_patient_resampling_with_lifelines():
    df = random_survival(40, seed=11)
    n_boot, seed, alpha = 60, 3, 0.1
    c, lo, hi = bootstrap_cindex(df.pfs_months, df.risk, df.event, n_boot=n_boot, seed=seed, alpha=alpha)
    # The same resamples, materialised: patient i drawn counts[i] times.
    counts = np.random.default_rng(seed).multinomial(len(df), np.full(len(df), 1 / len(df)), size=n_boot)
    boot = []
    for w in counts:
        s = df.loc[np.repeat(np.arange(len(df)), w)]
        boot.append(lifelines_cindex(s.pfs_months, -s.risk, s.event))
    assert c == pytest.approx(lifelines_cindex(df.pfs_months, -df.risk, df.event), abs=1e-12)
    assert (lo, hi) == pytest.approx(tuple(np.quantile(boot, [alpha / 2, 1 - alpha / 2])), abs=1e-12)


def test_bootstrap_is_seeded():
    df = random_survival(50, seed=2)
    a = bootstrap_cindex(df.pfs_months, df.risk, df.event, n_boot=200, seed=5)
    b = bootstrap_cindex(df.pfs_months, df.risk, df.event, n_boot=200, seed=5)
    c = bootstrap_cindex(df.pfs_months, df.risk, df.event, n_boot=200, seed=6)
    assert a == b and a != c and a[1] < a[0] < a[2]


# ---------------------------------------------------------------------------- CV summaries


def test_summarize_cv_fold_statistics_match_lifelines_per_fold():
    oof = random_survival(100, seed=4)
    expected = [
        lifelines_cindex(part.pfs_months, -part.risk, part.event) for _, part in oof.groupby("fold")
    ]
    summary = summarize_cv(oof, n_boot=100, seed=0)
    assert list(summary["fold_c_index"].values()) == pytest.approx(expected, abs=1e-12)
    assert summary["fold_min"] == pytest.approx(min(expected))
    assert summary["fold_max"] == pytest.approx(max(expected))
    assert summary["fold_mean"] == pytest.approx(np.mean(expected))
    assert summary["fold_sd"] == pytest.approx(np.std(expected, ddof=1))
    assert summary["pooled"] == pytest.approx(lifelines_cindex(oof.pfs_months, -oof.risk, oof.event))
    assert summary["pooled_lo"] < summary["pooled"] < summary["pooled_hi"]
    assert (summary["n_folds"], summary["n_patients"], summary["n_events"]) == (5, 100, oof.event.sum())


def test_fold_without_events_has_nan_cindex_and_is_left_out_of_the_range():
    oof = random_survival(60, seed=8)
    oof.loc[oof.fold == 2, "event"] = 0
    per_fold = fold_cindices(oof)
    assert np.isnan(per_fold[2]) and per_fold.drop(2).notna().all()
    summary = summarize_cv(oof, n_boot=50)
    assert summary["n_folds"] == 4
    assert summary["fold_min"] == pytest.approx(per_fold.drop(2).min())


def test_summarize_cv_mirrors_when_every_risk_is_reversed():
    good = random_survival(60, seed=1)
    flipped = summarize_cv(good.assign(risk=-good.risk), n_boot=100)
    # C -> 1 - C when ties in risk count one half
    assert flipped["pooled"] == pytest.approx(1 - summarize_cv(good, n_boot=100)["pooled"])


def test_summarize_cv_rejects_duplicate_patient_and_missing_column():
    oof = random_survival(20, seed=0)
    with pytest.raises(InputError, match="patient P003"):
        summarize_cv(pd.concat([oof, oof.iloc[[3]]]), n_boot=10)
    with pytest.raises(InputError, match="risk"):
        summarize_cv(oof.drop(columns="risk"), n_boot=10)


# ---------------------------------------------------------------------------- risk groups


def cv_with_training_predictions(n: int = 50, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """OOF table plus, per fold, risks for that fold's training patients (shifted per fold)."""
    oof = random_survival(n, seed)
    rng = np.random.default_rng(seed + 100)
    train = []
    for fold in sorted(oof.fold.unique()):
        others = oof[oof.fold != fold]
        train.append(pd.DataFrame({
            "fold": fold, "patient_id": others.patient_id, "risk": rng.normal(loc=fold, size=len(others)),
        }))
    return oof, pd.concat(train, ignore_index=True)


def test_cutoffs_equal_training_medians_and_groups_follow_them():
    oof, train = cv_with_training_predictions()
    grouped = assign_risk_groups(oof, train)
    for fold, part in grouped.groupby("fold"):
        median = np.median(train.loc[train.fold == fold, "risk"])
        assert np.allclose(part.cutoff, median)
        assert (part.group == np.where(part.risk > median, "high", "low")).all()
    assert risk_group_cutoffs(train).to_dict() == pytest.approx(
        {k: np.median(v) for k, v in train.groupby("fold")["risk"]}
    )


def test_changing_a_test_risk_does_not_move_any_cutoff():
    oof, train = cv_with_training_predictions()
    before = assign_risk_groups(oof, train)
    changed = oof.copy()
    changed.loc[changed.index[:5], "risk"] += 100.0
    after = assign_risk_groups(changed, train)
    assert np.array_equal(before.cutoff, after.cutoff)
    assert (after.group.iloc[:5] == "high").all()
    assert (before.group.iloc[5:] == after.group.iloc[5:]).all()


def test_other_quantile_uses_training_quantile():
    oof, train = cv_with_training_predictions()
    grouped = assign_risk_groups(oof, train, quantile=0.25)
    fold0 = train.loc[train.fold == 0, "risk"]
    assert grouped.loc[grouped.fold == 0, "cutoff"].iloc[0] == pytest.approx(np.quantile(fold0, 0.25))


def test_risk_groups_reject_leakage_and_missing_fold():
    oof, train = cv_with_training_predictions()
    test_patient = oof[oof.fold == 1].patient_id.iloc[0]
    leaked = pd.concat([train, pd.DataFrame({"fold": [1], "patient_id": [test_patient], "risk": [0.0]})])
    with pytest.raises(InputError, match=f"patient {test_patient}.*leakage"):
        assign_risk_groups(oof, leaked)
    with pytest.raises(InputError, match="fold"):
        assign_risk_groups(oof, train[train.fold != 3])


# ---------------------------------------------------------------------------- Kaplan-Meier


def test_km_median_hand_computed():
    # Median = first time with S(t) <= 1/2 (values chosen so S never equals 1/2 exactly).
    # Group a: events at 1..5 -> S = 4/5, 3/5, 2/5 at t = 3: median 3.
    # Group b: event 2, censored 3, events 4 and 8 -> S(2) = 3/4, S(4) = 3/4 * 1/2 = 3/8: median 4.
    time = [1, 2, 3, 4, 5, 2, 3, 4, 8]
    event = [1, 1, 1, 1, 1, 1, 0, 1, 1]
    groups = ["a"] * 5 + ["b"] * 4
    summary = km_summary(time, event, groups)
    assert summary["median"].to_dict() == {"a": 3.0, "b": 4.0}
    assert summary["n"].to_dict() == {"a": 5, "b": 4}
    assert summary["events"].to_dict() == {"a": 5, "b": 3}


def test_km_summary_and_curves_match_lifelines():
    df = random_survival(70, seed=9)
    groups = np.where(df.risk > 0, "high", "low")
    summary = km_summary(df.pfs_months, df.event, groups)
    curves = km_curves(df.pfs_months, df.event, groups)
    assert list(summary.index) == ["low", "high"]
    for g in ("low", "high"):
        sel = groups == g
        kmf = KaplanMeierFitter().fit(df.pfs_months[sel], df.event[sel])
        ci = median_survival_times(kmf.confidence_interval_)
        assert summary.loc[g, "median"] == kmf.median_survival_time_
        assert (summary.loc[g, "median_lo"], summary.loc[g, "median_hi"]) == (ci.iloc[0, 0], ci.iloc[0, 1])
        curve = curves[curves.group == g]
        np.testing.assert_allclose(curve.survival, kmf.survival_function_.iloc[:, 0])
        np.testing.assert_allclose(curve.lo, kmf.confidence_interval_survival_function_.iloc[:, 0])
        assert curve.time.iloc[0] == 0 and curve.survival.iloc[0] == 1


def test_at_risk_counts_hand_computed():
    table = at_risk_counts([3, 5, 8, 9, 12], ["low", "high", "low", "high", "high"], [0, 5, 10])
    assert list(table.index) == ["low", "high"]
    assert table.loc["low"].tolist() == [2, 1, 0]
    assert table.loc["high"].tolist() == [3, 3, 1]


def test_logrank_hand_computed_two_groups():
    # A: events at 1, 3; B: events at 2, 4. Observed - expected for A = 2 - (1/2 + 1/3 + 1/2) = 2/3,
    # hypergeometric variance 1/4 + 2/9 + 1/4 = 13/18, so chi-square = (4/9) / (13/18) = 8/13.
    stat, p = logrank([1, 3, 2, 4], [1, 1, 1, 1], ["A", "A", "B", "B"])
    assert stat == pytest.approx(8 / 13)
    assert p == pytest.approx(0.43276, abs=1e-4)  # chi-square(1 df) survival function at 8/13


@pytest.mark.parametrize("n_groups", [2, 3])
def test_logrank_matches_lifelines_and_statsmodels(n_groups):
    df = random_survival(90, seed=12)
    groups = np.array(["g0", "g1", "g2"])[np.arange(90) % n_groups]
    stat, p = logrank(df.pfs_months, df.event, groups)
    sm_stat, sm_p = survdiff(df.pfs_months.to_numpy(), df.event.to_numpy(), groups)
    assert stat == pytest.approx(sm_stat, rel=1e-9)
    assert p == pytest.approx(sm_p, rel=1e-9)
    if n_groups == 2:
        a = groups == "g0"
        ref = logrank_test(df.pfs_months[a], df.pfs_months[~a], df.event[a], df.event[~a])
        assert (stat, p) == pytest.approx((ref.test_statistic, ref.p_value), rel=1e-12)


def test_logrank_needs_two_groups():
    with pytest.raises(InputError, match="two groups"):
        logrank([1, 2], [1, 1], ["a", "a"])


# ---------------------------------------------------------------------------- hazard ratios


def test_cox_hazard_ratios_match_lifelines_on_rossi():
    rossi = load_rossi()
    covariates = ["fin", "age", "prio"]
    hr = cox_hazard_ratios(rossi, covariates, duration_col="week", event_col="arrest")
    cph = CoxPHFitter().fit(rossi[[*covariates, "week", "arrest"]], "week", "arrest")
    np.testing.assert_allclose(hr.loc[covariates, "hr"], np.exp(cph.params_[covariates]), rtol=1e-6)
    np.testing.assert_allclose(hr.loc[covariates, "hr_lo"], np.exp(cph.confidence_intervals_.iloc[:, 0]), rtol=1e-6)
    np.testing.assert_allclose(hr.loc[covariates, "p"], cph.summary.loc[covariates, "p"], rtol=1e-6)
    assert (hr.n_imputed == 0).all()


def test_cox_hazard_ratios_median_imputation_and_standardisation():
    rossi = load_rossi()
    holes = rossi.copy()
    holes.loc[[0, 5, 9], "age"] = np.nan
    hr = cox_hazard_ratios(holes, ["age", "prio"], duration_col="week", event_col="arrest", standardize=True)
    filled = holes.assign(age=holes.age.fillna(holes.age.median()))
    scaled = filled.assign(age=filled.age / filled.age.std(), prio=filled.prio / filled.prio.std())
    cph = CoxPHFitter().fit(scaled[["age", "prio", "week", "arrest"]], "week", "arrest")
    np.testing.assert_allclose(hr.loc[["age", "prio"], "coef"], cph.params_[["age", "prio"]], rtol=1e-6)
    assert hr.loc["age", "n_imputed"] == 3 and hr.loc["prio", "n_imputed"] == 0


def test_cox_hazard_ratios_reject_constant_covariate():
    with pytest.raises(InputError, match="docetaxel.*constant"):
        cox_hazard_ratios(tiny_patients(), ["age", "docetaxel"])
