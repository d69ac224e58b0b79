"""Conventional PSMA biomarkers (``psma_lib.biomarkers``) and the crop stage's lesion measurement.

The test writes a tiny cohort as real NIfTI files: three patients whose PET grids are
anisotropic (2 x 2.5 x 3 mm), axis-aligned, flipped (LPS-like) and oblique; on each, three balls
of known radius and known uptake, labelled in a mask on the PET grid: A (r 12 mm, uniform SUV,
bone), B (r 12.5 mm, uniform SUV, lymph node) and C (r 14 mm, bone) with a hot core (r 8 mm) in a
cooler shell. The crop stage measures them, the biomarker functions aggregate them, and both are
checked against (1) the voxels the test itself put in each label (exact, up to the 4 decimals of
``lesions.csv``) and (2) the continuous balls (within the voxelisation tolerance below).

Voxelisation tolerance: a label holds the voxels whose centre lies in the ball, so its volume,
voxel count x voxel volume, differs from 4/3 pi r^3. The only rigorous bound (balls of radius
r -/+ half a voxel diagonal) is useless here (-45 %..+65 % at r = 12 mm). But the count is an
unbiased estimate of the ball volume over the ball's sub-voxel position, and with these spacings
its error for r >= 12 mm (>= 4.8 mean spacings) stays within 2.8 % over 400 random positions
and orientations (sd 1 %; ``test_voxelisation_tolerance`` reruns this measurement), so
``BALL_RTOL`` = 5 %. For the 8 mm core (3.2 spacings) the same measurement gives up to 11 %, so
``CORE_RTOL`` = 12 %; the two-level ball's SUVmean tolerance follows from both (see
``expected_analytic``).
"""

from __future__ import annotations

import doctest
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import psma_lib.biomarkers
from psma_lib.biomarkers import (
    FEATURE_COLUMNS,
    FEATURE_FLOORS,
    LESION_BIOMARKER_COLUMNS,
    PATIENT_BIOMARKER_COLUMNS,
    biomarker_features,
    lesion_biomarkers,
    patient_biomarkers,
)
from psma_lib.crop import LESION_TABLE_COLUMNS, crop_cohort, load_crops, measure_lesion
from psma_lib.errors import InputError
from psma_lib.geometry import voxel_to_world
from psma_lib.manifest import write_manifest

SPACING = np.array([2.0, 2.5, 3.0])
VOXEL_ML = float(np.prod(SPACING)) / 1000.0
PET_SHAPE = (50, 40, 30)  # 100 x 100 x 90 mm, centred on world 0
BALL_RTOL, CORE_RTOL = 0.05, 0.12
CSV_ATOL = 5e-5 + 1e-9  # lesions.csv rounds volume_ml, suvmax and suvmean to 4 decimals


