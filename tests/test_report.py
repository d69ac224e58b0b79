"""The book's tables and analyses: formatted from the stored results, numbers unchanged."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from psma_lib import analysis, book, pipeline, plots, report
from psma_lib.crop import load_crops
from psma_lib.cv import CVConfig
from psma_lib.errors import InputError
from psma_lib.evaluation import assign_risk_groups, km_summary, logrank, risk_group_cutoffs
from psma_lib.testing import tiny_patients


def test_table_one_hand_computed_values():
    table = report.table_one(tiny_patients()).set_index(["characteristic", "level", "statistic"])
    value, missing = table["value"], table["missing"]
    assert value["Patients", "", "n"] == "6"
    assert value["Age (years)", "", "median (IQR)"] == "68.0 (64.0–72.0)"
    assert value["Age (years)", "", "range"] == "60.0–76.0"
    assert missing["Age (years)", "", "range"] == 1
    assert value["PSA (ng/mL)", "", "median (IQR)"] == "3.5 (2.2–4.8)"  # 2.25 and 4.75 to 1 decimal
    assert value["ECOG performance status", "0", "n (%)"] == "3 (60 %)"  # of the 5 known
    assert value["ECOG performance status", "2", "n (%)"] == "1 (20 %)"
    assert missing["ECOG performance status", "1", "n (%)"] == 1
    assert value["Gleason score", "8", "n (%)"] == "3 (50 %)"
    assert value["ADT", "received", "n (%)"] == "5 (83 %)"
    assert value["Docetaxel", "received", "n (%)"] == "0 (0 %)"
    assert value["Radiotherapy", "received", "n (%)"] == "2 (40 %)"
    assert value["PSA progression observed", "yes", "n (%)"] == "3 (50 %)"
    # Reverse KM (censorings at 4, 8, 12 are its events): S = 4/5 at 4, 4/5 * 2/3 at 8 -> 8/15,
    # 0 at 12: median follow-up 12. KM of PFS: 5/6 at 2, 5/6 * 3/4 = 5/8 at 6, 5/8 * 1/2 at 10.
    assert value["Follow-up, reverse KM (months)", "", "median (95 % CI)"].startswith("12.0 (")
    assert value["PSA-PFS, Kaplan-Meier (months)", "", "median (95 % CI)"].startswith("10.0 (")


def test_table_one_rounds_percentages_half_up_and_says_not_reached():
    patients = tiny_patients()
    patients = pd.concat([patients, patients.iloc[:2]], ignore_index=True)  # 8 patients
    patients["arpi"] = [1, 1, 1, 0, 0, 0, 0, 0]  # 37.5 %
    table = report.table_one(patients).set_index(["characteristic", "level", "statistic"])
    assert table["value"]["ARPI", "received", "n (%)"] == "3 (38 %)"
    # one progression in six: the Kaplan-Meier curve never reaches 0.5
    few_events = report.table_one(tiny_patients().assign(event=[1, 0, 0, 0, 0, 0]))
    pfs = few_events.set_index("characteristic").loc["PSA-PFS, Kaplan-Meier (months)", "value"]
    assert pfs.startswith("not reached (")


def test_table_one_names_missing_or_non_numeric_column():
    with pytest.raises(InputError, match="gleason"):
        report.table_one(tiny_patients().drop(columns="gleason"))
    with pytest.raises(InputError, match="'bmi' must be numeric"):
        report.table_one(tiny_patients().assign(bmi=["20", "x", "22", "23", "24", "25"]))


def test_lesion_site_table_counts_and_medians():
    lesions = pd.DataFrame({"patient_id": ["p1", "p1", "p2", "p3"],
                            "site": ["bone", "bone", "lymph_node", ""],
                            "suvmax": [10.0, 20.0, 5.0, 7.0], "volume_ml": [1.0, 3.0, 2.0, 0.5]})
    table = report.lesion_site_table(lesions).set_index("Site")
    assert table.loc["bone", "Lesions, n (%)"] == "2 (50 %)"
    assert table.loc["bone", "SUVmax, median (IQR)"] == "15.0 (12.5–17.5)"
    assert table.loc["unknown", "Patients, n"] == 1


def test_montage_selection_spans_each_sites_suvmax_range():
    lesions = pd.DataFrame({"site": ["bone"] * 5 + ["visceral"],
                            "suvmax": [3.0, 50.0, 10.0, 20.0, 5.0, 8.0]})
    picks = plots.montage_selection(lesions, per_site=3)
    assert lesions.loc[picks, "suvmax"].tolist() == [3.0, 10.0, 50.0, 8.0]


def test_architecture_summary_counts_every_parameter():
    from psma_lib.models import SurvivalModel
    from psma_lib.vocabulary import CLINICAL_COLUMNS

    table = analysis.architecture_summary("multimodal", "resnet18", (2, 32, 32))
    model = SurvivalModel("multimodal", "resnet18", n_clinical=len(CLINICAL_COLUMNS))
    counts = table.set_index("Block")["Parameters"].str.replace(",", "").astype(int)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts.drop("total").sum() == counts["total"]
    assert table.set_index("Block").loc["layer4", "Output shape"] == "1 × 512 × 1 × 1"


def test_tables_of_a_run_show_its_stored_results(tiny_crops, tmp_path):
    run = pipeline.run_cv(load_crops(tiny_crops), tmp_path,
                          CVConfig(modality="clinical", model="coxph", folds=3, n_bootstrap=50, progress=False))
    from psma_lib.comparison import summary_table

    headline = summary_table({"cox": run.out_dir}, n_boot=50)
    row = report.ablation_table([run], headline).iloc[0]
    sm = run.summary
    assert (row["Backbone"], row["Model"], row["Paper's fold range"]) == ("—", "Cox (lifelines)", "0.53–0.65")
    assert row["Fold range (min–max)"] == report.fmt_range(sm["fold_min"], sm["fold_max"])
    h = headline.iloc[0]
    assert row["Fold-mean C (95 % CI)"] == report.fmt_ci(h["fold_mean"], h["ci_low"], h["ci_high"])
    assert h["fold_mean"] == pytest.approx(sm["fold_mean"])  # the same statistic, computed twice
    config = report.cv_config_table(run.config).set_index("Setting")["Value"]
    assert (config["model"], config["backbone"]) == ("coxph", "—")
    folds = report.fold_table(run)
    assert folds["C-index (patient level)"].tolist() == [f"{c:.3f}" for c in run.fold_results["c_index"]]
    assert folds["Test patients"].sum() == 24
    train = run.train_predictions
    groups = assign_risk_groups(run.oof, train)
    cut = report.cutoff_table(risk_group_cutoffs(train), train, groups).set_index("Fold")
    assert cut["Training patients"].tolist() == [16, 16, 16]  # 24 patients, 3 folds
    assert (cut["Cutoff (training-fold median risk)"]
            == [f"{c:.3f}" for c in groups.groupby("fold")["cutoff"].first()]).all()
    km = km_summary(groups["pfs_months"], groups["event"], groups["group"])
    _, p = logrank(groups["pfs_months"], groups["event"], groups["group"])
    assert set(report.km_table(km)["Paper, months"]) <= {"19.7", "26.0"}
    headline = report.headline_table([run], None, km, p).set_index("Quantity")["This book"]
    assert headline["C-index, clinical Cox (lifelines)"].startswith(f"pooled {sm['pooled']:.3f} (")
    assert headline["Log-rank p (high vs low risk)"] == f"{p:.2g}"


def test_oracle_pooled_c_index_does_not_depend_on_the_folds():
    patients = tiny_patients()
    truth = pd.DataFrame({"patient_id": patients["patient_id"], "linear_predictor": [1.0, 2, 0, -1, 0.5, -2]})
    folds = pd.DataFrame({"patient_id": patients["patient_id"], "fold": [0, 0, 0, 1, 1, 1]})
    one, two = (analysis.oracle_c_index(truth, patients, f, n_boot=50) for f in (None, folds))
    assert (one["pooled"], one["pooled_lo"], one["pooled_hi"]) == (two["pooled"], two["pooled_lo"], two["pooled_hi"])
    assert (one["n_folds"], two["n_folds"]) == (1, 2)


def test_oracle_of_each_part_ranks_by_that_part_alone():
    """The imaging and clinical parts' oracles are the C-indices of those truth columns (compared
    with lifelines' concordance_index on the same patients), and the table has a row per part."""
    from lifelines.utils import concordance_index as lifelines_c

    patients = tiny_patients()
    truth = pd.DataFrame({"patient_id": patients["patient_id"], "linear_predictor": [1.0, 2, 0, -1, 0.5, -2],
                          "imaging_part": [2.0, -1, 0.5, 0, 1, 3], "clinical_part": [0.1, 0.3, -0.2, 0.0, 0.4, -0.1]})
    oracles = {analysis.ORACLE_PARTS[p]: analysis.oracle_c_index(truth, patients, n_boot=20, part=p)
               for p in analysis.ORACLE_PARTS}
    for part, name in analysis.ORACLE_PARTS.items():
        expected = lifelines_c(patients["pfs_months"], -truth[part], patients["event"])
        assert oracles[name]["pooled"] == pytest.approx(expected)
    assert len({o["pooled"] for o in oracles.values()}) == 3
    assert list(report.oracle_table(oracles)["Ranked by the true"]) == list(analysis.ORACLE_PARTS.values())
    with pytest.raises(ValueError, match="part"):
        analysis.oracle_c_index(truth, patients, part="frailty")


