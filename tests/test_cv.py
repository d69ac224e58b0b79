"""Cross-validation: patient-grouped folds, leakage, determinism, resume, outputs, control cohorts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines import CoxPHFitter
from safetensors.torch import load_file
from scipy.special import logsumexp
from scipy.stats import spearmanr

from psma_lib.crop import load_crops
from psma_lib.cv import (
    CVConfig,
    check_folds,
    collect,
    config_from_record,
    image_inputs,
    load_checkpoint,
    load_result,
    make_folds,
    make_model,
    run_cv,
    select_coxph_clinical_penalizer,
)
from psma_lib.errors import InputError
from psma_lib.evaluation import concordance_index as harrell_c
from psma_lib.evaluation import summarize_cv
from psma_lib.train import HISTORY_COLUMNS, SurvivalData, predict

TINY = dict(epochs=2, folds=3, batch_size=16, seed=5, progress=False, device="cpu", num_threads=1)


def _read(out, name):
    return pd.read_csv(out / name, dtype={"patient_id": str, "lesion_id": str})


def test_folds_group_patients_and_stratify_by_event():
    rng = np.random.default_rng(0)
    patients = pd.DataFrame({"patient_id": [f"P{i}" for i in range(50)], "event": rng.integers(0, 2, 50)})
    folds = make_folds(patients, 5, seed=1)
    assert sorted(folds["patient_id"]) == sorted(patients["patient_id"])
    assert folds["patient_id"].is_unique
    per_fold = folds.merge(patients).groupby("fold")["event"].agg(["size", "sum"])
    assert per_fold["size"].tolist() == [10] * 5
    assert per_fold["sum"].max() - per_fold["sum"].min() <= 1  # stratified on event
    with pytest.raises(AssertionError, match="more than one fold"):
        check_folds(pd.concat([folds, folds.iloc[:1].assign(fold=4)]), lesions=None)
    split_lesions = pd.DataFrame({"patient_id": ["P0", "P0"]})
    check_folds(folds, split_lesions)  # both lesions follow their patient
    with pytest.raises(InputError, match="too few"):
        make_folds(patients.iloc[:6], 5, seed=1)


@pytest.fixture(scope="module")
def imaging_run(tiny_crops, tmp_path_factory):
    out = tmp_path_factory.mktemp("cv") / "imaging"
    return run_cv(tiny_crops, out, CVConfig(modality="imaging", **TINY))


def test_outputs_follow_the_contract(imaging_run, tiny_crops):
    out = imaging_run.out_dir
    crops = load_crops(tiny_crops)
    oof, folds = _read(out, "oof_predictions.csv"), _read(out, "folds.csv")
    assert list(oof.columns) == ["patient_id", "fold", "risk", "pfs_months", "event"]
    assert sorted(oof["patient_id"]) == sorted(crops.patients["patient_id"])  # every patient once
    assert oof.merge(folds, on="patient_id", suffixes=("", "_f")).eval("fold == fold_f").all()
    lesion = _read(out, "oof_lesion_predictions.csv")
    assert list(lesion.columns) == ["patient_id", "lesion_id", "fold", "log_hazard"]
    assert sorted(lesion["lesion_id"]) == sorted(crops.lesions["lesion_id"])
    pd.testing.assert_frame_equal(imaging_run.oof_lesions, lesion)  # the result object reads the same file
    # default "sum" aggregation: the patient's hazard is the sum of its lesions' hazards
    summed = lesion.groupby("patient_id")["log_hazard"].agg(lambda h: logsumexp(h.to_numpy()))
    assert np.allclose(oof.set_index("patient_id")["risk"], summed.loc[oof["patient_id"]].to_numpy())
    train = _read(out, "train_predictions.csv")
    for k in range(3):
        test_ids = set(folds.loc[folds["fold"] == k, "patient_id"])
        train_ids = set(train.loc[train["fold"] == k, "patient_id"])
        assert train_ids == set(folds["patient_id"]) - test_ids  # training patients only
    results = _read(out, "fold_results.csv")
    assert list(results.columns[:7]) == ["fold", "n_train_patients", "n_val_patients", "n_test_patients",
                                         "n_test_events", "c_index", "c_index_lesion"]
    from lifelines.utils import concordance_index

    fold0 = oof[oof["fold"] == 0]
    expected = concordance_index(fold0["pfs_months"], -fold0["risk"], fold0["event"])
    assert results.loc[0, "c_index"] == pytest.approx(expected)
    history = _read(out, "history.csv")
    assert list(history.columns) == ["fold", *HISTORY_COLUMNS]
    assert history["val_loss"].isna().all()  # fixed schedule: no inner validation split
    assert (results["n_val_patients"] == 0).all() and (results["best_epoch"] == TINY["epochs"] - 1).all()
    config = json.loads((out / "config.json").read_text())
    assert config["data_checksum"] == crops.meta["data_checksum"]
    assert config["config"]["modality"] == "imaging" and "versions" in config["provenance"]
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert summary["pooled"] == pytest.approx(
        concordance_index(oof["pfs_months"], -oof["risk"], oof["event"]))
    # the one summary of the run is evaluation.summarize_cv's, stored once and read back as is
    expected = summarize_cv(oof, n_boot=imaging_run.config.n_bootstrap, seed=imaging_run.config.seed)
    assert {k: summary[k] for k in ("fold_min", "fold_max", "pooled_lo", "pooled_hi")} == pytest.approx(
        {k: expected[k] for k in ("fold_min", "fold_max", "pooled_lo", "pooled_hi")})
    loaded = load_result(out)
    assert loaded.summary == summary and loaded.config == imaging_run.config
    pd.testing.assert_frame_equal(loaded.fold_results, imaging_run.fold_results)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"fold{k}.safetensors" for k in range(3)]


def test_cpu_determinism_and_resume_after_kill(imaging_run, tiny_crops, tmp_path):
    reference = _read(imaging_run.out_dir, "oof_predictions.csv")

    class Killed(Exception):
        pass

    def kill_after_fold_1(k):
        if k == 1:
            raise Killed

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        run_cv(tiny_crops, out, CVConfig(modality="imaging", **TINY), on_fold_done=kill_after_fold_1)
    assert not (out / "oof_predictions.csv").exists()
    assert sorted(p.name for p in (out / "folds").iterdir()) == ["fold0", "fold1"]
    mtime = (out / "folds" / "fold0" / "oof.csv").stat().st_mtime_ns
    run_cv(tiny_crops, out, CVConfig(modality="imaging", **TINY))
    assert (out / "folds" / "fold0" / "oof.csv").stat().st_mtime_ns == mtime  # not recomputed
    resumed = _read(out, "oof_predictions.csv")
    # bit-identical to the uninterrupted run (CSV round trip of float64 is exact with pandas)
    pd.testing.assert_frame_equal(resumed, reference, check_exact=True)
    assert np.array_equal(resumed["risk"].to_numpy(), reference["risk"].to_numpy())
    with pytest.raises(InputError, match="different configuration"):
        run_cv(tiny_crops, out, CVConfig(modality="imaging", **{**TINY, "lr": 0.5}))


def test_imaging_model_sees_no_clinical_data(imaging_run, tiny_crops, tmp_path):
    crops = tmp_path / "crops"
    shutil.copytree(tiny_crops, crops)
    patients = pd.read_csv(crops / "patients.csv", dtype={"patient_id": str})
    rng = np.random.default_rng(0)
    for col in ("age", "bmi", "ecog", "psa", "gleason", "adt"):
        patients[col] = rng.permutation(patients[col].to_numpy())
    patients.to_csv(crops / "patients.csv", index=False)
    scrambled = run_cv(crops, tmp_path / "cv", CVConfig(modality="imaging", **TINY))
    assert np.array_equal(scrambled.oof["risk"].to_numpy(), imaging_run.oof["risk"].to_numpy())


def test_checkpoint_round_trip_reproduces_oof(imaging_run, tiny_crops):
    out = imaging_run.out_dir
    state, pre, config = load_checkpoint(out / "checkpoints" / "fold0.safetensors")
    assert config["modality"] == "imaging"
    run_config = CVConfig(**config)
    model = make_model(run_config, pre.n_features)
    model.load_state_dict(state)
    crops = load_crops(tiny_crops)
    oof = imaging_run.oof[imaging_run.oof["fold"] == 0]
    ids = list(oof["patient_id"])
    mask = crops.lesions["patient_id"].isin(ids).to_numpy()
    lesions = crops.lesions[mask].reset_index(drop=True)
    data = SurvivalData(torch.ones(len(ids)), torch.ones(len(ids), dtype=torch.long), None,
                        image_inputs(crops, crops.lesions, run_config.backbone, run_config.view,
                                     run_config.channels)[mask],
                        torch.tensor(lesions["patient_id"].map({p: i for i, p in enumerate(ids)}).to_numpy()))
    risk, _ = predict(model, data, config["aggregation"])
    assert np.allclose(risk, oof["risk"].to_numpy(), atol=1e-6)
    # the saved preprocessor is the training fold's
    folds = _read(out, "folds.csv")
    train_ids = folds.loc[folds["fold"] != 0, "patient_id"]
    age = crops.patients.set_index("patient_id").loc[train_ids, "age"]
    assert pre.mean[0].item() == pytest.approx(age.fillna(age.median()).mean())
    assert set(load_file(out / "checkpoints" / "fold0.safetensors")) >= {"clinical.mean", "clinical.std"}


def test_clinical_preprocessing_fitted_on_training_fold_only(tiny_crops, tmp_path):
    config = CVConfig(modality="clinical", model="coxph", **TINY)
    base = run_cv(tiny_crops, tmp_path / "base", config)
    crops = tmp_path / "crops"
    shutil.copytree(tiny_crops, crops)
    patients = pd.read_csv(crops / "patients.csv", dtype={"patient_id": str})
    fold0 = set(base.oof.loc[base.oof["fold"] == 0, "patient_id"])
    patients.loc[patients["patient_id"].isin(fold0), "age"] = 109.0  # extreme test-fold values
    patients.to_csv(crops / "patients.csv", index=False)
    changed = run_cv(crops, tmp_path / "changed", config)
    means = {name: [load_checkpoint(r.out_dir / "checkpoints" / f"fold{k}.safetensors")[1].mean[0].item()
                    for k in range(3)] for name, r in (("base", base), ("changed", changed))}
    assert means["base"][0] == means["changed"][0]  # fold 0's test patients never fitted
    assert means["base"][1] != means["changed"][1]  # but they are training patients of fold 1


def test_coxph_baseline_same_folds_matches_lifelines(imaging_run, tiny_crops, tmp_path):
    result = run_cv(tiny_crops, tmp_path / "coxph", CVConfig(modality="clinical", model="coxph", **TINY))
    pd.testing.assert_frame_equal(_read(result.out_dir, "folds.csv"), _read(imaging_run.out_dir, "folds.csv"))
    assert sorted(result.oof["patient_id"]) == sorted(imaging_run.oof["patient_id"])
    _, pre, _ = load_checkpoint(result.out_dir / "checkpoints" / "fold0.safetensors")
    patients = load_crops(tiny_crops).patients.set_index("patient_id")
    train = patients.loc[result.oof.loc[result.oof["fold"] != 0, "patient_id"]].reset_index()
    test = patients.loc[result.oof.loc[result.oof["fold"] == 0, "patient_id"]].reset_index()
    n = len(pre.columns)  # the baseline uses the imputed columns, not the missing indicators
    x = pre.transform(train).numpy()[:, :n]
    keep = x.std(0) > 1e-8
    frame = pd.DataFrame(x[:, keep]).add_prefix("x").assign(T=train["pfs_months"], E=train["event"])
    cph = CoxPHFitter(penalizer=0.01).fit(frame, "T", "E")
    expected = pd.DataFrame(pre.transform(test).numpy()[:, :n][:, keep]).add_prefix("x") @ cph.params_.to_numpy()
    got = result.oof[result.oof["fold"] == 0].set_index("patient_id").loc[test["patient_id"], "risk"]
    assert np.allclose(got.to_numpy(), expected.to_numpy(), atol=1e-4)


def test_coxph_inner_penalty_cv_likelihood_matches_lifelines_fits_on_rossi():
    """The cross-validated partial log-likelihood of each clinical penalty equals the one computed
    from lifelines fits with a penalizer per column (grid value on the "clinical" columns, 0.01 on
    the rest) on the same inner folds, scored with lifelines' own Efron likelihood; same choice."""
    from lifelines.datasets import load_rossi

    from psma_lib.cv import CLINICAL_PENALIZER_GRID, COXPH_PENALIZER

    rossi = load_rossi()
    columns = ["fin", "age", "race", "wexp", "mar", "paro", "prio"]
    z = ((rossi[columns] - rossi[columns].mean()) / rossi[columns].std(ddof=0)).to_numpy()
    train = pd.DataFrame({"patient_id": [f"r{i:03d}" for i in range(len(rossi))],
                          "pfs_months": rossi["week"].astype(float), "event": rossi["arrest"]})
    got = select_coxph_clinical_penalizer(z, train, n_clinical=4, seed=3)
    inner = make_folds(train, 5, 3)
    frame = pd.DataFrame(z, columns=columns).assign(T=train["pfs_months"], E=train["event"])
    expected = {}
    for penalizer in CLINICAL_PENALIZER_GRID:
        total = 0.0
        for k in range(5):
            fit = (inner["fold"] != k).to_numpy()
            cph = CoxPHFitter(penalizer=np.r_[[penalizer] * 4, [COXPH_PENALIZER] * 3]).fit(frame[fit], "T", "E")
            total += cph.score(frame) * len(frame) - cph.score(frame[fit]) * fit.sum()  # score: mean log PL
        expected[penalizer] = total
    expected = pd.Series(expected)
    # lifelines rescales each inner fold's columns before penalising them: hundredths on ~770
    np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), atol=0.05, rtol=0)
    assert got.idxmax() == expected.idxmax()


