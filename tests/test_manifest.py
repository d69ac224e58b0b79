"""Cohort manifest: write/load round trip and one test per kind of bad input.

Every bad-input test checks that the message names the patient and/or the file and the problem.
The cohort is tiny (3 patients, ~10³ voxels) with oblique, flipped, anisotropic affines and the
CT on its own grid, so the world-space checks are not trivially axis-aligned.
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from psma_lib import cli
from psma_lib.errors import InputError, ValidationFailed
from psma_lib.io import sha256_file
from psma_lib.manifest import (
    IMAGE_COLUMNS,
    LESION_COLUMNS,
    PATIENT_COLUMNS,
    data_checksum,
    load_manifest,
    validate_manifest,
    write_manifest,
)
from psma_lib.vocabulary import CLINICAL_COLUMNS

PET_SHAPE = (10, 12, 8)


def oblique_affine(spacing, angle_deg, origin, flip_x=True) -> np.ndarray:
    """Rotation about z by ``angle_deg``, optional x flip, anisotropic spacing, origin in mm."""
    a = math.radians(angle_deg)
    rotation = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    if flip_x:
        rotation = rotation @ np.diag([-1.0, 1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


PET_AFFINE = oblique_affine((4.0, 4.0, 3.0), 20, (30.0, -150.0, 400.0))
# The CT covers the PET's field of view on a finer in-plane grid with its own affine.
CT_AFFINE = oblique_affine((2.0, 2.0, 3.0), 20, (31.0, -151.0, 400.0))
CT_SHAPE = (20, 24, 8)


def world(affine, voxel) -> list[float]:
    return (affine @ np.array([*voxel, 1.0]))[:3].tolist()


def save(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, affine), path)


def make_cohort(root: Path, n_patients: int = 3) -> Path:
    """A valid cohort: each patient has lesion L1 (mask label 1) and L2 (world centre only)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    patients, images, lesions = [], [], []
    for p in range(n_patients):
        pid = f"P{p + 1:03d}"
        pet = rng.gamma(2.0, 0.4, PET_SHAPE).astype(np.float32)
        mask = np.zeros(PET_SHAPE, np.uint8)
        mask[2:5, 3:6, 2:4] = 1
        pet[mask > 0] += 10
        ct = rng.normal(40, 10, CT_SHAPE).astype(np.int16)
        for kind, data, affine in (("pet", pet, PET_AFFINE), ("ct", ct, CT_AFFINE),
                                   ("mask", mask, PET_AFFINE)):
            save(root / f"images/{pid}_{kind}.nii.gz", data, affine)
        images.append({"patient_id": pid, "pet": f"images/{pid}_pet.nii.gz",
                       "ct": f"images/{pid}_ct.nii.gz", "mask": f"images/{pid}_mask.nii.gz"})
        patients.append({"patient_id": pid, "age": 60 + p, "bmi": 27.5, "ecog": p % 2,
                         "psa": 12.3 if p else np.nan, "gleason": 8, "adt": 1, "arpi": 0,
                         "docetaxel": 0, "radiotherapy": 1, "lu_psma": 0,
                         "pfs_months": 10.5 + p, "event": p % 2})
        # L2's centre is just inside the PET field of view (voxel -0.4 on the first axis).
        x, y, z = world(PET_AFFINE, (-0.4, 6, 4))
        lesions += [
            {"patient_id": pid, "lesion_id": "L1", "mask_label": 1, "center_x_mm": np.nan,
             "center_y_mm": np.nan, "center_z_mm": np.nan, "site": "bone"},
            {"patient_id": pid, "lesion_id": "L2", "mask_label": np.nan, "center_x_mm": x,
             "center_y_mm": y, "center_z_mm": z, "site": ""},
        ]
    # NumPy scalars and tuples in the info become plain YAML.
    info = {"name": "tiny", "synthetic": True, "description": "test cohort", "seed": np.int64(0),
            "spacing_mm": (4.0, 4.0, 3.0)}
    return write_manifest(root, pd.DataFrame(patients), pd.DataFrame(images),
                          pd.DataFrame(lesions), info)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    return make_cohort(tmp_path_factory.mktemp("template") / "cohort")


