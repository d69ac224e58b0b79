"""Encoder pretraining on lesion crops without outcomes (psma_lib.pretrain, psma-pfs pretrain)."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from psma_lib import pipeline
from psma_lib.cli import main as cli_main
from psma_lib.crop import load_crops
from psma_lib.cv import (
    ClinicalPreprocessor,
    CVConfig,
    clinical_cox_features,
    fit_lesion_cox,
    fold_seed,
    lesion_scaling,
    make_model,
    select_covariate_penalizer,
    standardise_inputs,
)
from psma_lib.errors import InputError
from psma_lib.models import load_pretrained
from psma_lib.pretrain import (
    PretrainConfig,
    holdout_patients,
    load_reader,
    pretrain_encoder,
    read_lesions,
    read_pretrained_meta,
)
from psma_lib.testing import write_tiny_crops
from psma_lib.vocabulary import CLINICAL_COLUMNS

FAST = dict(view="axial", stem="standard", epochs=2, batch_size=16, device="cpu", num_threads=1, progress=False)


@pytest.fixture(scope="module")
def readable_crops(tmp_path_factory):
    """Tiny crops whose lesion table's SUVmax is the crop's own PET maximum (the quantity is in
    the pixels, as the crop stage measures it): 60 patients, about 120 lesions."""
    root = write_tiny_crops(tmp_path_factory.mktemp("readable") / "crops", n_patients=60, seed=3)
    images = np.load(root / "crops.npy")
    lesions = pd.read_csv(root / "lesions.csv")
    lesions["suvmax"] = images[:, 0].reshape(len(images), -1).max(axis=1)
    lesions.to_csv(root / "lesions.csv", index=False)
    return root


def test_pretrained_encoder_reads_held_out_lesions_suvmax(readable_crops, tmp_path):
    config = PretrainConfig(**{**FAST, "epochs": 12}, targets="log_suvmax", holdout_fraction=0.25, seed=1)
    meta = pretrain_encoder(readable_crops, tmp_path / "enc.safetensors", config)
    untrained = pretrain_encoder(readable_crops, tmp_path / "untrained.safetensors",
                                 PretrainConfig(**{**FAST, "epochs": 1}, targets="log_suvmax", holdout_fraction=0.25,
                                                seed=1, lr=1e-9))
    assert meta["n_holdout_patients"] == 15 and meta["n_holdout_lesions"] > 0
    # patients it never saw: their SUVmax read from the pixels, well beyond a network that did not learn
    assert meta["holdout_reading_r"]["log_suvmax"] > 0.7
    assert meta["holdout_reading_r"]["log_suvmax"] > untrained["holdout_reading_r"]["log_suvmax"] + 0.3
    assert read_pretrained_meta(tmp_path / "enc.safetensors") == meta
    assert meta["train_loss_by_epoch"][-1] < meta["train_loss_by_epoch"][0]
    # the file read back as a fixed reader: the same held-out reading, in the measured units
    crops = load_crops(readable_crops)
    lesions = crops.lesions.astype({"patient_id": str})
    read = read_lesions(tmp_path / "enc.safetensors", crops, lesions)
    measured = np.log(lesions["suvmax"].to_numpy())
    held = lesions["patient_id"].isin(holdout_patients(lesions["patient_id"], 0.25, seed=1)).to_numpy()
    r = np.corrcoef(read["log_suvmax"].to_numpy()[held], measured[held])[0, 1]
    assert r == pytest.approx(meta["holdout_reading_r"]["log_suvmax"], abs=1e-5)
    assert abs(read["log_suvmax"].mean() - measured.mean()) < 0.3 * measured.std()
    with pytest.raises(InputError, match="psma-pfs pretrain"):
        load_reader(readable_crops / "crops.json")


def test_survival_model_starts_from_the_pretrained_encoder_and_same_seed_is_bit_identical(tiny_crops, tmp_path):
    config = PretrainConfig(**FAST)
    pretrain_encoder(tiny_crops, tmp_path / "a.safetensors", config)
    pretrain_encoder(tiny_crops, tmp_path / "b.safetensors", config)
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = make_model(CVConfig(modality="imaging", view="axial", stem="standard"), len(CLINICAL_COLUMNS))
    assert load_pretrained(model, tmp_path / "a.safetensors") == []  # every encoder weight loaded
    state = model.encoder.net.state_dict()
    assert all(torch.equal(state[k.removeprefix("encoder.net.")], v) for k, v in a.items() if k.startswith("encoder."))
    other = pretrain_encoder(tiny_crops, tmp_path / "c.safetensors", PretrainConfig(**{**FAST, "seed": 1}))
    assert other["config"]["seed"] == 1
    c = load_file(str(tmp_path / "c.safetensors"))
    assert not torch.equal(a["encoder.net.conv1.weight"], c["encoder.net.conv1.weight"])


def test_holdout_patients_are_left_out_of_training_and_scaling(tiny_crops, tmp_path):
    meta = pretrain_encoder(tiny_crops, tmp_path / "w.safetensors", PretrainConfig(**FAST, targets="log_volume"))
    lesions = pd.read_csv(tiny_crops / "lesions.csv", dtype={"patient_id": str})
    held = holdout_patients(lesions["patient_id"], 0.1, seed=0)
    train = lesions[~lesions["patient_id"].isin(held)]
    assert meta["n_train_lesions"] == len(train) and meta["n_holdout_lesions"] == len(lesions) - len(train)
    log_volume = np.log(train["volume_ml"].to_numpy())
    assert meta["scaling"]["mean"] == pytest.approx([log_volume.mean()])
    assert meta["scaling"]["sd"] == pytest.approx([log_volume.std()])
    # other images and volumes for the held-out lesions: the same weights (nothing of them was trained on)
    changed = tmp_path / "changed"
    shutil.copytree(tiny_crops, changed)
    rows = lesions["patient_id"].isin(held).to_numpy()
    images = np.load(changed / "crops.npy")
    images[rows] = images[rows] * 3.0 + 50.0
    np.save(changed / "crops.npy", images)
    lesions.loc[rows, "volume_ml"] *= 10
    lesions.to_csv(changed / "lesions.csv", index=False)
    pretrain_encoder(changed, tmp_path / "v.safetensors", PretrainConfig(**FAST, targets="log_volume"))
    a, b = load_file(str(tmp_path / "w.safetensors")), load_file(str(tmp_path / "v.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cv_run_key_holds_the_weights_content_not_their_path(tiny_crops, tmp_path):
    crops = load_crops(tiny_crops)
    path = tmp_path / "enc.safetensors"
    pretrain_encoder(tiny_crops, path, PretrainConfig(**FAST))
    config = CVConfig(modality="imaging", view="axial", stem="standard", weights=str(path))
    first = pipeline.cv_folder(crops, tmp_path, config)
    assert pipeline.cv_folder(crops, tmp_path, CVConfig(modality="imaging", view="axial", stem="standard")) != first
    pretrain_encoder(tiny_crops, path, PretrainConfig(**{**FAST, "seed": 2}))  # other weights, same path
    assert pipeline.cv_folder(crops, tmp_path, config) != first


def test_pipeline_pretrains_once_and_reads_back(tiny_crops, tmp_path):
    crops = load_crops(tiny_crops)
    path = pipeline.pretrained_encoder(crops, tmp_path, PretrainConfig(**FAST))
    stamp = path.stat().st_mtime_ns
    assert pipeline.pretrained_encoder(crops, tmp_path, PretrainConfig(**FAST)) == path
    assert path.stat().st_mtime_ns == stamp
    assert pipeline.pretrained_encoder(crops, tmp_path, PretrainConfig(**{**FAST, "epochs": 3})) != path


def test_bad_input_one_clear_error_and_no_weights_file(tiny_crops, tmp_path):
    crops = tmp_path / "crops"
    shutil.copytree(tiny_crops, crops)
    lesions = pd.read_csv(crops / "lesions.csv").drop(columns=["hu_mean"])
    lesions.to_csv(crops / "lesions.csv", index=False)
    with pytest.raises(InputError, match="hu_mean"):
        pretrain_encoder(crops, tmp_path / "w.safetensors", PretrainConfig(**FAST))
    assert not (tmp_path / "w.safetensors").exists() and not list(tmp_path.glob(".w.safetensors*"))
    with pytest.raises(InputError, match="unknown backbone"):
        PretrainConfig(backbone="vgg").validate()
    assert cli_main(["pretrain", str(tiny_crops), "--out", str(tmp_path / "w.pt")]) == 2
    assert not (tmp_path / "w.pt").exists()


def test_cli_writes_the_weights_and_reports_the_reading(tiny_crops, tmp_path, capsys):
    out = tmp_path / "enc.safetensors"
    assert cli_main(["pretrain", str(tiny_crops), "--out", str(out), "--view", "axial", "--stem", "standard",
                     "--epochs", "1", "--batch-size", "16", "--num-threads", "1", "--device", "cpu",
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "held-out lesions" in printed and str(out) in printed
    assert read_pretrained_meta(out)["config"]["epochs"] == 1


def test_frozen_encoder_stays_as_loaded_while_the_heads_train(tiny_crops, tmp_path):
    weights = tmp_path / "enc.safetensors"
    pretrain_encoder(tiny_crops, weights, PretrainConfig(**FAST))
    loaded = {k.removeprefix("encoder.net."): v for k, v in load_file(str(weights)).items() if k.startswith("encoder.")}
    config = CVConfig(modality="imaging", view="axial", stem="standard", head="concepts", weights=str(weights),
                      freeze_encoder=True, epochs=2, folds=2, batch_size=8, seed=1, progress=False, device="cpu",
                      num_threads=1, n_bootstrap=20)
    run = pipeline.run_cv(load_crops(tiny_crops), tmp_path, config)
    state = load_file(str(run.out_dir / "checkpoints" / "fold0.safetensors"))
    encoder = {k.removeprefix("model.encoder.net."): v for k, v in state.items() if k.startswith("model.encoder.net.")}
    assert encoder.keys() == loaded.keys()
    assert all(torch.equal(encoder[k], loaded[k]) for k in loaded)  # weights and BatchNorm statistics
    assert not torch.equal(state["model.head.weight"], torch.zeros_like(state["model.head.weight"]))
    unfrozen = pipeline.run_cv(load_crops(tiny_crops), tmp_path, dataclasses.replace(config, freeze_encoder=False))
    trained = load_file(str(unfrozen.out_dir / "checkpoints" / "fold0.safetensors"))
    assert not torch.equal(trained["model.encoder.net.conv1.weight"], loaded["conv1.weight"])
    with pytest.raises(InputError, match="freeze_encoder"):
        CVConfig(modality="imaging", freeze_encoder=True).validate()


def _reader_run(crops_dir, tmp_path, modality: str, **options):
    """A 3-fold reader run of ``modality`` (and ``options``) on ``crops_dir`` with a freshly pretrained
    reader: (run, its config, lesions, patients, the reader's readings of the lesions, the run's folds)."""
    weights = tmp_path / "enc.safetensors"
    pretrain_encoder(crops_dir, weights, PretrainConfig(**FAST))
    config = CVConfig(modality=modality, model="reader", weights=str(weights), folds=3, seed=4, progress=False,
                      device="cpu", num_threads=1, n_bootstrap=20, **options)
    run = pipeline.run_cv(load_crops(crops_dir), tmp_path, config)
    assert run.out_dir.name.startswith(f"{modality}-reader-")
    crops = load_crops(crops_dir)
    lesions = crops.lesions.astype({"patient_id": str})
    patients = crops.patients.astype({"patient_id": str})
    readings = read_lesions(weights, crops, lesions).to_numpy()
    folds = pd.read_csv(run.out_dir / "folds.csv", dtype={"patient_id": str})
    return run, config, lesions, patients, readings, folds


def test_reader_run_scores_lesions_by_a_training_fold_cox_fit_on_the_fixed_readers_readings(tiny_crops, tmp_path):
    run, config, lesions, patients, readings, folds = _reader_run(tiny_crops, tmp_path, "imaging")
    oof_lesions = run.oof_lesions.set_index("lesion_id")
    for k in range(3):
        train_ids = sorted(folds.loc[folds["fold"] != k, "patient_id"])
        mean, sd, weight = fit_lesion_cox(readings, lesions, patients, train_ids)
        stored = load_file(str(run.out_dir / "checkpoints" / f"fold{k}.safetensors"))
        assert torch.allclose(stored["reader.mean"], torch.tensor(mean)) and torch.allclose(stored["reader.sd"], torch.tensor(sd))
        assert torch.allclose(stored["reader.weight"], weight)
        everyone = lesion_scaling(readings, np.ones(len(readings), bool))[0]
        assert not np.allclose(mean, everyone)  # scaled on the training fold's lesions, not all
        test = lesions["patient_id"].isin(folds.loc[folds["fold"] == k, "patient_id"]).to_numpy()
        expected = (standardise_inputs(readings[test], mean, sd).double() @ weight).numpy()
        got = oof_lesions.loc[lesions.loc[test, "lesion_id"], "log_hazard"].to_numpy()
        assert np.allclose(got, expected, atol=1e-6)
    for bad, message in ((dict(weights=None), "reader model"), (dict(weights=str(tiny_crops / "crops.json")), "pretrain"),
                         (dict(modality="clinical"), "clinical trains model")):
        with pytest.raises(InputError, match=message):
            pipeline.run_cv(load_crops(tiny_crops), tmp_path / "bad", dataclasses.replace(config, **bad))
        assert not (tmp_path / "bad" / "cv").exists() or not any((tmp_path / "bad" / "cv").iterdir())


def test_multimodal_reader_run_adds_the_training_folds_clinical_cox_terms_to_the_readings(tiny_crops, tmp_path):
    """``--modality multimodal --model reader``: one Cox model of the training patients on the reader's
    readings and the clinical columns (imputed and standardised on the training fold, as the coxph
    baseline sees them); a lesion's log-hazard is its readings' term plus its patient's clinical
    term, and the patient's risk their aggregate."""
    run, _, lesions, patients, readings, folds = _reader_run(tiny_crops, tmp_path, "multimodal", clinical_penalty="fixed")
    by_id = patients.set_index("patient_id")
    oof_lesions = run.oof_lesions.set_index("lesion_id")
    oof = run.oof.set_index("patient_id")
    for k in range(3):
        train_ids = sorted(folds.loc[folds["fold"] != k, "patient_id"])
        test_ids = sorted(folds.loc[folds["fold"] == k, "patient_id"])
        pre = ClinicalPreprocessor(CLINICAL_COLUMNS).fit(by_id.loc[train_ids].reset_index())
        clinical = lambda ids, pre=pre: clinical_cox_features(pre, by_id.loc[ids].reset_index())  # noqa: E731
        mean, sd, weight = fit_lesion_cox(readings, lesions, patients, train_ids, covariates=clinical(train_ids))
        stored = load_file(str(run.out_dir / "checkpoints" / f"fold{k}.safetensors"))
        n_read = readings.shape[1]
        assert weight.shape == (n_read + clinical(train_ids).shape[1],)
        assert torch.allclose(stored["reader.weight"], weight)
        assert weight[n_read:].abs().max() > 1e-3  # the clinical columns are in the fit
        test = lesions["patient_id"].isin(test_ids).to_numpy()
        term = dict(zip(test_ids, clinical(test_ids) @ weight[n_read:].numpy(), strict=True))
        expected = (standardise_inputs(readings[test], mean, sd).double() @ weight[:n_read]).numpy() + \
            lesions.loc[test, "patient_id"].map(term).to_numpy()
        got = oof_lesions.loc[lesions.loc[test, "lesion_id"], "log_hazard"].to_numpy()
        assert np.allclose(got, expected, atol=1e-6)
        risk = pd.Series(expected).groupby(lesions.loc[test, "patient_id"].to_numpy()).apply(
            lambda h: np.log(np.exp(h).sum()))
        assert np.allclose(oof.loc[risk.index, "risk"], risk, atol=1e-6)