@pytest.mark.parametrize("covariates", ["clinical", "clinical+biomarkers"])
def test_coxph_baseline_with_inner_clinical_penalty_is_lifelines_with_the_penalty_its_training_patients_choose(
        covariates, tiny_crops, tmp_path):
    """``clinical_penalty="inner"`` on a baseline with clinical columns: each fold's clinical
    columns get the inner-CV choice of its training patients (stored, noted), any biomarkers keep
    0.01, and the test risks are lifelines' fit with those penalties per column."""
    from psma_lib.cv import COXPH_PENALIZER, coxph_design, fold_seed

    config = CVConfig(modality="clinical", model="coxph", covariates=covariates, clinical_penalty="inner", **TINY)
    assert config.run_defining()["clinical_penalty"] == "inner"
    result = run_cv(tiny_crops, tmp_path / "inner", config)
    crops = load_crops(tiny_crops)
    patients, lesions = crops.patients.astype({"patient_id": str}), crops.lesions.astype({"patient_id": str})
    by_id = patients.set_index("patient_id")
    fold_results = pd.read_csv(result.out_dir / "fold_results.csv")
    for k in range(3):
        train_ids = sorted(result.oof.loc[result.oof["fold"] != k, "patient_id"])
        test_ids = sorted(result.oof.loc[result.oof["fold"] == k, "patient_id"])
        design = coxph_design(covariates, patients, lesions, train_ids)
        train = by_id.loc[train_ids].reset_index()
        chosen = select_coxph_clinical_penalizer(design(train_ids), train, 10, fold_seed(config.seed, k)).idxmax()
        stored = load_file(str(result.out_dir / "checkpoints" / f"fold{k}.safetensors"))
        assert float(stored["coxph.clinical_penalizer"]) == chosen
        assert f"clinical penalizer {chosen:g} (inner CV)" in fold_results.loc[k, "notes"]
        x = design(train_ids)
        keep = x.std(0) > 1e-8
        frame = pd.DataFrame(x[:, keep]).add_prefix("x").assign(T=train["pfs_months"], E=train["event"])
        penalties = np.r_[[chosen] * 10, [COXPH_PENALIZER] * (x.shape[1] - 10)][keep]
        cph = CoxPHFitter(penalizer=penalties).fit(frame, "T", "E")
        expected = design(test_ids)[:, keep] @ cph.params_.to_numpy()
        got = result.oof.set_index("patient_id").loc[test_ids, "risk"].to_numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4)
    with pytest.raises(InputError, match="covariates clinical or clinical\\+biomarkers"):
        CVConfig(modality="clinical", model="coxph", covariates="biomarkers", clinical_penalty="inner").validate()