def rotation(axis: int, degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    i, j = [k for k in range(3) if k != axis]
    out = np.eye(3)
    out[i, i], out[i, j], out[j, i], out[j, j] = c, -s, s, c
    return out


def centred_affine(matrix: np.ndarray, shape) -> np.ndarray:
    """Voxel -> world affine with ``matrix`` whose grid centre is at world 0."""
    out = np.eye(4)
    out[:3, :3] = matrix
    out[:3, 3] = -matrix @ ((np.array(shape) - 1) / 2.0)
    return out


PET_AFFINES = {
    "P001": centred_affine(np.diag(SPACING), PET_SHAPE),                         # axis-aligned
    "P002": centred_affine(np.diag(SPACING * [-1, -1, 1]), PET_SHAPE),           # flipped (LPS)
    "P003": centred_affine(rotation(2, 30) @ rotation(0, 12) @ np.diag(SPACING), PET_SHAPE),
}
CT_SHAPE = (40, 40, 40)
CT_AFFINE = np.array([[-4.0, 0, 0, 78], [0, 4, 0, -78], [0, 0, 4, -78], [0, 0, 0, 1]])

# name -> (label, world centre relative to the grid centre, radius mm, site)
BALLS = {
    "A": (1, np.array([-25.0, 0.0, 0.0]), 12.0, "bone"),
    "B": (2, np.array([15.0, -10.0, 8.0]), 12.5, "lymph_node"),
    "C": (3, np.array([5.0, 18.0, -10.0]), 14.0, "bone"),
}
CORE_RADIUS = 8.0  # ball C: SUV core_suv within 8 mm of its centre, shell_suv elsewhere
BACKGROUND_SUV = 0.6
SHELL_SUV = 4.0


def uptake(pid: str) -> dict[str, float]:
    """Each patient's known SUVs: A and B uniform, C's core (C's shell is SHELL_SUV)."""
    scale = 1.0 + 0.25 * (int(pid[1:]) - 1)
    return {"A": 8.0 * scale, "B": 5.5 * scale, "C": 15.0 * scale}


def voxel_world(shape, affine) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return voxel_to_world(affine, ijk)


def make_cohort(root: Path) -> dict:
    """Write the cohort; return per patient the mask, PET and ball centres the test put there."""
    rng = np.random.default_rng(8)
    (root / "images").mkdir(parents=True, exist_ok=True)
    patients, images, lesions, truth = [], [], [], {}
    for p, (pid, pet_affine) in enumerate(PET_AFFINES.items()):
        world = voxel_world(PET_SHAPE, pet_affine)
        # Background with noise, so a mean over the wrong voxels is visibly wrong.
        pet = (BACKGROUND_SUV + rng.uniform(-0.3, 0.3, PET_SHAPE)).astype(np.float32)
        mask = np.zeros(PET_SHAPE, np.uint8)
        centres = {}
        for name, (label, offset, radius, _site) in BALLS.items():
            centre = offset + rng.uniform(-1.0, 1.0, 3)  # not aligned with the voxel lattice
            distance = np.linalg.norm(world - centre, axis=-1)
            inside = distance <= radius
            mask[inside] = label
            if name == "C":
                pet[inside] = SHELL_SUV
                pet[distance <= CORE_RADIUS] = uptake(pid)["C"]
            else:
                pet[inside] = uptake(pid)[name]
            centres[name] = centre
        files = {"pet": pet, "ct": np.full(CT_SHAPE, 40, np.int16), "mask": mask}
        for kind, data in files.items():
            affine = CT_AFFINE if kind == "ct" else pet_affine
            nib.save(nib.Nifti1Image(data, affine), root / f"images/{pid}_{kind}.nii.gz")
        images.append({"patient_id": pid, **{k: f"images/{pid}_{k}.nii.gz" for k in files}})
        patients.append({"patient_id": pid, "age": 70 + p, "bmi": 27.5, "ecog": 0, "psa": 10.0,
                         "gleason": 8, "adt": 1, "arpi": 0, "docetaxel": 0, "radiotherapy": 0,
                         "lu_psma": 0, "pfs_months": 12.0 + p, "event": p % 2})
        for name, (label, _offset, _radius, site) in BALLS.items():
            lesions.append({"patient_id": pid, "lesion_id": name, "mask_label": label,
                            "center_x_mm": None, "center_y_mm": None, "center_z_mm": None,
                            "site": site})
        truth[pid] = {"pet": pet, "mask": mask, "centres": centres}
    manifest = write_manifest(root, pd.DataFrame(patients), pd.DataFrame(images),
                              pd.DataFrame(lesions),
                              {"name": "balls", "synthetic": True, "description": "biomarkers"})
    return {"manifest": manifest, "truth": truth}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    return make_cohort(tmp_path_factory.mktemp("balls"))


@pytest.fixture(scope="module")
def crops_dir(cohort, tmp_path_factory) -> Path:
    return crop_cohort(cohort["manifest"], tmp_path_factory.mktemp("out") / "crops",
                       size_mm=24.0, spacing_mm=3.0, workers=1, progress=False)


@pytest.fixture(scope="module")
def crop_lesions(crops_dir) -> pd.DataFrame:
    return load_crops(crops_dir).lesions


def expected_exact(truth: dict, name: str) -> dict[str, float]:
    """From the voxels the test labelled: count x voxel volume, max, mean and sum of their SUV."""
    in_label = truth["mask"] == BALLS[name][0]
    values = truth["pet"][in_label].astype(np.float64)
    return {"n": int(in_label.sum()), "volume_ml": in_label.sum() * VOXEL_ML,
            "suvmax": values.max(), "suvmean": values.mean(), "tl_psma": values.sum() * VOXEL_ML}


def expected_analytic(pid: str, name: str) -> dict[str, float]:
    """From the continuous ball, with the tolerance each value may differ by after voxelisation.

    For C, suvmean = shell + (core - shell) f with f = (r_core / r)^3 the core's volume fraction;
    the voxelised f = N_core / N is off by at most f ((1 + CORE_RTOL) / (1 - BALL_RTOL) - 1), so
    the SUVmean by |core - shell| times that.
    """
    _label, _offset, radius, _site = BALLS[name]
    volume = 4.0 / 3.0 * math.pi * radius**3 / 1000.0
    if name != "C":
        suv = uptake(pid)[name]
        return {"volume_ml": volume, "volume_tol": BALL_RTOL * volume, "suvmax": suv,
                "suvmean": suv, "suvmean_tol": 0.0}
    core = uptake(pid)["C"]
    fraction = (CORE_RADIUS / radius) ** 3
    fraction_tol = fraction * ((1 + CORE_RTOL) / (1 - BALL_RTOL) - 1)
    return {"volume_ml": volume, "volume_tol": BALL_RTOL * volume, "suvmax": core,
            "suvmean": SHELL_SUV + (core - SHELL_SUV) * fraction,
            "suvmean_tol": (core - SHELL_SUV) * fraction_tol}


def lesion_row(table: pd.DataFrame, pid: str, name: str) -> pd.Series:
    rows = table[(table["patient_id"] == pid) & (table["lesion_id"] == name)]
    assert len(rows) == 1
    return rows.iloc[0]


# ---------------------------------------------------------------------------------------------
# The crop stage's per-lesion measurement
# ---------------------------------------------------------------------------------------------


def test_voxelisation_tolerance():
    """The measurement behind BALL_RTOL / CORE_RTOL (module docstring), with these spacings."""
    rng = np.random.default_rng(0)
    for radius, tolerance in ((12.0, BALL_RTOL), (CORE_RADIUS, CORE_RTOL)):
        n = int(radius / SPACING.min()) + 2
        ijk = np.stack(np.meshgrid(*[np.arange(-n, n + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
        errors = []
        for _ in range(200):
            orientation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
            world = (ijk + rng.random(3)) @ (orientation @ np.diag(SPACING)).T
            count = int((np.linalg.norm(world, axis=1) <= radius).sum())
            errors.append(count * np.prod(SPACING) / (4 / 3 * math.pi * radius**3) - 1)
        errors = np.abs(errors)
        assert errors.max() < tolerance, (radius, errors.max())
        assert errors.mean() < tolerance / 3, "the tolerance is not loose by an order of magnitude"


def test_crop_measures_volume_suvmax_suvmean(cohort, crop_lesions):
    assert list(crop_lesions.columns) == list(LESION_TABLE_COLUMNS)
    assert "suvmean" in LESION_TABLE_COLUMNS
    for pid, truth in cohort["truth"].items():
        for name in BALLS:
            row = lesion_row(crop_lesions, pid, name)
            exact, analytic = expected_exact(truth, name), expected_analytic(pid, name)
            assert exact["n"] > 300, "a ball of several voxels a side"
            # (1) the labelled voxels, up to the 4 decimals of lesions.csv
            assert row["volume_ml"] == pytest.approx(exact["volume_ml"], abs=CSV_ATOL)
            assert row["suvmax"] == pytest.approx(exact["suvmax"], abs=CSV_ATOL)
            assert row["suvmean"] == pytest.approx(exact["suvmean"], abs=CSV_ATOL)
            # (2) the continuous ball
            assert row["volume_ml"] == pytest.approx(analytic["volume_ml"],
                                                     abs=analytic["volume_tol"])
            assert row["suvmax"] == pytest.approx(analytic["suvmax"], abs=1e-4)
            assert row["suvmean"] == pytest.approx(analytic["suvmean"],
                                                   abs=analytic["suvmean_tol"] + 1e-4)
        # The two-level ball: SUVmean strictly between shell and core, SUVmax = core.
        row = lesion_row(crop_lesions, pid, "C")
        assert SHELL_SUV < row["suvmean"] < uptake(pid)["C"] == pytest.approx(row["suvmax"])
    # The CT is 40 HU everywhere: each lesion's mean density reads it (not left unknown).
    assert crop_lesions["hu_mean"].eq(40.0).all()


def test_measure_lesion_with_a_mask_on_a_finer_grid():
    """A mask at half the PET spacing: each mask voxel reads the PET voxel containing its centre
    (mask voxel (i, j, k) lies in PET voxel (i//2, j//2, k//2) on this grid), so SUVmean is the
    volume-weighted mean and the volume counts mask voxels, of 1/8 the PET voxel volume."""
    rng = np.random.default_rng(1)
    pet_affine = PET_AFFINES["P003"]
    pet_shape = (20, 16, 12)
    pet = rng.uniform(1.0, 20.0, pet_shape).astype(np.float32)
    fine = np.diag([0.5, 0.5, 0.5, 1.0])
    fine[:3, 3] = -0.25  # fine voxel centres at PET voxel coordinates k/2 - 1/4: no rounding ties
    mask_affine = pet_affine @ fine
    mask_shape = tuple(2 * n for n in pet_shape)
    world = voxel_world(mask_shape, mask_affine)
    centre = voxel_to_world(pet_affine, (np.array(pet_shape) - 1) / 2) + [1.3, -0.7, 0.4]
    mask = (np.linalg.norm(world - centre, axis=-1) <= 9.0).astype(np.int32) * 5

    measured = measure_lesion(mask, mask_affine, 5, pet, pet_affine)
    i, j, k = np.nonzero(mask == 5)
    read = pet[i // 2, j // 2, k // 2].astype(np.float64)
    assert measured.volume_ml == pytest.approx(len(i) * VOXEL_ML / 8, rel=1e-12)
    assert measured.suvmax == pytest.approx(read.max(), rel=1e-7)
    assert measured.suvmean == pytest.approx(read.mean(), rel=1e-7)
    # Not the plain mean over the PET voxels touched (partly covered PET voxels count less).
    touched = np.unique(np.stack([i // 2, j // 2, k // 2], 1), axis=0)
    assert abs(pet[tuple(touched.T)].mean() - read.mean()) > 1e-3


def test_load_crops_reads_a_crops_directory_written_before_suvmean(crops_dir, tmp_path):
    old = Path(shutil.copytree(crops_dir, tmp_path / "old"))
    table = pd.read_csv(old / "lesions.csv")
    table.drop(columns="suvmean").to_csv(old / "lesions.csv", index=False)
    lesions = load_crops(old).lesions
    assert list(lesions.columns) == list(LESION_TABLE_COLUMNS)
    assert lesions["suvmean"].isna().all()
    with pytest.raises(InputError, match="suvmean is missing"):
        lesion_biomarkers(lesions)


# ---------------------------------------------------------------------------------------------
# Biomarkers
# ---------------------------------------------------------------------------------------------


def test_lesion_biomarkers(cohort, crop_lesions):
    table = lesion_biomarkers(crop_lesions)
    assert list(table.columns) == list(LESION_BIOMARKER_COLUMNS)
    assert len(table) == len(crop_lesions) == 3 * len(BALLS)
    assert table[["patient_id", "lesion_id"]].values.tolist() == \
        crop_lesions[["patient_id", "lesion_id"]].values.tolist(), "input order kept"
    for pid, truth in cohort["truth"].items():
        for name, (_label, _offset, _radius, site) in BALLS.items():
            row = lesion_row(table, pid, name)
            exact, analytic = expected_exact(truth, name), expected_analytic(pid, name)
            assert row["is_bone"] == (site == "bone")
            # TL-PSMA = volume x SUVmean = voxel volume x sum of the label's SUVs.
            assert row["tl_psma"] == pytest.approx(exact["tl_psma"], rel=1e-4)
            tl_analytic = analytic["volume_ml"] * analytic["suvmean"]
            tl_tol = (analytic["volume_tol"] * analytic["suvmean"]
                      + (analytic["volume_ml"] + analytic["volume_tol"]) * analytic["suvmean_tol"])
            assert row["tl_psma"] == pytest.approx(tl_analytic, abs=tl_tol)


def test_patient_biomarkers(cohort, crop_lesions):
    table = patient_biomarkers(crop_lesions, patients=["P003", "P001", "P002", "P004"])
    assert list(table.columns) == list(PATIENT_BIOMARKER_COLUMNS)
    assert table["patient_id"].tolist() == ["P003", "P001", "P002", "P004"], "order as given"
    for pid, truth in cohort["truth"].items():
        row = table.set_index("patient_id").loc[pid]
        # Exact: pool every tumour voxel of the patient.
        in_tumour = truth["mask"] > 0
        values = truth["pet"][in_tumour].astype(np.float64)
        assert row["lesion_count"] == len(BALLS)
        assert row["psma_tv_ml"] == pytest.approx(in_tumour.sum() * VOXEL_ML, abs=3 * CSV_ATOL)
        assert row["suvmax"] == pytest.approx(values.max(), abs=CSV_ATOL)
        assert row["tl_psma_ml"] == pytest.approx(values.sum() * VOXEL_ML, rel=1e-4)
        assert row["suvmean"] == pytest.approx(values.mean(), rel=1e-4), \
            "whole-body SUVmean = mean over all tumour voxels (volume-weighted)"
        assert row["n_bone"] == 2 and row["bone_fraction"] == pytest.approx(2 / 3)
        # Analytic: the continuous balls.
        analytic = {name: expected_analytic(pid, name) for name in BALLS}
        volume = sum(a["volume_ml"] for a in analytic.values())
        volume_tol = sum(a["volume_tol"] for a in analytic.values())
        assert row["psma_tv_ml"] == pytest.approx(volume, abs=volume_tol)
        assert row["suvmax"] == pytest.approx(uptake(pid)["C"], abs=1e-4)
        tl = sum(a["volume_ml"] * a["suvmean"] for a in analytic.values())
        assert row["suvmean"] == pytest.approx(tl / volume, rel=0.1)
        # Not the unweighted mean of the lesions' SUVmeans (the balls differ in volume).
        per_lesion = crop_lesions[crop_lesions["patient_id"] == pid]["suvmean"].mean()
        assert abs(row["suvmean"] - per_lesion) > 0.05
    empty = table.set_index("patient_id").loc["P004"]
    assert empty.to_dict() == {"lesion_count": 0, "psma_tv_ml": 0.0, "suvmax": 0.0,
                               "suvmean": 0.0, "tl_psma_ml": 0.0, "n_bone": 0,
                               "bone_fraction": 0.0}
    assert table["lesion_count"].dtype.kind == "i" and table["n_bone"].dtype.kind == "i"
    # Without `patients`: the patients with lesions, in order of first appearance.
    assert patient_biomarkers(crop_lesions)["patient_id"].tolist() == ["P001", "P002", "P003"]
    # A patients table works too (as load_crops gives it), its order kept.
    patients = pd.DataFrame({"patient_id": ["P002", "P001", "P003"], "age": [60, 70, 80]})
    assert patient_biomarkers(crop_lesions, patients)["patient_id"].tolist() == \
        ["P002", "P001", "P003"]


def test_biomarker_features(crop_lesions):
    table = patient_biomarkers(crop_lesions, patients=["P001", "P002", "P003", "P004"])
    features = biomarker_features(table)
    assert list(features.columns) == ["patient_id", *FEATURE_COLUMNS]
    assert features["patient_id"].tolist() == table["patient_id"].tolist()
    assert np.isfinite(features[list(FEATURE_COLUMNS)].to_numpy()).all()
    with_lesions = features.iloc[:3]
    assert np.allclose(with_lesions["log_lesion_count"], math.log(3))
    assert np.allclose(with_lesions["log_psma_tv"], np.log(table["psma_tv_ml"].iloc[:3]))
    assert np.allclose(with_lesions["log_suvmax"], np.log(table["suvmax"].iloc[:3]))
    assert np.allclose(features["suvmean"], table["suvmean"])
    assert np.allclose(features["bone_fraction"], table["bone_fraction"])
    # No lesion: the floors, one step below the smallest real value.
    none = features.iloc[3]
    assert none["log_lesion_count"] == pytest.approx(math.log(FEATURE_FLOORS["lesion_count"]))
    assert none["log_lesion_count"] < math.log(1)
    assert none["log_psma_tv"] == pytest.approx(math.log(FEATURE_FLOORS["psma_tv_ml"]))
    assert none["log_psma_tv"] < math.log(VOXEL_ML), "below a single PET voxel"
    assert none["log_suvmax"] == pytest.approx(math.log(FEATURE_FLOORS["suvmax"]))
    assert none["suvmean"] == 0.0 and none["bone_fraction"] == 0.0
    # A value above a floor is not changed by it.
    small = table.iloc[:1].assign(psma_tv_ml=0.02, suvmax=0.2, lesion_count=1)
    assert biomarker_features(small).iloc[0]["log_psma_tv"] == pytest.approx(math.log(0.02))
    assert biomarker_features(small).iloc[0]["log_suvmax"] == pytest.approx(math.log(0.2))
    assert biomarker_features(small).iloc[0]["log_lesion_count"] == 0.0


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def toy_lesions() -> pd.DataFrame:
    return pd.DataFrame({"patient_id": ["P1", "P1", "P2"], "lesion_id": ["L1", "L2", "L1"],
                         "site": ["bone", "", "visceral"], "volume_ml": [1.5, 0.25, 4.0],
                         "suvmax": [12.0, 7.0, 30.0], "suvmean": [6.0, 3.5, 11.0]})


@pytest.mark.parametrize(("column", "value", "message"), [
    ("volume_ml", np.nan, r"patient P1: lesion 'L2': volume_ml is missing \(a lesion without a "
                          r"mask label"),
    ("volume_ml", -0.5, "patient P1: lesion 'L2': volume_ml = -0.5 is negative"),
    ("volume_ml", 0.0, "patient P1: lesion 'L2': volume_ml = 0: a lesion mask label has at least"),
    ("suvmax", np.inf, "patient P1: lesion 'L2': suvmax = inf is not finite"),
    ("suvmean", -1.0, "patient P1: lesion 'L2': suvmean = -1 is negative"),
    ("suvmean", "high", "patient P1: lesion 'L2': suvmean = 'high' is not a number"),
    ("suvmean", 9.0, "patient P1: lesion 'L2': suvmean 9 is above suvmax 7"),
])
def test_bad_lesion_values_name_patient_and_lesion(column, value, message):
    lesions = toy_lesions().astype({column: object})
    lesions.loc[1, column] = value
    for function in (lesion_biomarkers, patient_biomarkers):
        with pytest.raises(InputError, match=f"^{message}") as caught:
            function(lesions)
        assert caught.value.patient == "P1"


def test_other_bad_input():
    with pytest.raises(InputError, match="lesions table: missing column.s. suvmean"):
        lesion_biomarkers(toy_lesions().drop(columns="suvmean"))
    with pytest.raises(InputError, match="patient P1: lesion 'L1' appears more than once"):
        lesion_biomarkers(pd.concat([toy_lesions(), toy_lesions().iloc[:1]]))
    with pytest.raises(InputError, match="patient P2: has lesions but is not among the 1 patients"):
        patient_biomarkers(toy_lesions(), patients=["P1"])
    with pytest.raises(InputError, match="patient P1: appears more than once"):
        patient_biomarkers(toy_lesions(), patients=["P1", "P2", "P1"])
    with pytest.raises(InputError, match="patients table: missing column.s. patient_id"):
        patient_biomarkers(toy_lesions(), patients=pd.DataFrame({"id": ["P1", "P2"]}))
    table = patient_biomarkers(toy_lesions())
    with pytest.raises(InputError, match="patient biomarker table: missing column.s. suvmax"):
        biomarker_features(table.drop(columns="suvmax"))
    bad = table.copy()
    bad.loc[1, "psma_tv_ml"] = -2.0
    with pytest.raises(InputError, match="^patient P2: psma_tv_ml = -2 is negative"):
        biomarker_features(bad)
    bad = table.copy()
    bad.loc[0, "bone_fraction"] = 1.5
    with pytest.raises(InputError, match="^patient P1: bone_fraction 1.5 is above 1"):
        biomarker_features(bad)
    # Empty input: no lesions at all, every given patient gets the no-lesion row.
    empty = patient_biomarkers(toy_lesions().iloc[:0], patients=["P9"])
    assert empty["lesion_count"].tolist() == [0] and empty["suvmean"].tolist() == [0.0]


def test_toy_values_by_hand():
    lesions = lesion_biomarkers(toy_lesions())
    assert lesions["tl_psma"].tolist() == [9.0, 0.875, 44.0]
    assert lesions["is_bone"].tolist() == [True, False, False]
    patients = patient_biomarkers(toy_lesions()).set_index("patient_id")
    assert patients.loc["P1", "psma_tv_ml"] == 1.75
    assert patients.loc["P1", "tl_psma_ml"] == 9.875
    assert patients.loc["P1", "suvmean"] == pytest.approx(9.875 / 1.75)
    assert patients.loc["P1", "suvmax"] == 12.0
    assert patients.loc["P1", "bone_fraction"] == 0.5
    assert patients.loc["P2", "bone_fraction"] == 0.0 and patients.loc["P2", "n_bone"] == 0


def test_doctests():
    result = doctest.testmod(psma_lib.biomarkers, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