def test_html_table_has_a_caption_and_no_index():
    html = report.html_table(pd.DataFrame({"a": [1], "b": ["x"]}), caption="Cap").to_html()
    assert "<table" in html and "Cap" in html and "psma-table" in html


def test_settings_table_and_banner(tmp_path):
    s = book.settings(profile="ci", output_dir=tmp_path)
    values = report.settings_table(s).set_index("Parameter")["Value"]
    assert values["profile"] == "ci" and values["manifest"] == "default synthetic cohort"
    assert values["output folder"] == str(tmp_path)  # outside the repository: as it is
    inside = report.settings_table(book.settings(profile="ci", output_dir="_build/results/ci"))
    inside = inside.set_index("Parameter")["Value"]
    assert inside["output folder"] == "_build/results/ci"  # not this machine's absolute path
    banner = report.data_banner({"synthetic": True, "cohort_name": "synthetic-both-seed0"}, "ci", "m.yaml")
    assert "SYNTHETIC" in banner.data and "synthetic-both-seed0" in banner.data
    assert "Real cohort" in report.data_banner({"synthetic": False}, "ci", "m.yaml").data


def test_delta_table_rows_are_the_paired_bootstrap_of_the_two_runs(tiny_crops, tmp_path):
    from psma_lib.comparison import delta_table, read_run
    from psma_lib.metrics import paired_bootstrap_delta_c

    crops = load_crops(tiny_crops)
    common = dict(modality="clinical", model="coxph", folds=3, n_bootstrap=50, progress=False)
    runs = {name: pipeline.run_cv(crops, tmp_path, CVConfig(covariates=covariates, **common)).out_dir
            for name, covariates in (("clinical", "clinical"), ("count", "count"))}
    row = delta_table(runs, [("clinical", "count")], n_boot=200, seed=3).iloc[0]
    a, b = read_run(runs["clinical"])[0], read_run(runs["count"])[0]
    d = paired_bootstrap_delta_c(a["pfs_months"], a["event"], a["risk"], b["risk"], n_boot=200, seed=3, folds=a["fold"])
    assert row["comparison"] == "clinical − count"
    assert (row["c_a"], row["c_b"], row["delta"], row["ci_low"], row["ci_high"], row["p_value"]) == \
        (d.c_a, d.c_b, d.delta, d.lo, d.hi, d.p_value)
    assert row["ci_low"] <= row["delta"] <= row["ci_high"]