def test_count_baseline_ranks_by_lesion_count_and_biomarkers_scale_on_training_folds(tiny_crops, tmp_path):
    from psma_lib.cv import coxph_design

    count = run_cv(tiny_crops, tmp_path / "count", CVConfig(modality="clinical", model="coxph",
                                                           covariates="count", **TINY))
    crops = load_crops(tiny_crops)
    n_lesions = crops.lesions.groupby("patient_id").size()
    for _, g in count.oof.groupby("fold"):  # a one-covariate Cox model is monotone in log count
        rho = spearmanr(g["risk"], np.log(n_lesions.loc[g["patient_id"]]))[0]
        assert abs(rho) == pytest.approx(1.0)
    patients, lesions = crops.patients.astype({"patient_id": str}), crops.lesions.astype({"patient_id": str})
    ids = sorted(patients["patient_id"])
    design = coxph_design("clinical+biomarkers", patients, lesions, ids[:16])
    x = design(ids)
    assert x.shape == (24, 10 + 5)
    assert np.allclose(x[:16, 10:].mean(axis=0), 0) and np.allclose(x[:16, 10:].std(axis=0), 1)
    moved = lesions.assign(volume_ml=np.where(lesions["patient_id"].isin(ids[16:]), 1e3, lesions["volume_ml"]))
    assert np.array_equal(coxph_design("biomarkers", patients, moved, ids[:16])(ids[:16]), x[:16, 10:])
    # + CT density: one more column, the patient's mean lesion hu_mean, scaled on the training fold
    with_ct = coxph_design("biomarkers+ct", patients, lesions, ids[:16])(ids)
    assert np.array_equal(with_ct[:, :5], x[:, 10:])
    density = lesions.groupby("patient_id")["hu_mean"].mean().loc[ids].to_numpy()
    assert np.allclose(with_ct[:, 5], (density - density[:16].mean()) / density[:16].std())
    with pytest.raises(InputError, match="hu_mean"):
        coxph_design("biomarkers+ct", patients, lesions.drop(columns="hu_mean"), ids[:16])
    with pytest.raises(InputError, match="coxph baselines only"):
        CVConfig(modality="imaging", covariates="count").validate()


