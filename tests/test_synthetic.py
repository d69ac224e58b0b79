"""Synthetic cohort: spec, outcome statistics (table level, 2000 patients) and rendered files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.utils import concordance_index

from psma_lib import synthetic
from psma_lib.errors import InputError

ROOT = Path(__file__).resolve().parent.parent


def test_default_yaml_equals_spec_defaults():
    assert synthetic.load_spec(ROOT / "data_manifest" / "synthetic_default.yaml") == synthetic.Spec()
    assert synthetic.load_spec(None) == synthetic.Spec()
    assert synthetic.DEFAULT_SPEC_PATH == ROOT / "data_manifest" / "synthetic_default.yaml"
    assert synthetic.load_spec(synthetic.DEFAULT_SPEC_PATH) == synthetic.Spec()


def test_public_api_is_importable_from_the_package():
    """The package re-exports what the rest of the repo imports from ``psma_lib.synthetic``."""
    for name in synthetic.__all__:
        assert getattr(synthetic, name) is not None, name
    assert {"generate_cohort", "load_truth", "register_cli", "render_patient", "sample_tables",
            "load_spec", "count_free", "Spec", "ImagingSpec"} <= set(synthetic.__all__)


def test_bad_spec_is_one_clear_input_error(tmp_path):
    bad = tmp_path / "spec.yaml"
    bad.write_text("outcome:\n  frailty_sdd: 0.3\n")
    with pytest.raises(InputError, match="frailty_sdd"):
        synthetic.load_spec(bad)
    bad.write_text("lesions:\n  per_patient_mean: [\n")
    with pytest.raises(InputError, match="cannot read spec"):
        synthetic.load_spec(bad)


@pytest.fixture(scope="module")
def big():
    return synthetic.sample_tables(2000, seed=11, signal="both")


def _km_median(p: pd.DataFrame) -> float:
    return KaplanMeierFitter().fit(p["pfs_months"], p["event"]).median_survival_time_


def test_lesion_counts_sites_and_suvmax(big):
    counts = big.lesions.groupby("patient_id").size()
    assert counts.sum() == 8000 and counts.min() >= 1 and counts.max() <= 10 and counts.std() > 1
    assert synthetic.lesion_counts(99, 0, synthetic.LesionSpec()).sum() == 396
    mix = big.lesions["site"].value_counts(normalize=True)
    for site, expected in {"bone": 0.55, "lymph_node": 0.30, "prostate": 0.10, "visceral": 0.05}.items():
        assert abs(mix[site] - expected) < 0.025, (site, mix[site])
    medians = big.lesions.groupby("site")["suvmax_true"].median()
    for site, expected in {"bone": 24.0, "lymph_node": 16.7, "prostate": 10.0, "visceral": 17.5}.items():
        assert abs(medians[site] / expected - 1) < 0.12, (site, medians[site])
    bone = big.lesions.loc[big.lesions["site"] == "bone", "suvmax_true"]
    q1, q3 = bone.quantile([0.25, 0.75])
    assert 12 < q1 < 16 and 33 < q3 < 43 and bone.min() >= 4 and bone.max() <= 127
    assert big.lesions["diameter_mm"].between(5, 40).all()


def test_outcome_calibration(big):
    p, truth = big.patients, big.truth
    assert 20 <= _km_median(p) <= 26
    assert 0.30 <= 1 - p["event"].mean() <= 0.45
    assert p["pfs_months"].gt(0).all() and p[["pfs_months", "event"]].notna().all().all()
    oracle = concordance_index(p["pfs_months"], -truth["linear_predictor"], p["event"])
    assert 0.75 <= oracle <= 0.85, oracle
    clinical_part = concordance_index(p["pfs_months"], -truth["clinical_part"], p["event"])
    assert 0.55 <= clinical_part <= 0.65, clinical_part
    # A Cox model on the observed clinical columns (complete cases) also reaches only ~0.6.
    cols = ["age", "bmi", "ecog", "psa", "gleason", "adt", "arpi", "docetaxel", "radiotherapy", "lu_psma"]
    df = p[cols + ["pfs_months", "event"]].dropna().astype(float)
    df["psa"] = np.log(df["psa"] + 0.1)
    cox = CoxPHFitter().fit(df, "pfs_months", "event")
    assert 0.55 <= cox.concordance_index_ <= 0.66, cox.concordance_index_
    assert np.allclose(truth["log_hazard"], truth["linear_predictor"] + truth["frailty"])


def test_clinical_columns_ranges_and_missing(big):
    p = big.patients
    for col in ("age", "bmi", "ecog", "psa", "gleason"):
        assert 0.01 <= p[col].isna().mean() <= 0.06, col
    assert p["age"].dropna().between(18, 110).all() and p["bmi"].dropna().between(10, 70).all()
    assert set(p["ecog"].dropna().astype(int)) == {0, 1, 2}
    assert set(p["gleason"].dropna().astype(int)) <= set(range(6, 11)) and p["psa"].dropna().ge(0).all()
    for col in synthetic.TREATMENTS:
        assert set(p[col].unique()) <= {0, 1}
    log_psa = np.log(p["psa"])
    assert np.corrcoef(log_psa[p["psa"].notna()], big.truth["feature_burden"][p["psa"].notna()])[0, 1] > 0.3


@pytest.mark.parametrize("signal", ["imaging", "clinical", "none"])
def test_signal_controls(signal):
    t = synthetic.sample_tables(2000, seed=12, signal=signal)
    p, truth = t.patients, t.truth
    assert 20 <= _km_median(p) <= 26
    assert 0.25 <= 1 - p["event"].mean() <= 0.45
    c_img = concordance_index(p["pfs_months"], -truth["imaging_part"], p["event"])
    c_clin = concordance_index(p["pfs_months"], -truth["clinical_part"], p["event"])
    if signal == "none":
        assert abs(c_img - 0.5) < 0.03 and abs(c_clin - 0.5) < 0.03
        assert (truth["log_hazard"] == 0).all()
    elif signal == "clinical":
        assert c_img < 0.56 and 0.55 <= c_clin <= 0.65
    else:
        assert c_img > 0.74 and (truth["linear_predictor"] == truth["imaging_part"]).all()


def test_tables_are_deterministic_and_seed_dependent():
    a, b = synthetic.sample_tables(30, seed=5), synthetic.sample_tables(30, seed=5)
    pd.testing.assert_frame_equal(a.patients, b.patients)
    pd.testing.assert_frame_equal(a.lesions, b.lesions)
    assert not a.truth["linear_predictor"].equals(synthetic.sample_tables(30, seed=6).truth["linear_predictor"])
    with pytest.raises(InputError, match="signal"):
        synthetic.sample_tables(3, signal="both_please")


# ------------------------------------------------------------------------- rendered files
SEED = 4  # a seed whose three patients include CTs stored both flipped and not


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "cohort"
    manifest = synthetic.generate_cohort(out, n_patients=3, seed=SEED, workers=2, progress=False)
    return manifest.parent


def _read(cohort: Path, rel: str):
    img = nib.load(cohort / rel)
    return np.asanyarray(img.dataobj), img.affine


def test_files_and_tables(cohort):
    from psma_lib.manifest import load_manifest, validate_manifest

    assert validate_manifest(cohort / "manifest.yaml") == []
    c = load_manifest(cohort / "manifest.yaml")
    assert c.info["synthetic"] is True and c.info["seed"] == SEED
    assert len(c.patients) == 3 and len(c.lesions) == 12
    for name in ("truth.csv", "lesion_truth.csv", "spec.yaml"):
        assert (cohort / "truth" / name).is_file()
    assert "truth" not in (cohort / "manifest.yaml").read_text()
    truth = synthetic.load_truth(cohort)
    assert list(truth["patient_id"]) == list(c.patients["patient_id"])
    assert not list(cohort.parent.glob(".cohort*"))  # no temporary leftovers


def test_images_geometry_dtypes_and_lesions(cohort):
    images = pd.read_csv(cohort / "images.csv", dtype=str)
    lesions = pd.read_csv(cohort / "lesions.csv", dtype={"patient_id": str, "lesion_id": str})
    flipped = []
    for row in images.itertuples():
        pet, pet_aff = _read(cohort, row.pet)
        ct, ct_aff = _read(cohort, row.ct)
        mask, mask_aff = _read(cohort, row.mask)
        assert pet.dtype == np.float32 and ct.dtype == np.int16 and mask.dtype == np.uint8
        assert np.isfinite(pet).all() and pet.min() >= 0 and pet.max() > 15  # kidneys/bladder
        assert np.allclose(np.abs(np.diag(pet_aff)[:3]), [4, 4, 3])
        ct_spacing = np.abs(np.diag(ct_aff)[:3])
        assert ct_spacing[0] < 2.05 and ct_spacing[2] == 3.0 and ct.shape != pet.shape
        assert not np.allclose(ct_aff, pet_aff) and np.array_equal(mask_aff, pet_aff)
        assert ct.min() >= -1024 and ct.max() > 700 and (ct == -1000).mean() > 0.05
        assert ((ct > -120) & (ct < -90)).mean() > 0.03  # fat
        assert pet_aff[2, 2] * pet.shape[2] >= 440  # z: proximal femora .. liver dome
        flipped.append(ct_aff[0, 0] < 0)
        les = lesions[lesions["patient_id"] == row.patient_id]
        assert set(np.unique(mask)) - {0} == set(les["mask_label"])
        z_lo, z_hi = synthetic.ImagingSpec().z_range_mm
        assert les["center_z_mm"].between(z_lo + 35, z_hi - 35).all()  # 64 mm crops fit
        for lesion in les.itertuples():
            world = np.array([lesion.center_x_mm, lesion.center_y_mm, lesion.center_z_mm, 1.0])
            ijk = np.round(np.linalg.solve(ct_aff, world)[:3]).astype(int)
            hu = ct[tuple(ijk)]
            if lesion.site == "bone":
                assert hu > 150, (lesion.lesion_id, hu)
            else:
                assert -200 < hu < 150, (lesion.lesion_id, lesion.site, hu)
    assert any(flipped) and not all(flipped)


def test_same_seed_same_arrays_any_worker_count(cohort, tmp_path):
    again = synthetic.generate_cohort(tmp_path / "again", n_patients=3, seed=SEED, workers=1,
                                      progress=False).parent
    for name in ("patients.csv", "lesions.csv", "images.csv", "truth/truth.csv"):
        assert (cohort / name).read_bytes() == (again / name).read_bytes(), name
    for rel in pd.read_csv(cohort / "images.csv", dtype=str)[["pet", "ct", "mask"]].to_numpy().ravel():
        assert _read(cohort, rel)[0].tobytes() == _read(again, rel)[0].tobytes(), rel


def test_generate_cli_and_spec_roundtrip(tmp_path):
    from psma_lib.cli import main

    spec = synthetic.Spec()
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(dataclasses.asdict(spec)))
    assert synthetic.load_spec(spec_file) == spec
    assert main(["generate", "--out", str(tmp_path / "x"), "--patients", "0", "--no-progress"]) == 2
    assert not (tmp_path / "x").exists()


def _lesion(label, site, diameter, suvmax, necrosis=0.0):
    return {"patient_id": "P", "lesion_id": f"P_L{label}", "mask_label": label, "site": site,
            "diameter_mm": diameter, "axis2_mm": diameter, "axis3_mm": diameter,
            "volume_ml": np.pi / 6 * diameter**3 / 1000, "suvmax_true": suvmax, "necrosis": necrosis}


def test_partial_volume_and_suvmax_compensation():
    """Without compensation a 6 mm lesion loses most of its SUVmax and a 30 mm one little;
    with it (default) the measured SUVmax of a 30 mm lesion is close to the drawn value."""
    lesions = [_lesion(1, "bone", 6.0, 40.0), _lesion(2, "bone", 30.0, 40.0)]
    raw = dataclasses.replace(synthetic.ImagingSpec(), suvmax_is_measured=False)
    out = synthetic.render_patient("P", 27.0, lesions, np.random.default_rng(0), raw)
    small, large = (v / 40.0 for v in out["suvmax_pet"])
    assert small < 0.6 and large > 0.7 and small < large - 0.2
    assert out["hosts"] == ["bone", "bone"]
    out = synthetic.render_patient("P", 27.0, lesions, np.random.default_rng(0), synthetic.ImagingSpec())
    assert 0.75 < out["suvmax_pet"][1] / 40.0 < 1.3


def test_hidden_necrosis_is_visible_in_the_images():
    """The prognostic texture property in no table shows on CT (lytic vs sclerotic bone) and
    PET (photopenic core of a large lesion)."""
    lesions = [_lesion(1, "bone", 20.0, 30.0, 0.0), _lesion(2, "bone", 20.0, 30.0, 1.0),
               _lesion(3, "lymph_node", 32.0, 30.0, 0.0), _lesion(4, "lymph_node", 32.0, 30.0, 1.0)]
    out = synthetic.render_patient("P", 27.0, lesions, np.random.default_rng(1), synthetic.ImagingSpec())
    ct_inv, pet_inv = np.linalg.inv(out["ct_affine"]), np.linalg.inv(out["pet_affine"])
    hu, core = [], []
    for centre in out["centres"]:
        i, j, k = np.round(ct_inv @ [*centre, 1.0])[:3].astype(int)
        hu.append(out["ct"][i - 1:i + 2, j - 1:j + 2, k].mean())
        a, b, c = np.round(pet_inv @ [*centre, 1.0])[:3].astype(int)
        core.append(out["pet"][a, b, c])
    peak = [out["pet"][out["mask"] == label].max() for label in (1, 2, 3, 4)]
    assert hu[0] > 700 and 150 < hu[1] < 450  # sclerotic vs lytic
    assert core[2] / peak[2] > 0.75 and core[3] / peak[3] < 0.6  # photopenic core