@pytest.fixture
def manifest(template, tmp_path) -> Path:
    """A fresh copy of the valid cohort that a test may break."""
    root = tmp_path / "cohort"
    for path in template.parent.rglob("*"):
        target = root / path.relative_to(template.parent)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return root / "manifest.yaml"


# ---- helpers that break a cohort but keep the checksums consistent ---------------------------


def read_table(manifest: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(manifest.parent / f"{name}.csv", dtype=str, keep_default_na=False)


def rehash_tables(manifest: Path) -> None:
    content = yaml.safe_load(manifest.read_text())
    for entry in content["tables"].values():
        table = manifest.parent / entry["path"]
        if table.is_file():
            entry["sha256"] = sha256_file(table)
    manifest.write_text(yaml.safe_dump(content, sort_keys=False))


def edit_table(manifest: Path, name: str, edit) -> None:
    table = read_table(manifest, name)
    edit(table)
    table.to_csv(manifest.parent / f"{name}.csv", index=False)
    rehash_tables(manifest)


def set_cell(manifest: Path, name: str, pid: str, column: str, value, lesion: str | None = None):
    def edit(table):
        rows = table["patient_id"] == pid
        if lesion is not None:
            rows &= table["lesion_id"] == lesion
        table.loc[rows, column] = value
    edit_table(manifest, name, edit)


def replace_image(manifest: Path, pid: str, kind: str, write) -> str:
    """Overwrite a patient's image with ``write(path)`` and update its SHA-256; returns its path."""
    relative = f"images/{pid}_{kind}.nii.gz"
    write(manifest.parent / relative)
    set_cell(manifest, "images", pid, f"{kind}_sha256", sha256_file(manifest.parent / relative))
    return relative


def assert_one(problems: list[str], *parts: str) -> str:
    """Exactly one problem contains all ``parts``; returns it."""
    hits = [p for p in problems if all(part in p for part in parts)]
    assert len(hits) == 1, f"expected one problem with {parts}, got {problems}"
    return hits[0]


# ---- the valid cohort ---------------------------------------------------------------------------


def test_valid_cohort_round_trip(manifest):
    assert validate_manifest(manifest) == []
    cohort = load_manifest(manifest.parent)  # the folder works as well as the file
    assert cohort.root == manifest.parent and cohort.info["name"] == "tiny" and cohort.synthetic
    assert cohort.info["seed"] == 0 and cohort.info["spacing_mm"] == [4.0, 4.0, 3.0]
    assert list(cohort.patients.columns[: len(PATIENT_COLUMNS)]) == list(PATIENT_COLUMNS)
    assert list(cohort.images.columns) == list(IMAGE_COLUMNS)
    assert list(cohort.lesions.columns) == list(LESION_COLUMNS)
    assert cohort.patients["patient_id"].tolist() == ["P001", "P002", "P003"]
    assert math.isnan(cohort.patients.loc[0, "psa"]) and cohort.patients.loc[1, "psa"] == 12.3
    assert cohort.patients["event"].tolist() == [0, 1, 0]
    assert cohort.lesions["mask_label"].isna().tolist() == [False, True] * 3
    assert cohort.lesions["site"].tolist() == ["bone", ""] * 3
    for kind in ("pet", "ct", "mask"):
        path = cohort.image_path("P002", kind)
        assert path.is_file() and sha256_file(path) == cohort.images.loc[1, f"{kind}_sha256"]
    text = (manifest.parent / "patients.csv").read_text().splitlines()
    assert text[1].startswith("P001,60,27.5,0,,8,1,0,0,1,0,10.5,0")  # ints stay ints, NaN empty
    assert cohort.checksum == data_checksum(manifest) == sha256_file(manifest)


def test_checksum_pins_every_file(manifest):
    before = data_checksum(manifest)
    replace_image(manifest, "P001", "pet", lambda p: save(p, np.ones(PET_SHAPE, np.float32),
                                                          PET_AFFINE))
    assert data_checksum(manifest) != before  # images.csv hash -> table hash -> manifest


def test_write_manifest_refuses_bad_tables_and_writes_nothing(manifest):
    cohort = load_manifest(manifest)
    root = manifest.parent
    before = {path.name: path.read_bytes() for path in root.glob("*.*")}
    patients = cohort.patients.copy()
    patients.loc[0, "age"] = 150
    lesions = cohort.lesions.copy()
    lesions.loc[0, "site"] = "brain"
    images = cohort.images[["patient_id", "pet", "ct", "mask"]].copy()
    with pytest.raises(ValidationFailed) as info:
        write_manifest(root, patients, images, lesions, {"name": "x", "synthetic": True})
    assert len(info.value.problems) == 2
    assert_one(info.value.problems, "patient P001", "patients.csv", "age = 150", "[18, 110]")
    assert_one(info.value.problems, "patient P001", "lesions.csv", "unknown site 'brain'")
    assert {path.name: path.read_bytes() for path in root.glob("*.*")} == before


# ---- manifest file --------------------------------------------------------------------------


@pytest.mark.parametrize("content, expected", [
    ("format: [unclosed\n", "not readable YAML"),
    ("- a list\n", "not a YAML mapping"),
    ("format: something-else\nversion: 1\n", "format is 'something-else'"),
    ("format: psma-pfs-manifest\nversion: 7\n", "version is 7, expected 1"),
])
def test_bad_manifest_file(manifest, content, expected):
    manifest.write_text(content)
    problems = validate_manifest(manifest)
    assert len(problems) == 1
    assert_one(problems, f"file {manifest}", expected)
    with pytest.raises(ValidationFailed, match=expected):
        load_manifest(manifest)


def test_cohort_info_needs_synthetic_flag(manifest):
    cohort = load_manifest(manifest)
    with pytest.raises(ValidationFailed, match="cohort.synthetic must be true or false"):
        write_manifest(cohort.root, cohort.patients, cohort.images[["patient_id", "pet", "ct", "mask"]],
                       cohort.lesions, {"name": "no flag"})
    content = yaml.safe_load(manifest.read_text())
    del content["cohort"]["synthetic"]
    manifest.write_text(yaml.safe_dump(content))
    assert validate_manifest(manifest) == [
        f"file {manifest}: cohort.synthetic must be true or false"]


def test_missing_manifest(tmp_path):
    problems = validate_manifest(tmp_path / "nowhere.yaml")
    assert_one(problems, "nowhere.yaml", "manifest not found")


def test_missing_table(manifest):
    (manifest.parent / "lesions.csv").unlink()
    content = yaml.safe_load(manifest.read_text())
    del content["tables"]["images"]
    manifest.write_text(yaml.safe_dump(content))
    problems = validate_manifest(manifest)
    assert_one(problems, "file lesions.csv", "table 'lesions' file not found")
    assert_one(problems, "table 'images' missing from the manifest")


def test_table_sha_mismatch(manifest):
    path = manifest.parent / "patients.csv"
    path.write_text(path.read_text().replace("P003,62", "P003,63"))
    assert_one(validate_manifest(manifest), "file patients.csv", "SHA-256 mismatch")


def test_missing_columns(manifest):
    edit_table(manifest, "patients", lambda t: t.drop(columns=["bmi", "event"], inplace=True))
    problems = validate_manifest(manifest)
    assert problems == ["file patients.csv: missing column(s): bmi, event"]


# ---- ids ---------------------------------------------------------------------------------------


def test_duplicate_patient_ids(manifest):
    set_cell(manifest, "patients", "P003", "patient_id", "P002")
    problems = validate_manifest(manifest)
    assert_one(problems, "patient P002", "patients.csv", "duplicate patient_id (2 rows)")
    # P003 still has images and lesions but no longer a patients row.
    assert_one(problems, "patient P003", "images.csv", "not in patients.csv")
    assert_one(problems, "patient P003", "lesions.csv", "not in patients.csv")


def test_duplicate_lesion_ids(manifest):
    set_cell(manifest, "lesions", "P002", "lesion_id", "L1", lesion="L2")
    assert_one(validate_manifest(manifest), "patient P002", "lesions.csv", "duplicate lesion_id 'L1'")


def test_patient_without_images_row_and_unknown_patient(manifest):
    set_cell(manifest, "images", "P002", "patient_id", "P999")
    problems = validate_manifest(manifest)
    assert_one(problems, "patient P999", "images.csv", "in images.csv but not in patients.csv")
    assert_one(problems, "patient P002", "images.csv", "no row in images.csv")


def test_empty_cohort(manifest):
    edit_table(manifest, "patients", lambda t: t.drop(t.index, inplace=True))
    problems = validate_manifest(manifest)
    assert_one(problems, "file patients.csv: no patients")
    assert_one(problems, "patient P001", "images.csv", "not in patients.csv")


def test_patient_without_lesions(manifest):
    edit_table(manifest, "lesions", lambda t: t.drop(t.index[t["patient_id"] == "P001"],
                                                     inplace=True))
    assert_one(validate_manifest(manifest), "patient P001", "lesions.csv", "has no lesions")


# ---- clinical and outcome values ------------------------------------------------------------


@pytest.mark.parametrize("column, value, expected", [
    ("age", "old", "age = 'old' is not a number"),
    ("age", "150", "age = 150 is outside [18, 110]"),
    ("bmi", "5", "bmi = 5 is outside [10, 70]"),
    ("ecog", "5", "ecog = 5 is outside [0, 4]"),
    ("ecog", "1.5", "ecog = 1.5 is not a whole number"),
    ("psa", "-1", "psa = -1 is outside >= 0"),
    ("gleason", "11", "gleason = 11 is outside [6, 10]"),
    ("adt", "2", "adt = 2 is outside [0, 1]"),
    ("lu_psma", "yes", "lu_psma = 'yes' is not a number"),
    ("pfs_months", "", "pfs_months is missing"),
    ("pfs_months", "-3", "pfs_months = -3 must be a positive time"),
    ("pfs_months", "0", "pfs_months = 0 must be a positive time"),
    ("pfs_months", "soon", "pfs_months = 'soon' is not a number"),
    ("event", "2", "event = '2' must be 0 (censored) or 1 (progression)"),
    ("event", "", "event = missing must be 0"),
])
def test_bad_patient_values(manifest, column, value, expected):
    set_cell(manifest, "patients", "P002", column, value)
    problems = validate_manifest(manifest, check_images=False)
    assert len(problems) == 1
    assert_one(problems, "patient P002: file patients.csv: " + expected)
    with pytest.raises(ValidationFailed, match="P002"):
        load_manifest(manifest)


def test_missing_clinical_values_are_allowed(manifest):
    for column in CLINICAL_COLUMNS:
        set_cell(manifest, "patients", "P001", column, "")
    assert validate_manifest(manifest) == []
    assert load_manifest(manifest).patients.loc[0, list(CLINICAL_COLUMNS)].isna().all()


# ---- paths and files --------------------------------------------------------------------------


def test_path_escaping_the_cohort(manifest, tmp_path):
    outside = tmp_path / "outside_ct.nii.gz"
    outside.write_bytes((manifest.parent / "images/P001_ct.nii.gz").read_bytes())
    set_cell(manifest, "images", "P001", "ct", str(outside))                      # absolute
    set_cell(manifest, "images", "P002", "ct", "../outside_ct.nii.gz")             # '..'
    os.symlink(outside, manifest.parent / "images/link_ct.nii.gz")
    set_cell(manifest, "images", "P003", "ct", "images/link_ct.nii.gz")            # symlink out
    problems = validate_manifest(manifest)
    assert len(problems) == 3, problems
    assert_one(problems, "patient P001", str(outside), "escapes the cohort folder")
    assert_one(problems, "patient P002", "../outside_ct.nii.gz", "escapes the cohort folder")
    assert_one(problems, "patient P003", "images/link_ct.nii.gz", "escapes the cohort folder")


def test_symlink_inside_the_cohort_is_fine(manifest):
    images = manifest.parent / "images"
    os.symlink(images / "P001_ct.nii.gz", images / "alias_ct.nii.gz")
    set_cell(manifest, "images", "P001", "ct", "images/alias_ct.nii.gz")
    assert validate_manifest(manifest) == []


def test_missing_file(manifest):
    (manifest.parent / "images/P002_mask.nii.gz").unlink()
    problems = validate_manifest(manifest)
    assert problems == ["patient P002: file images/P002_mask.nii.gz: mask file not found"]


def test_empty_pet_path(manifest):
    set_cell(manifest, "images", "P003", "pet", "")
    assert_one(validate_manifest(manifest), "patient P003", "images.csv", "PET path is empty")


def test_file_sha_mismatch(manifest):
    save(manifest.parent / "images/P003_pet.nii.gz", np.ones(PET_SHAPE, np.float32), PET_AFFINE)
    assert_one(validate_manifest(manifest, check_images=False), "patient P003",
               "images/P003_pet.nii.gz", "SHA-256 mismatch")


# ---- lesions ------------------------------------------------------------------------------------


def test_lesion_without_label_or_centre(manifest):
    set_cell(manifest, "lesions", "P001", "center_y_mm", "", lesion="L2")
    problems = validate_manifest(manifest)
    assert_one(problems, "patient P001", "lesions.csv", "lesion 'L2': incomplete centre")
    assert_one(problems, "patient P001", "lesions.csv",
               "lesion 'L2': neither a mask_label nor a complete world centre")


@pytest.mark.parametrize("value, expected", [("0", "must be a positive integer"),
                                             ("1.5", "must be a positive integer"),
                                             ("x", "must be a positive integer")])
def test_bad_mask_label(manifest, value, expected):
    set_cell(manifest, "lesions", "P002", "mask_label", value, lesion="L1")
    assert_one(validate_manifest(manifest), "patient P002", "lesions.csv", "lesion 'L1'", expected)


def test_mask_label_without_mask(manifest):
    set_cell(manifest, "images", "P001", "mask", "")
    set_cell(manifest, "images", "P001", "mask_sha256", "")
    assert_one(validate_manifest(manifest), "patient P001", "lesions.csv",
               "mask_label 1 given but the patient has no mask image")


def test_unknown_site(manifest):
    set_cell(manifest, "lesions", "P003", "site", "liver", lesion="L1")
    assert_one(validate_manifest(manifest), "patient P003", "lesions.csv", "unknown site 'liver'")


# ---- image contents -----------------------------------------------------------------------------


def test_corrupt_and_truncated_nifti(manifest):
    replace_image(manifest, "P001", "pet", lambda p: p.write_bytes(b"not a nifti file"))
    data = gzip.decompress((manifest.parent / "images/P002_ct.nii.gz").read_bytes())
    replace_image(manifest, "P002", "ct", lambda p: p.write_bytes(gzip.compress(data)[:200]))
    problems = validate_manifest(manifest)
    assert_one(problems, "patient P001", "images/P001_pet.nii.gz", "cannot read NIfTI")
    assert_one(problems, "patient P002", "images/P002_ct.nii.gz", "cannot read NIfTI")
    # The table-only check does not open images.
    assert validate_manifest(manifest, check_images=False) == []


def test_non_3d_image(manifest):
    replace_image(manifest, "P001", "ct", lambda p: save(p, np.zeros((*CT_SHAPE, 2), np.int16),
                                                         CT_AFFINE))
    assert_one(validate_manifest(manifest), "patient P001", "images/P001_ct.nii.gz",
               "expected a 3-D volume")


def test_nan_and_negative_suv(manifest):
    pet = np.ones(PET_SHAPE, np.float32)
    pet[0, 0, :3] = np.nan
    replace_image(manifest, "P001", "pet", lambda p: save(p, pet, PET_AFFINE))
    replace_image(manifest, "P002", "pet", lambda p: save(p, -np.ones(PET_SHAPE, np.float32),
                                                          PET_AFFINE))
    problems = validate_manifest(manifest)
    assert_one(problems, "patient P001", "images/P001_pet.nii.gz", "3 NaN")
    assert_one(problems, "patient P002", "images/P002_pet.nii.gz", "SUV cannot be negative")


def test_pet_and_ct_do_not_overlap(manifest):
    shifted = CT_AFFINE.copy()
    shifted[2, 3] += 500.0  # half a metre up: no common world point
    ct = nib.load(manifest.parent / "images/P003_ct.nii.gz").get_fdata().astype(np.int16)
    replace_image(manifest, "P003", "ct", lambda p: save(p, ct, shifted))
    problems = validate_manifest(manifest)
    assert problems == [assert_one(problems, "patient P003", "images/P003_ct.nii.gz",
                                   "PET and CT do not overlap in world space")]


def test_ct_partly_overlapping_is_fine(manifest):
    shifted = CT_AFFINE.copy()
    shifted[2, 3] += 12.0  # half the z extent: still overlapping
    ct = nib.load(manifest.parent / "images/P003_ct.nii.gz").get_fdata().astype(np.int16)
    replace_image(manifest, "P003", "ct", lambda p: save(p, ct, shifted))
    assert validate_manifest(manifest) == []


def test_mask_not_on_pet_grid(manifest):
    mask = np.zeros(PET_SHAPE, np.uint8)
    mask[3, 3, 3] = 1
    replace_image(manifest, "P001", "mask", lambda p: save(p, mask[:, :, :6], PET_AFFINE))
    moved = PET_AFFINE.copy()
    moved[0, 3] += 2.0
    replace_image(manifest, "P002", "mask", lambda p: save(p, mask, moved))
    problems = validate_manifest(manifest)
    assert_one(problems, "patient P001", "images/P001_mask.nii.gz", "mask is not on the PET grid")
    assert_one(problems, "patient P002", "images/P002_mask.nii.gz", "mask is not on the PET grid")


def test_mask_label_absent_from_mask(manifest):
    set_cell(manifest, "lesions", "P002", "mask_label", "7", lesion="L1")
    assert_one(validate_manifest(manifest), "patient P002", "images/P002_mask.nii.gz",
               "lesion 'L1': mask_label 7 does not occur in the mask")


def test_lesion_centre_outside_field_of_view(manifest):
    # Voxel (-0.6, 6, 4) is 0.1 voxel beyond the PET's first face: outside, through an oblique,
    # flipped affine; (-0.4, 6, 4) (the template's L2) is inside.
    x, y, z = world(PET_AFFINE, (-0.6, 6, 4))
    for column, value in zip(("center_x_mm", "center_y_mm", "center_z_mm"), (x, y, z), strict=True):
        set_cell(manifest, "lesions", "P001", column, repr(value), lesion="L2")
    problems = validate_manifest(manifest)
    assert_one(problems, "patient P001", "images/P001_pet.nii.gz", "lesion 'L2'",
               "outside the PET field of view", "voxel [-0.6, 6.0, 4.0]")
    assert len(problems) == 1


# ---- everything at once, load_manifest and the CLI -------------------------------------------------


def break_several(manifest: Path) -> None:
    set_cell(manifest, "patients", "P001", "age", "150")
    set_cell(manifest, "patients", "P002", "event", "3")
    set_cell(manifest, "lesions", "P003", "site", "brain", lesion="L1")
    (manifest.parent / "images/P002_ct.nii.gz").unlink()
    replace_image(manifest, "P003", "pet", lambda p: save(p, np.full(PET_SHAPE, np.nan, np.float32),
                                                          PET_AFFINE))


def test_validate_lists_all_problems(manifest):
    break_several(manifest)
    problems = validate_manifest(manifest)
    assert len(problems) == 5, problems
    assert_one(problems, "patient P001", "age = 150")
    assert_one(problems, "patient P002", "event = '3'")
    assert_one(problems, "patient P003", "unknown site 'brain'")
    assert_one(problems, "patient P002", "images/P002_ct.nii.gz", "CT file not found")
    assert_one(problems, "patient P003", "images/P003_pet.nii.gz", "NaN")
    # load_manifest checks the tables only, but lists all of those problems at once.
    with pytest.raises(ValidationFailed) as info:
        load_manifest(manifest)
    assert len(info.value.problems) == 4
    assert isinstance(info.value, InputError)


def test_cli_validate(manifest, capsys):
    assert cli.main(["validate", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert f"OK: 3 patients, 6 lesions, checksum {data_checksum(manifest)}" in out

    break_several(manifest)
    assert cli.main(["validate", str(manifest.parent)]) == 2
    err = capsys.readouterr().err
    assert "5 problem(s) found" in err and "age = 150" in err and "P003_pet.nii.gz" in err
    assert cli.main(["validate", "--no-images", str(manifest)]) == 2
    assert "4 problem(s) found" in capsys.readouterr().err


# ---- the real-cohort template and its documented workflow -----------------------------------------

TEMPLATE = Path(__file__).resolve().parent.parent / "data_manifest" / "real_cohort_template"


def test_template_matches_the_schema_and_its_workflow_validates(tmp_path):
    content = yaml.safe_load((TEMPLATE / "manifest.yaml").read_text())
    assert content["format"] == "psma-pfs-manifest" and content["version"] == 1
    assert content["cohort"]["synthetic"] is False
    for name, columns in (("patients", PATIENT_COLUMNS), ("images", IMAGE_COLUMNS),
                          ("lesions", LESION_COLUMNS)):
        assert content["tables"][name]["path"] == f"{name}.csv"
        table = pd.read_csv(TEMPLATE / f"{name}.csv", dtype=str)
        assert list(table.columns) == list(columns) and len(table) >= 1

    # The README's "hand-written tables" recipe, on the template with images placed beside it.
    root = tmp_path / "real"
    root.mkdir()
    for path in TEMPLATE.iterdir():
        (root / path.name).write_bytes(path.read_bytes())
    (root / "images").mkdir()
    # A PET grid whose field of view contains the example centre (-42.5, 18.0, -310.25) mm.
    affine = np.diag([-4.0, 4.0, 3.0, 1.0])
    affine[:3, 3] = (0.0, -40.0, -350.0)
    mask = np.zeros((24, 24, 30), np.uint8)
    mask[3:6, 3:6, 3:6] = 1
    save(root / "images/H0001_pet.nii.gz", np.ones(mask.shape, np.float32), affine)
    save(root / "images/H0001_ct.nii.gz", np.zeros(mask.shape, np.int16), affine)
    save(root / "images/H0001_mask.nii.gz", mask, affine)
    with pytest.raises(ValidationFailed, match="SHA-256 mismatch"):
        load_manifest(root)  # the template's placeholder hashes are not valid

    def read(name):
        return pd.read_csv(root / f"{name}.csv", dtype={"patient_id": str, "lesion_id": str})

    write_manifest(root, read("patients"),
                   read("images").drop(columns=["pet_sha256", "ct_sha256", "mask_sha256"]),
                   read("lesions"), content["cohort"])
    assert validate_manifest(root) == []
    cohort = load_manifest(root)
    assert cohort.lesions["site"].tolist() == ["bone", "lymph_node"]
    assert cohort.lesions["mask_label"].tolist()[0] == 1