def test_attention_model_fits_its_training_patients(tiny_crops, tmp_path):
    """A model that trains at all ranks its own training patients (24 patients, 15 epochs) well
    above chance; a constant, detached or image-blind output stays near 0.5."""
    config = CVConfig(modality="multimodal", aggregation="attention",
                      **{**TINY, "epochs": 15, "lr": 3e-3, "augment": False})
    result = run_cv(tiny_crops, tmp_path / "cv", config)
    assert len(result.oof) == 24 and np.isfinite(result.oof["risk"]).all()
    train = _read(result.out_dir, "train_predictions.csv")
    patients = load_crops(tiny_crops).patients.set_index("patient_id")
    c_train = [harrell_c(patients.loc[g["patient_id"], "pfs_months"].to_numpy(), g["risk"].to_numpy(),
                         patients.loc[g["patient_id"], "event"].to_numpy()) for _, g in train.groupby("fold")]
    assert np.mean(c_train) > 0.65, c_train


def test_r3d_18_model_fits_its_training_patients(tiny_crops, tmp_path):
    """The 3D backbone trains at all: 8 epochs rank its own training patients well above chance
    (0.90, 0.83, 0.72 here); with ``max`` pooling of an imaging model, an image-blind or constant
    lesion output ties every pair (C 0.5)."""
    config = CVConfig(modality="imaging", backbone="r3d_18", aggregation="max",
                      **{**TINY, "epochs": 8, "lr": 3e-3, "augment": False})
    result = run_cv(tiny_crops, tmp_path / "cv", config)
    assert len(result.oof) == 24 and np.isfinite(result.oof["risk"]).all()
    train = _read(result.out_dir, "train_predictions.csv")
    patients = load_crops(tiny_crops).patients.set_index("patient_id")
    c_train = [harrell_c(patients.loc[g["patient_id"], "pfs_months"].to_numpy(), g["risk"].to_numpy(),
                         patients.loc[g["patient_id"], "event"].to_numpy()) for _, g in train.groupby("fold")]
    assert np.mean(c_train) > 0.65, c_train


