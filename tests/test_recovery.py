"""Structural baselines and lesion-level truth recovery (psma_lib.recovery)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.special import logsumexp
from scipy.stats import spearmanr

from psma_lib.recovery import (
    fold_mean_c,
    lesion_truth_table,
    noise_baseline,
    noise_risks,
    truth_recovery,
)


def _cohort(n_patients: int, counts, seed: int = 0):
    """Patients whose hazard grows with their lesion count, and their lesions."""
    rng = np.random.default_rng(seed)
    counts = np.asarray(counts)
    ids = [f"P{i:03d}" for i in range(n_patients)]
    time = rng.exponential(20.0 / counts)
    patients = pd.DataFrame({"patient_id": ids, "fold": np.arange(n_patients) % 5, "pfs_months": time,
                             "event": (rng.random(n_patients) < 0.8).astype(int)})
    lesions = pd.DataFrame({"patient_id": np.repeat(ids, counts)})
    return patients, lesions


def test_noise_risks_are_the_log_sum_of_lesion_hazards():
    lesions = pd.DataFrame({"patient_id": ["b", "a", "a", "b", "b"]})
    risk = noise_risks(lesions, "sum", seed=3)
    draws = np.random.default_rng(3).standard_normal(5)
    assert risk["a"] == pytest.approx(logsumexp(draws[[1, 2]]))
    assert risk["b"] == pytest.approx(logsumexp(draws[[0, 3, 4]]))


def test_noise_through_sum_finds_the_lesion_count_and_nothing_else():
    rng = np.random.default_rng(1)
    patients, lesions = _cohort(150, rng.integers(1, 11, 150))
    counting = noise_baseline(patients, lesions, "sum", n_draws=50)
    patients_cf, lesions_cf = _cohort(150, np.full(150, 4))
    count_free = noise_baseline(patients_cf, lesions_cf, "sum", n_draws=50)
    assert counting["mean"] > 0.6  # sum aggregation hands noise the count
    assert abs(count_free["mean"] - 0.5) < 0.03 and count_free["low"] < 0.5 < count_free["high"]
    assert abs(noise_baseline(patients, lesions, "mean", n_draws=50)["mean"] - 0.5) < 0.03


def test_fold_mean_c_is_the_mean_of_per_fold_harrell_c():
    from lifelines.utils import concordance_index

    patients, lesions = _cohort(60, np.full(60, 2))
    risk = np.random.default_rng(2).normal(size=60)
    expected = np.mean([concordance_index(g["pfs_months"], -risk[g.index], g["event"])
                        for _, g in patients.groupby("fold")])
    assert fold_mean_c(patients, risk) == pytest.approx(expected)
    assert fold_mean_c(patients, pd.Series(risk, index=patients["patient_id"])) == pytest.approx(expected)


def _lesion_table(h_of, seed=0, n_patients=80):
    rng = np.random.default_rng(seed)
    n = 4 * n_patients
    t = pd.DataFrame({"patient_id": np.repeat(np.arange(n_patients), 4), "log_volume": rng.normal(size=n),
                      "log_suvmax": rng.normal(size=n), "bone": rng.integers(0, 2, n).astype(float)})
    t["necrosis"] = 1 / (1 + np.exp(-(t["log_volume"] + 0.3 * rng.normal(size=n))))  # big lesions necrotic
    t["log_hazard"] = h_of(t) + 0.3 * rng.normal(size=n)
    return t


def test_partial_correlation_separates_texture_from_size():
    size_only = truth_recovery(_lesion_table(lambda t: t["log_volume"]), n_boot=200)
    # necrosis tracks volume, so the raw correlation is high, but at fixed volume nothing is left
    assert size_only.loc["necrosis", "spearman"] > 0.6
    row = size_only.loc["necrosis | volume, SUVmax"]
    assert row["ci_low"] < 0 < row["ci_high"] and abs(row["spearman"]) < 0.15
    texture = truth_recovery(_lesion_table(lambda t: t["log_volume"] + 3 * (t["necrosis"] - 0.5)), n_boot=200)
    assert texture.loc["necrosis | volume, SUVmax", "ci_low"] > 0.2
    assert texture.loc["log_volume", "spearman"] == pytest.approx(
        spearmanr(_lesion_table(lambda t: t["log_volume"] + 3 * (t["necrosis"] - 0.5))[["log_hazard", "log_volume"]])[0])


def test_lesion_truth_table_aligns_by_lesion_id_and_names_missing_lesions():
    oof = pd.DataFrame({"patient_id": ["P1", "P1"], "lesion_id": ["b", "a"], "log_hazard": [2.0, 1.0]})
    truth = pd.DataFrame({"lesion_id": ["a", "b"], "volume_ml": [1.0, np.e], "suvmax_true": [np.e, 1.0],
                          "site": ["bone", "lymph_node"], "necrosis": [0.1, 0.9]})
    table = lesion_truth_table(oof, truth)
    assert table["log_volume"].tolist() == pytest.approx([1.0, 0.0]) and table["bone"].tolist() == [0.0, 1.0]
    with pytest.raises(KeyError, match="c"):
        lesion_truth_table(oof.assign(lesion_id=["b", "c"]), truth)


def test_structural_baselines_are_the_count_and_the_noise_of_the_same_folds():
    from psma_lib.recovery import structural_baselines

    rng = np.random.default_rng(4)
    counts = rng.integers(1, 8, 100)
    patients, lesions = _cohort(100, counts)
    base = structural_baselines(patients, lesions, "sum", n_draws=20, seed=1)
    assert base["log_count"] == pytest.approx(fold_mean_c(patients, np.log(counts)))
    assert base["noise"]["mean"] == pytest.approx(noise_baseline(patients, lesions, "sum", 20, 1)["mean"])