def test_comparison_and_repeat_tables_and_the_conclusion_follow_the_numbers():
    summary = pd.DataFrame({"model": ["net", "noise"], "fold_mean": [0.71, 0.69], "ci_low": [0.63, np.nan],
                            "ci_high": [0.79, np.nan], "fold_min": [0.6, np.nan], "fold_max": [0.8, np.nan],
                            "pooled_standardised": [0.7, np.nan]})
    shown = report.comparison_table(summary).set_index("Model")
    assert shown.loc["net"].tolist() == ["0.710 (0.630–0.790)", "0.60–0.80", "0.700"]
    assert shown.loc["noise"].tolist() == ["0.690", "", ""]
    means = pd.DataFrame({"repeat": [0, 1], "fold seed": [0, 1], "net": [0.70, 0.74]})
    assert report.repeat_table(means, ["net"])["net"].tolist() == ["0.700", "0.740", "0.720 (0.700–0.740)"]
    deltas = pd.DataFrame({"comparison": ["net − count", "mm − clinical"], "delta": [-0.01, 0.13],
                           "ci_low": [-0.08, 0.03], "ci_high": [0.06, 0.23]})
    box = report.images_add_conclusion(deltas).data
    assert "does not beat counting lesions" in box and "ranks patients better" in box
    assert "ranks patients better than counting" in report.images_add_conclusion(deltas.iloc[::-1]).data
    with_reader = pd.concat([deltas, pd.DataFrame({"comparison": ["imaging reader − lesion count (Cox)"],
                                                   "delta": [0.05], "ci_low": [0.01], "ci_high": [0.09]})])
    box = report.images_add_conclusion(with_reader).data
    assert "The imaging network does not beat" in box and "The imaging reader ranks patients better" in box