def test_cli_runs_and_reports(tiny_crops, tmp_path, capsys):
    import argparse

    from psma_lib import cv

    parser = argparse.ArgumentParser()
    cv.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["cv", "--crops", str(tiny_crops), "--out", str(tmp_path / "cv"), "--modality",
                              "clinical", "--model", "coxph", "--folds", "3", "--seed", "5", "--no-progress"])
    assert args.func(args) == 0
    assert "clinical-coxph: patient-level C-index pooled OOF" in capsys.readouterr().out
    assert (tmp_path / "cv" / "oof_predictions.csv").is_file()
    saved = json.loads((tmp_path / "cv" / "config.json").read_text())["config"]
    assert (saved["model"], saved["backbone"], saved["folds"], saved["seed"]) == ("coxph", None, 3, 5)


def test_model_kinds_and_the_old_coxph_backbone_spelling(capsys):
    import argparse

    from psma_lib import cv

    assert (CVConfig(modality="clinical").model, CVConfig(modality="clinical").backbone) == ("mlp", None)
    assert (CVConfig(modality="imaging").model, CVConfig(modality="imaging").backbone) == ("resnet", "resnet18")
    for bad, message in ((dict(modality="clinical", backbone="coxph"), "kind of model, not an image backbone"),
                         (dict(modality="imaging", model="coxph"), "modality imaging trains model resnet"),
                         (dict(modality="clinical", model="resnet"), "modality clinical trains model mlp or coxph"),
                         (dict(modality="clinical", model="mlp", backbone="resnet18"), "has no image backbone")):
        with pytest.raises(InputError, match=message):
            CVConfig(**bad).validate()
    parser = argparse.ArgumentParser()
    cv.register_cli(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["cv", "--crops", "c", "--out", "o", "--modality", "clinical", "--backbone", "coxph"])
    assert exc.value.code == 2
    assert "--model coxph" in capsys.readouterr().err


def _corrupt_copy(tiny_crops, tmp_path, edit):
    crops = tmp_path / "crops"
    shutil.copytree(tiny_crops, crops)
    edit(crops)
    return crops


def test_bad_input_one_clear_error_and_no_output(tiny_crops, tmp_path):
    def nan_crop(crops):
        arr = np.load(crops / "crops.npy")
        arr[3, 0, 8, 8, 8] = np.nan
        np.save(crops / "crops.npy", arr)

    def bad_event(crops):
        p = pd.read_csv(crops / "patients.csv")
        p.loc[2, "event"] = 2
        p.to_csv(crops / "patients.csv", index=False)

    lesion3 = pd.read_csv(tiny_crops / "lesions.csv", dtype=str).loc[3]
    cases = [(nan_crop, f"patient {lesion3['patient_id']}.*non-finite"), (bad_event, "patient P002.*event must be 0 or 1")]
    for i, (edit, message) in enumerate(cases):
        crops = _corrupt_copy(tiny_crops, tmp_path / str(i), edit)
        out = tmp_path / str(i) / "cv"
        with pytest.raises(InputError, match=message):
            run_cv(crops, out, CVConfig(modality="imaging", **TINY))
        assert not out.exists()
    with pytest.raises(InputError, match="weights file not found"):
        run_cv(tiny_crops, tmp_path / "w", CVConfig(modality="imaging", weights=str(tmp_path / "none.pt"), **TINY))
    assert not (tmp_path / "w").exists()
    with pytest.raises(InputError, match="coxph"):
        run_cv(tiny_crops, tmp_path / "x", CVConfig(modality="imaging", model="coxph", **TINY))
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# Control cohorts: small generated cohorts with a known signal (slow: generation + short CVs)
# ---------------------------------------------------------------------------------------------

# The stem of the book's CPU profiles: these check learning and leakage, not the stem, at 2.5x less
# CPU than the library's default stem (whose own tests are above).
CONTROL = dict(epochs=12, folds=5, batch_size=16, seed=0, progress=False, device="cpu", stem="standard")
# lesion count carries no information (4 lesions each); the clinical control has a strong
# clinical signal (oracle C >= 0.75) and PSA uncoupled from tumour burden, so an honest imaging
# model has nothing to find there and a leak of clinical data would show
STRONG_CLINICAL = {"psa": 0.9, "ecog": 0.8, "gleason": 0.7, "age": 0.2, "docetaxel": 0.4, "lu_psma": 0.6}


def _control_spec(name: str):
    from psma_lib.synthetic import ClinicalSpec, ImagingSpec, OutcomeSpec, Spec, count_free

    coarse = ImagingSpec(phantom_spacing_mm=[4.0, 4.0, 3.0], ct_inplane_mm=[3.0, 3.0])
    if name == "count_free_imaging":
        return count_free(Spec(imaging=coarse), 4), "imaging", 100
    if name == "strong_clinical":
        spec = Spec(imaging=coarse, clinical=ClinicalSpec(psa_burden_correlation=0.0),
                    outcome=OutcomeSpec(clinical_coefficients=STRONG_CLINICAL))
        return count_free(spec, 4), "clinical", 80
    return Spec(imaging=coarse), "none", 60


