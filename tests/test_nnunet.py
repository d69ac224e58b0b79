"""Import of an nnU-Net PSMA folder: lesions, world centroids, clinical join, bad input.

The test builds a tiny nnU-Net folder (3 cases, 32³ voxels, oblique flipped anisotropic affine):
case A has two separate blobs and one 1-voxel blob below the minimum volume; case B has two cubes
touching only at a corner (one lesion under 26-connectivity); case C has one blob.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from psma_lib import cli
from psma_lib.errors import InputError, ValidationFailed
from psma_lib.io import sha256_file
from psma_lib.manifest import PATIENT_COLUMNS, data_checksum, load_manifest, validate_manifest
from psma_lib.nnunet import import_nnunet, lesion_components

SHAPE = (32, 32, 32)
SPACING = (2.0, 2.5, 3.0)  # one voxel = 15 mm³ = 0.015 mL
MIN_VOLUME_ML = 0.05       # keeps blobs of >= 4 voxels


def make_affine() -> np.ndarray:
    a = math.radians(15)
    rotation = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-1.0, 1.0, 1.0]) @ np.diag(SPACING)
    affine[:3, 3] = (40.0, -120.0, 300.0)
    return affine


AFFINE = make_affine()
# Blobs as voxel boxes (start, stop) per axis; their centroid is the box centre.
BLOBS = {
    "caseA": [((4, 9), (5, 8), (6, 10)), ((20, 24), (18, 23), (15, 18))],
    "caseB": [((10, 12), (10, 12), (10, 12)), ((12, 14), (12, 14), (12, 14))],
    "caseC": [((14, 18), (14, 18), (2, 5))],
}
TINY_BLOB = (28, 28, 28)  # caseA, a single voxel


def box_centre(box) -> np.ndarray:
    return np.array([(start + stop - 1) / 2 for start, stop in box])


def world(voxel) -> np.ndarray:
    return (AFFINE @ np.array([*voxel, 1.0]))[:3]


def write_case(root: Path, case: str, boxes, extra_voxels=()) -> None:
    rng = np.random.default_rng(len(case) + sum(map(ord, case)))
    mask = np.zeros(SHAPE, np.uint8)
    for box in boxes:
        mask[tuple(slice(*axis) for axis in box)] = 1
    for voxel in extra_voxels:
        mask[voxel] = 1
    pet = rng.gamma(2.0, 0.5, SHAPE).astype(np.float32) + 8.0 * mask
    ct = rng.normal(30, 20, SHAPE).astype(np.float32)  # nnU-Net CTs are often float
    nib.save(nib.Nifti1Image(ct, AFFINE), root / f"imagesTr/{case}_0000.nii.gz")
    nib.save(nib.Nifti1Image(pet, AFFINE), root / f"imagesTr/{case}_0001.nii.gz")
    nib.save(nib.Nifti1Image(mask, AFFINE), root / f"labelsTr/{case}.nii.gz")


def clinical_rows(cases) -> pd.DataFrame:
    rows = []
    for i, case in enumerate(cases):
        rows.append({"patient_id": case, "age": 65 + i, "bmi": 24.0 + i, "ecog": i % 3,
                     "psa": 5.5 * (i + 1), "gleason": 7 + i % 3, "adt": 1, "arpi": i % 2,
                     "docetaxel": 0, "radiotherapy": "", "lu_psma": 0,
                     "pfs_months": 8.0 + 3 * i, "event": (i + 1) % 2})
    return pd.DataFrame(rows)


@pytest.fixture
def nnunet(tmp_path) -> tuple[Path, Path]:
    root = tmp_path / "nnunet"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case, boxes in BLOBS.items():
        write_case(root, case, boxes, extra_voxels=[TINY_BLOB] if case == "caseA" else [])
    clinical = tmp_path / "clinical.csv"
    clinical_rows(["caseC", "caseA", "caseB"]).to_csv(clinical, index=False)  # order differs
    return root, clinical


def test_import_nnunet(nnunet, tmp_path):
    source, clinical = nnunet
    manifest = import_nnunet(source, clinical, tmp_path / "cohort", min_volume_ml=MIN_VOLUME_ML)
    assert manifest == tmp_path / "cohort" / "manifest.yaml"
    assert validate_manifest(manifest, check_images=True) == []
    cohort = load_manifest(manifest)
    assert cohort.synthetic is False
    assert cohort.info["source"]["components_dropped_below_min_volume"] == 1
    assert "26-connectivity" in cohort.info["source"]["lesions"]

    lesions = cohort.lesions
    assert lesions.groupby("patient_id").size().to_dict() == {"caseA": 2, "caseB": 1, "caseC": 1}
    file_affine = nib.load(source / "imagesTr/caseA_0001.nii.gz").affine
    assert np.allclose(file_affine, AFFINE, atol=1e-4)
    for case, boxes in BLOBS.items():
        rows = lesions[lesions["patient_id"] == case].sort_values("mask_label")
        if case == "caseB":  # the two corner-touching cubes form one lesion centred between them
            expected = [world((box_centre(boxes[0]) + box_centre(boxes[1])) / 2)]
        else:
            expected = [world(box_centre(box)) for box in boxes]
        got = rows[["center_x_mm", "center_y_mm", "center_z_mm"]].to_numpy()
        np.testing.assert_allclose(got, np.array(expected), atol=1e-3)

        mask = nib.load(cohort.image_path(case, "mask"))
        labels = np.asarray(mask.dataobj)
        assert np.allclose(mask.affine, file_affine)
        assert sorted(np.unique(labels).tolist()) == [0, *rows["mask_label"].tolist()]
        source_mask = np.asarray(nib.load(source / f"labelsTr/{case}.nii.gz").dataobj)
        if case == "caseA":
            source_mask[TINY_BLOB] = 0  # the dropped component is gone from the relabelled mask
        assert np.array_equal(labels > 0, source_mask > 0)
        for label, box in zip(rows["mask_label"], boxes, strict=False):
            if case != "caseB":
                assert np.all(labels[tuple(slice(*axis) for axis in box)] == label)

    # PET and CT are byte-identical copies, and the clinical CSV is joined by patient_id.
    for case in BLOBS:
        assert sha256_file(cohort.image_path(case, "pet")) == sha256_file(
            source / f"imagesTr/{case}_0001.nii.gz")
        assert sha256_file(cohort.image_path(case, "ct")) == sha256_file(
            source / f"imagesTr/{case}_0000.nii.gz")
    expected = clinical_rows(["caseC", "caseA", "caseB"]).set_index("patient_id")
    got = cohort.patients.set_index("patient_id")
    assert sorted(got.index) == ["caseA", "caseB", "caseC"]
    for column in PATIENT_COLUMNS[1:]:
        want = pd.to_numeric(expected.loc[got.index, column]).astype(float)
        pd.testing.assert_series_equal(got[column].astype(float), want, check_names=False)


def test_all_lesions_kept_without_min_volume(nnunet, tmp_path):
    source, clinical = nnunet
    cohort = load_manifest(import_nnunet(source, clinical, tmp_path / "cohort"))
    assert (cohort.lesions["patient_id"] == "caseA").sum() == 3
    tiny = cohort.lesions.iloc[2]
    np.testing.assert_allclose(tiny[["center_x_mm", "center_y_mm", "center_z_mm"]].astype(float),
                               world(TINY_BLOB), atol=1e-3)


def test_import_lists_every_problem_and_writes_nothing(nnunet, tmp_path):
    source, clinical = nnunet
    write_case(source, "caseEmpty", [])
    write_case(source, "caseNoClinical", BLOBS["caseC"])
    (source / "labelsTr/caseB.nii.gz").unlink()  # incomplete case
    table = clinical_rows(["caseC", "caseA", "caseEmpty", "caseGhost"])
    table.loc[table["patient_id"] == "caseA", "pfs_months"] = -1
    table.to_csv(clinical, index=False)
    out = tmp_path / "cohort"
    with pytest.raises(ValidationFailed) as info:
        import_nnunet(source, clinical, out)
    problems = info.value.problems
    assert len(problems) == 5, problems

    def one(*parts):
        assert sum(all(p in problem for p in parts) for problem in problems) == 1, (parts, problems)

    one("patient caseB", "incomplete nnU-Net case", "labelsTr/caseB.nii.gz")
    one("patient caseA", "clinical.csv", "pfs_months = -1")
    one("patient caseNoClinical", "clinical.csv", "no row in the clinical CSV")
    one("patient caseGhost", "clinical.csv", "clinical row has no images")
    one("patient caseEmpty", "labelsTr/caseEmpty.nii.gz", "label mask is empty")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cohort")]


def test_image_problems_are_reported_per_case(nnunet, tmp_path):
    source, clinical = nnunet
    pet = np.full(SHAPE, np.nan, np.float32)
    nib.save(nib.Nifti1Image(pet, AFFINE), source / "imagesTr/caseA_0001.nii.gz")
    small_ct = np.zeros((16, 32, 32), np.float32)
    nib.save(nib.Nifti1Image(small_ct, AFFINE), source / "imagesTr/caseB_0000.nii.gz")
    (source / "labelsTr/caseC.nii.gz").write_bytes(b"garbage")
    with pytest.raises(ValidationFailed) as info:
        import_nnunet(source, clinical, tmp_path / "cohort")
    problems = info.value.problems
    assert len(problems) == 3, problems
    assert any("patient caseA" in p and "caseA_0001.nii.gz" in p and "NaN" in p for p in problems)
    assert any("patient caseB" in p and "caseB_0000.nii.gz" in p and "CT is not on the PET grid"
               in p for p in problems)
    assert any("patient caseC" in p and "labelsTr/caseC.nii.gz" in p and "cannot read" in p
               for p in problems)
    assert not (tmp_path / "cohort").exists()


def test_min_volume_removing_every_lesion_is_an_error(nnunet, tmp_path):
    source, clinical = nnunet
    with pytest.raises(ValidationFailed) as info:
        import_nnunet(source, clinical, tmp_path / "cohort", min_volume_ml=100.0)
    assert len(info.value.problems) == 3
    assert "patient caseC" in info.value.problems[-1]
    assert "all 1 component(s) are below 100.0 mL" in info.value.problems[-1]


def test_link_keeps_files_inside_the_cohort(nnunet, tmp_path):
    source, clinical = nnunet
    manifest = import_nnunet(source, clinical, tmp_path / "cohort", copy=False)
    pet = manifest.parent / "images/caseA_pet.nii.gz"
    assert not pet.is_symlink()
    assert os.stat(pet).st_ino == os.stat(source / "imagesTr/caseA_0001.nii.gz").st_ino
    assert validate_manifest(manifest) == []


def test_refuses_to_replace_a_folder_that_is_not_a_cohort(nnunet, tmp_path):
    source, clinical = nnunet
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    with pytest.raises(InputError, match="not a cohort"):
        import_nnunet(source, clinical, out)
    assert (out / "thesis.tex").read_text() == "do not delete"
    # A previous cohort is replaced atomically.
    first = import_nnunet(source, clinical, tmp_path / "cohort")
    second = import_nnunet(source, clinical, tmp_path / "cohort", min_volume_ml=MIN_VOLUME_ML)
    assert first == second and len(load_manifest(second).lesions) == 4


def test_lesion_components_connectivity_and_volume():
    mask = np.zeros((6, 6, 6), np.uint8)
    mask[0, 0, 0] = mask[1, 1, 1] = 1  # corner neighbours: one lesion under 26-connectivity
    mask[4:6, 4:6, 4:6] = 1
    labels, table, dropped = lesion_components(mask, np.diag([1.0, 2.0, 5.0, 1.0]))
    assert dropped == 0 and table["n_voxels"].tolist() == [2, 8]
    np.testing.assert_allclose(table["volume_ml"], [0.02, 0.08])
    np.testing.assert_allclose(table.loc[0, ["center_x_mm", "center_y_mm", "center_z_mm"]].astype(
        float), [0.5, 1.0, 2.5])
    assert labels[0, 0, 0] == labels[1, 1, 1] == 1 and np.all(labels[4:, 4:, 4:] == 2)


def test_cli_import_nnunet(nnunet, tmp_path, capsys):
    source, clinical = nnunet
    out = tmp_path / "cohort"
    argv = ["import-nnunet", str(source), "--clinical", str(clinical), "--out", str(out),
            "--min-volume-ml", str(MIN_VOLUME_ML)]
    assert cli.main(argv) == 0
    assert "Imported 3 patients, 4 lesions (1 component(s) below 0.05 mL dropped)" in \
        capsys.readouterr().out
    assert cli.main(["validate", str(out)]) == 0
    assert cli.main([*argv[:3], str(tmp_path / "missing.csv"), *argv[4:]]) == 2
    assert "clinical CSV not found" in capsys.readouterr().err


def test_exclude_leaves_a_case_out(nnunet, tmp_path):
    source, clinical = nnunet
    write_case(source, "caseEmpty", [])
    table = clinical_rows(["caseA", "caseB", "caseC", "caseEmpty"])
    table.to_csv(clinical, index=False)
    with pytest.raises(ValidationFailed, match="caseEmpty.*label mask is empty"):
        import_nnunet(source, clinical, tmp_path / "cohort")
    cohort = load_manifest(import_nnunet(source, clinical, tmp_path / "cohort",
                                         exclude=["caseEmpty"]))
    assert cohort.patients["patient_id"].tolist() == ["caseA", "caseB", "caseC"]
    assert cohort.info["source"]["excluded_cases"] == ["caseEmpty"]
    assert not (tmp_path / "cohort/images/caseEmpty_pet.nii.gz").exists()
    with pytest.raises(ValidationFailed) as info:
        import_nnunet(source, clinical, tmp_path / "other", exclude=["caseEmpty", "caseTypo"])
    assert info.value.problems == [
        f"patient caseTypo: file {source}: excluded case not found (typo?)"]


def test_import_is_reproducible(nnunet, tmp_path):
    # Same inputs -> byte-identical cohort (the data checksum pins every file).
    source, clinical = nnunet
    first = import_nnunet(source, clinical, tmp_path / "one", min_volume_ml=MIN_VOLUME_ML)
    second = import_nnunet(source, clinical, tmp_path / "two", min_volume_ml=MIN_VOLUME_ML)
    assert data_checksum(first) == data_checksum(second)