def test_multimodal_reader_with_inner_penalty_fits_with_the_penalty_its_training_patients_choose(tiny_crops, tmp_path):
    """``--clinical-penalty inner``: each fold's clinical ridge penalty is the inner-CV choice on its
    training patients (stored and noted), and the fold's weights are the fit with that penalty."""
    run, config, lesions, patients, readings, folds = _reader_run(tiny_crops, tmp_path, "multimodal",
                                                                  clinical_penalty="inner")
    assert config.run_defining()["clinical_penalty"] == "inner"
    assert "clinical_penalty" not in dataclasses.replace(config, clinical_penalty="fixed").run_defining()
    by_id = patients.set_index("patient_id")
    fold_results = pd.read_csv(run.out_dir / "fold_results.csv")
    for k in range(3):
        train_ids = sorted(folds.loc[folds["fold"] != k, "patient_id"])
        pre = ClinicalPreprocessor(CLINICAL_COLUMNS).fit(by_id.loc[train_ids].reset_index())
        clinical = clinical_cox_features(pre, by_id.loc[train_ids].reset_index())
        cvpl = select_covariate_penalizer(readings, lesions, patients, train_ids, clinical, seed=fold_seed(config.seed, k))
        stored = load_file(str(run.out_dir / "checkpoints" / f"fold{k}.safetensors"))
        assert float(stored["reader.clinical_penalizer"]) == cvpl.idxmax()
        assert f"clinical penalizer {cvpl.idxmax():g}" in fold_results.loc[k, "notes"]
        _, _, weight = fit_lesion_cox(readings, lesions, patients, train_ids, covariates=clinical,
                                      covariate_penalizer=cvpl.idxmax())
        assert torch.allclose(stored["reader.weight"], weight)
    with pytest.raises(InputError, match="multimodal reader"):
        CVConfig(modality="imaging", model="reader", weights="w.safetensors", clinical_penalty="inner").validate()