@pytest.fixture(scope="module")
def control_crops(tmp_path_factory):
    """``name -> (crops dir, cohort dir)``, generated once per module; 32 mm / 2 mm crops."""
    from psma_lib.crop import crop_cohort
    from psma_lib.synthetic import generate_cohort

    root = tmp_path_factory.mktemp("control")
    made = {}

    def get(name: str):
        if name not in made:
            spec, signal, n = _control_spec(name)
            manifest = generate_cohort(root / name / "cohort", n_patients=n, seed=11, signal=signal, spec=spec,
                                       progress=False)
            made[name] = (crop_cohort(manifest, root / name / "crops", size_mm=32, spacing_mm=2, progress=False),
                          root / name / "cohort")
        return made[name]

    return get


def _fold_mean(result) -> float:
    return float(result.fold_results["c_index"].mean())


@pytest.mark.slow
def test_imaging_model_beats_noise_outputs_on_a_count_free_cohort(control_crops, tmp_path):
    from psma_lib.recovery import noise_baseline

    crops, _ = control_crops("count_free_imaging")
    result = run_cv(crops, tmp_path / "cv", CVConfig(modality="imaging", **CONTROL))
    lesions = load_crops(crops).lesions.astype({"patient_id": str})
    noise = noise_baseline(result.oof.reset_index(drop=True), lesions, "sum", n_draws=200, seed=0)
    assert _fold_mean(result) > noise["p95"] + 0.03, (result.fold_results, noise["p95"])


@pytest.mark.slow
def test_clinical_signal_does_not_reach_the_imaging_model(control_crops, tmp_path):
    from psma_lib.recovery import fold_mean_c, noise_baseline
    from psma_lib.synthetic import load_truth

    crops, cohort = control_crops("strong_clinical")
    coxph = run_cv(crops, tmp_path / "coxph", CVConfig(modality="clinical", model="coxph", **CONTROL))
    oof = coxph.oof.reset_index(drop=True)
    oracle = fold_mean_c(oof, load_truth(cohort).set_index("patient_id")["linear_predictor"])
    assert oracle >= 0.75 and _fold_mean(coxph) >= 0.70  # the signal is there, and learnable
    imaging = run_cv(crops, tmp_path / "imaging", CVConfig(modality="imaging", **CONTROL))
    noise = noise_baseline(oof, load_crops(crops).lesions.astype({"patient_id": str}), "sum", n_draws=200)
    assert _fold_mean(imaging) < noise["p95"], (imaging.fold_results, noise["p95"])


@pytest.mark.slow
def test_clinical_mlp_learns_a_strong_clinical_signal(control_crops, tmp_path):
    crops, _ = control_crops("strong_clinical")
    config = CVConfig(modality="clinical", **{**CONTROL, "epochs": 150, "lr": 3e-3})
    assert _fold_mean(run_cv(crops, tmp_path / "mlp", config)) >= 0.68


@pytest.mark.slow
@pytest.mark.parametrize("modality,model", [("multimodal", "resnet"), ("clinical", "coxph")])
def test_control_no_signal_stays_near_half(modality, model, control_crops, tmp_path):
    crops, _ = control_crops("none")
    result = run_cv(crops, tmp_path / "cv", CVConfig(modality=modality, model=model, **CONTROL))
    assert abs(_fold_mean(result) - 0.5) < 0.1, result.fold_results


def test_lesion_mask_channel_reaches_the_network_and_is_recorded(control_crops, tmp_path):
    from psma_lib.cv import load_checkpoint

    crops, _ = control_crops("count_free_imaging")
    config = CVConfig(modality="imaging", channels="pet,ct,mask", **{**CONTROL, "epochs": 1, "folds": 2})
    result = run_cv(crops, tmp_path / "mask", config)
    state, _, stored = load_checkpoint(result.out_dir / "checkpoints" / "fold0.safetensors")
    assert state["encoder.net.conv1.weight"].shape[1] == 3 and stored["channels"] == "pet,ct,mask"
    assert config.run_defining()["channels"] == "pet,ct,mask"
    # PET and CT (the default) is what every run made before the option was: its record omits it.
    assert "channels" not in CVConfig(modality="imaging").run_defining()


def test_concepts_head_is_linear_in_the_named_auxiliary_targets(tiny_crops, tmp_path):
    from psma_lib.cv import load_checkpoint

    config = CVConfig(modality="imaging", head="concepts", aux_targets="log_suvmax,log_volume,bone,hu_mean",
                      **{**TINY, "epochs": 1})
    result = run_cv(tiny_crops, tmp_path / "cv", config)
    state, _, stored = load_checkpoint(result.out_dir / "checkpoints" / "fold0.safetensors")
    assert state["head.weight"].shape == (1, 4) and stored["head"] == "concepts"
    assert "head" not in CVConfig(modality="imaging").run_defining()
    with pytest.raises(InputError, match="head 'concepts' .* aux_weight > 0"):
        CVConfig(modality="imaging", head="concepts", aux_weight=0).validate()


def test_stem_reaches_the_network_and_is_recorded(tiny_crops, tmp_path):
    config = CVConfig(modality="imaging", stem="no-maxpool", **{**TINY, "epochs": 1})
    result = run_cv(tiny_crops, tmp_path / "cv", config)
    _, _, stored = load_checkpoint(result.out_dir / "checkpoints" / "fold0.safetensors")
    assert stored["stem"] == "no-maxpool" and result.config.stem == "no-maxpool"
    assert isinstance(make_model(result.config, 0).encoder.net.maxpool, torch.nn.Identity)
    # the standard stem is what every run made before the option was: its record omits it
    assert "stem" not in CVConfig(modality="imaging", stem="standard").run_defining()
    with pytest.raises(InputError, match="stem 'no-maxpool' is for the 2D ResNets"):
        CVConfig(modality="imaging", backbone="r3d_18", stem="no-maxpool").validate()