def _two_level_cohort(n: int, clinical_effect: float, seed: int):
    """``n`` patients with 1-4 lesions: the lesions' first input and, with weight ``clinical_effect``,
    the first of ten patient covariates set the hazard (the other nine are noise)."""
    rng = np.random.default_rng(seed)
    ids = [f"p{i:03d}" for i in range(n)]
    lesions = pd.DataFrame({"patient_id": np.repeat(ids, rng.integers(1, 5, n))})
    values = rng.normal(size=(len(lesions), 2))
    covariates = rng.normal(size=(n, 10))
    lesion_term = pd.Series(values[:, 0] * 0.8).groupby(lesions["patient_id"].to_numpy()).apply(
        lambda h: np.log(np.exp(h).sum())).loc[ids].to_numpy()
    time = rng.exponential(np.exp(-(lesion_term + clinical_effect * covariates[:, 0])))
    censor = rng.exponential(2.0 * np.median(time), n)
    patients = pd.DataFrame({"patient_id": ids, "pfs_months": np.minimum(time, censor),
                             "event": (time <= censor).astype(int)})
    return values, lesions, patients, covariates


@pytest.mark.parametrize("clinical_effect, chosen", [(0.0, lambda p: p >= 1.0), (1.5, lambda p: p <= 0.1)])
def test_inner_cv_shrinks_noise_covariates_and_keeps_a_strong_one(clinical_effect, chosen):
    """The cross-validated partial likelihood picks a heavy ridge for ten noise covariates and a
    light one when one of them carries a strong effect (a penalty chosen by the training patients'
    own likelihood would always be the lightest)."""
    values, lesions, patients, covariates = _two_level_cohort(160, clinical_effect, seed=3)
    cvpl = select_covariate_penalizer(values, lesions, patients, patients["patient_id"], covariates, "sum", seed=1)
    assert list(cvpl.index) == [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]
    assert chosen(cvpl.idxmax()), cvpl


def test_inner_cv_penalty_reads_the_training_patients_alone():
    """Other patients' outcomes and inputs change nothing: the inner folds are drawn from the
    training patients and the likelihoods are theirs."""
    values, lesions, patients, covariates = _two_level_cohort(120, 0.5, seed=5)
    train_ids = list(patients["patient_id"][:90])
    cvpl = select_covariate_penalizer(values, lesions, patients, train_ids, covariates[:90], "sum", seed=2)
    others = ~patients["patient_id"].isin(train_ids)
    changed = patients.copy()
    changed.loc[others, "pfs_months"] = changed.loc[others, "pfs_months"][::-1].to_numpy() * 3.0
    changed.loc[others, "event"] = 1 - changed.loc[others, "event"]
    moved = values.copy()
    moved[~lesions["patient_id"].isin(train_ids).to_numpy()] += 5.0
    again = select_covariate_penalizer(moved, lesions, changed, train_ids, covariates[:90], "sum", seed=2)
    pd.testing.assert_series_equal(cvpl, again)
    # a small cohort: three censored training patients allow three inner folds, one event none
    event = patients.set_index("patient_id")["event"]
    few = sorted([*event[event == 1].index[:9], *event[event == 0].index[:3]])  # rows in patients order
    rows = patients["patient_id"].isin(few).to_numpy()
    cvpl = select_covariate_penalizer(values, lesions, patients, few, covariates[rows], "sum")
    assert cvpl.index.tolist() == [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0] and np.isfinite(cvpl).all()
    lone = sorted([*event[event == 1].index[:1], *event[event == 0].index[:9]])
    with pytest.raises(InputError, match="inner folds of the training patients: 10 patients with 1 events"):
        select_covariate_penalizer(values, lesions, patients, lone, covariates[patients["patient_id"].isin(lone)], "sum")