def test_default_stem_drops_the_maxpool_of_2d_resnets_only():
    assert CVConfig(modality="imaging").stem == "no-maxpool" == CVConfig(backbone="resnet50").stem
    assert CVConfig(modality="imaging", backbone="r3d_18").stem == "standard"
    assert CVConfig(modality="clinical").stem == CVConfig(modality="clinical", model="coxph").stem == "standard"
    for config in (CVConfig(modality="imaging", backbone="r3d_18"), CVConfig(modality="clinical")):
        config.validate()  # the default never asks a model for a stem it does not have
    assert CVConfig(modality="imaging").run_defining()["stem"] == "no-maxpool"


def test_stored_config_without_a_stem_was_run_with_the_standard_stem(tiny_crops, tmp_path):
    config = CVConfig(modality="imaging", stem="standard", **{**TINY, "epochs": 1})
    run_cv(tiny_crops, tmp_path / "cv", config)
    stored = json.loads((tmp_path / "cv" / "config.json").read_text())
    assert "stem" not in stored["config"]
    assert config_from_record(stored).stem == "standard"
    assert collect(tmp_path / "cv").config.stem == "standard"  # the folder's own config, read back
    # results.json written before the stem existed: no stem field at all
    results = json.loads((tmp_path / "cv" / "results.json").read_text())
    del results["config"]["stem"]
    (tmp_path / "cv" / "results.json").write_text(json.dumps(results))
    assert load_result(tmp_path / "cv").config.stem == "standard"
    # a run with today's default stem in the same folder is another run, and refused
    with pytest.raises(InputError, match="different configuration"):
        run_cv(tiny_crops, tmp_path / "cv", CVConfig(modality="imaging", **{**TINY, "epochs": 1}))


def test_lesion_mask_channel_refused_where_it_cannot_be_had(tiny_crops, tmp_path):
    for text in ("ct,pet", "pet", "pet,ct,mask,mask", "pet,mask"):
        with pytest.raises(InputError, match="channels must be pet,ct or pet,ct,mask"):
            CVConfig(modality="imaging", channels=text).validate()
    # tiny_crops is a version 1 directory: PET and CT only.
    with pytest.raises(InputError, match="lesion-mask channel .* crop again"):
        run_cv(tiny_crops, tmp_path / "cv", CVConfig(modality="imaging", channels="pet,ct,mask", **TINY))
    assert not (tmp_path / "cv").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cv_on_cuda_trains_patient_bags_with_auxiliary_targets(tiny_crops, tmp_path):
    config = CVConfig(modality="multimodal", **{**TINY, "device": "cuda", "epochs": 3})
    result = run_cv(tiny_crops, tmp_path / "cv", config)
    assert np.isfinite(result.oof["risk"]).all() and result.fold_results["notes"].fillna("").eq("").all()
    history = _read(result.out_dir, "history.csv")
    assert np.isfinite(history["train_loss"]).all()


def test_lesion_inputs_are_scaled_on_training_lesions_and_reproduce_the_oof_log_hazards(tiny_crops, tmp_path):
    from psma_lib.cv import COXPH_PENALIZER, lesion_target_values, standardise_inputs
    from psma_lib.train import fit_lesion_linear

    config = CVConfig(modality="imaging", lesion_inputs="log_volume,log_suvmax", **{**TINY, "epochs": 1})
    result = run_cv(tiny_crops, tmp_path / "cv", config)
    tensors = load_file(result.out_dir / "checkpoints" / "fold0.safetensors")
    state, pre, stored = load_checkpoint(result.out_dir / "checkpoints" / "fold0.safetensors")
    assert stored["lesion_inputs"] == "log_volume,log_suvmax" and state["lesion_linear.weight"].shape == (1, 2)
    crops = load_crops(tiny_crops)
    lesions = crops.lesions.astype({"patient_id": str})
    values = lesion_target_values(lesions, ("log_volume", "log_suvmax"))
    folds = _read(result.out_dir, "folds.csv")
    train = lesions["patient_id"].isin(folds.loc[folds["fold"] != 0, "patient_id"]).to_numpy()
    mean, sd = tensors["lesion_inputs.mean"].numpy(), tensors["lesion_inputs.sd"].numpy()
    np.testing.assert_allclose(mean, values[train].mean(axis=0))  # the training fold's lesions
    assert not np.allclose(mean, values.mean(axis=0))  # not every lesion's
    np.testing.assert_allclose(sd, values[train].std(axis=0))
    # the linear term is the training fold's lesion-level Cox model, kept while the network trained
    train_ids = sorted(folds.loc[folds["fold"] != 0, "patient_id"])
    outcome = crops.patients.astype({"patient_id": str}).set_index("patient_id").loc[train_ids]
    fitted = fit_lesion_linear(standardise_inputs(values[train], mean, sd),
                               torch.tensor(lesions.loc[train, "patient_id"].map({p: i for i, p in enumerate(train_ids)})
                                            .to_numpy()),
                               torch.tensor(outcome["pfs_months"].to_numpy()), torch.tensor(outcome["event"].to_numpy()),
                               "sum", COXPH_PENALIZER)
    np.testing.assert_allclose(state["lesion_linear.weight"][0].numpy(), fitted.numpy(), atol=1e-6)
    # the stored scaling and weights give the out-of-fold lesion log-hazards back
    model = make_model(CVConfig(**stored), pre.n_features)
    model.load_state_dict(state)
    test_rows = ~lesions["patient_id"].isin(folds.loc[folds["fold"] != 0, "patient_id"]).to_numpy()
    ids = list(dict.fromkeys(lesions.loc[test_rows, "patient_id"]))
    data = SurvivalData(torch.ones(len(ids)), torch.ones(len(ids), dtype=torch.long), None,
                        image_inputs(crops, lesions, config.backbone, config.view)[test_rows],
                        torch.tensor(lesions.loc[test_rows, "patient_id"].map({p: i for i, p in enumerate(ids)})
                                     .to_numpy()),
                        lesion_inputs=standardise_inputs(values[test_rows], mean, sd))
    _, lesion_lh = predict(model, data, config.aggregation)
    oof = result.oof_lesions
    expected = oof[oof["fold"] == 0].set_index("lesion_id").loc[lesions.loc[test_rows, "lesion_id"], "log_hazard"]
    np.testing.assert_allclose(lesion_lh, expected.to_numpy(), atol=1e-5)
    # the stored linear term is the weights times the scaled inputs
    term = oof[oof["fold"] == 0].set_index("lesion_id").loc[lesions.loc[test_rows, "lesion_id"], "input_term"]
    np.testing.assert_allclose(term, data.lesion_inputs.double().numpy() @ state["lesion_linear.weight"][0].double().numpy(),
                               atol=1e-9)
    with torch.no_grad():  # and the linear term is part of them
        model.lesion_linear.weight.add_(1.0)
    assert not np.allclose(predict(model, data, config.aggregation)[1], lesion_lh, atol=1e-3)
    assert "lesion_inputs" not in CVConfig(modality="imaging").run_defining()


@pytest.mark.parametrize("changes,match", [
    ({"lesion_inputs": "log_volume,size"}, "lesion_inputs must name"),
    ({"lesion_inputs": "log_volume", "aggregation": "attention"}, "not attention pooling"),
    ({"lesion_inputs": "bone", "modality": "clinical"}, "need a resnet model"),
])
def test_lesion_inputs_refused_where_they_cannot_be_added(changes, match):
    with pytest.raises(InputError, match=match):
        CVConfig(**{"modality": "imaging", **changes}).validate()


def test_auxiliary_targets_are_scaled_on_training_lesions_only():
    from psma_lib.cv import lesion_target_values, standardise_targets

    lesions = pd.DataFrame({"suvmax": [np.e, np.e**3, 1e6, np.nan], "volume_ml": [1.0, np.e**2, 1e6, 0.0]})
    values = lesion_target_values(lesions, ("log_suvmax", "log_volume"))
    assert np.isnan(values[3]).all()  # unknown or non-positive: no target
    train = np.array([True, True, False, False])
    z = standardise_targets(values, train).numpy()
    assert np.allclose(z[:2], [[-1, -1], [1, 1]])  # the huge test lesion moves nothing


def test_auxiliary_target_values_are_the_measured_quantities_by_name():
    from psma_lib.cv import lesion_target_values

    lesions = pd.DataFrame({"suvmax": [10.0, 8.0, np.nan], "suvmean": [5.0, 8.0, 3.0], "volume_ml": [2.0, 0.5, 1.0],
                            "site": ["bone", "lymph_node", "bone"], "hu_mean": [850.0, 40.0, np.nan]})
    values = lesion_target_values(lesions, ("bone", "log_suvmean_ratio", "log_volume", "log_suvmax", "hu_mean"))
    expected = np.array([[1, np.log(0.5), np.log(2.0), np.log(10.0), 850.0],
                         [0, 0.0, np.log(0.5), np.log(8.0), 40.0],
                         [1, np.nan, 0.0, np.nan, np.nan]])
    np.testing.assert_allclose(values, expected)
    # crops written before suvmean / hu_mean were measured: those targets are unknown, the others are not
    old = lesion_target_values(lesions.drop(columns=["suvmean", "hu_mean"]), ("log_suvmean_ratio", "hu_mean", "log_suvmax"))
    assert np.isnan(old[:, :2]).all() and np.isfinite(old[:2, 2]).all()


@pytest.mark.parametrize("text", ["log_suvmax,volume", "", "bone,bone"])
def test_unknown_or_repeated_auxiliary_targets_are_refused(text):
    with pytest.raises(InputError, match="aux_targets"):
        CVConfig(modality="imaging", aux_targets=text).validate()


def test_auxiliary_head_has_one_output_per_named_target(tiny_crops, tmp_path):
    from psma_lib.cv import load_checkpoint

    config = CVConfig(modality="imaging", aux_targets="log_suvmax,log_volume,log_suvmean_ratio,bone",
                      **{**TINY, "epochs": 1})
    result = run_cv(tiny_crops, tmp_path / "cv", config)
    state, _, stored = load_checkpoint(result.out_dir / "checkpoints" / "fold0.safetensors")
    assert state["aux_head.weight"].shape[0] == 4 and stored["aux_targets"] == config.aux_targets

