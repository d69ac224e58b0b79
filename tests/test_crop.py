"""``crop_cohort`` / ``load_crops`` on a tiny cohort written as real NIfTI files by the test.

Three patients with different geometry: PET axis-aligned, flipped (LPS-like) and oblique; the CT
always on its own, finer and flipped grid; the mask on the PET grid. Crops are 24 mm at 3 mm
(8^3 voxels) to stay fast.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from psma_lib.crop import (
    CT_PAD_HU,
    LESION_TABLE_COLUMNS,
    crop_cohort,
    load_crops,
    register_cli,
)
from psma_lib.errors import InputError
from psma_lib.geometry import CROP_ORIENTATION, voxel_to_world, world_to_voxel
from psma_lib.images import image_bounds_mm, load_image
from psma_lib.manifest import data_checksum, write_manifest

SIZE_MM, SPACING_MM, N = 24.0, 3.0, 8
PET_SHAPE = (24, 22, 20)
CT_SHAPE = (40, 44, 30)


def rotation_z(degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])


def affine(matrix, origin) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = matrix
    out[:3, 3] = origin
    return out


PET_AFFINES = [
    affine(np.diag([4.0, 4.0, 3.0]), (-46.0, -42.0, -28.5)),
    affine(np.diag([-4.0, -4.0, 3.0]), (46.0, 42.0, -28.5)),
    affine(rotation_z(25) @ np.diag([4.0, 4.0, 3.0]), (-30.0, -55.0, -28.5)),
]
# CT: finer in-plane, flipped in x, its own origin, covering the PET's field of view.
CT_AFFINE = affine(np.diag([-2.5, 2.5, 2.5]), (55.0, -55.0, -37.0))


def voxel_grid_world(shape, aff) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return voxel_to_world(aff, ijk)


def make_cohort(root: Path, n_patients: int = 3) -> dict:
    """Write a cohort; returns what the test needs to know (lesion world centres, affines).

    Each patient has lesions L1 (mask label 1, 8 mm ball, SUV ~12) and L2 (label 2, 6 mm ball)
    and L3 (a world centre only, no label); the last patient's L2 sits near the PET's edge.
    """
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    patients, images, lesions, truth = [], [], [], {}
    for p in range(n_patients):
        pid = f"P{p + 1:03d}"
        pet_affine = PET_AFFINES[p % len(PET_AFFINES)]
        pet_world = voxel_grid_world(PET_SHAPE, pet_affine)
        ct_world = voxel_grid_world(CT_SHAPE, CT_AFFINE)
        centre = pet_world[tuple(np.array(PET_SHAPE) // 2)]
        near_edge = pet_world[PET_SHAPE[0] - 2, PET_SHAPE[1] // 2, PET_SHAPE[2] // 2]
        centres = {"L1": centre + [-10.0, 5.0, 3.0],
                   "L2": near_edge if p == n_patients - 1 else centre + [14.0, -12.0, -6.0]}
        pet = rng.gamma(4.0, 0.1, PET_SHAPE).astype(np.float32)
        ct = rng.normal(40, 5, CT_SHAPE)
        mask = np.zeros(PET_SHAPE, np.uint8)
        for label, (name, radius) in enumerate((("L1", 8.0), ("L2", 6.0)), start=1):
            distance = np.linalg.norm(pet_world - centres[name], axis=-1)
            pet += (12.0 + p) * np.exp(-0.5 * (distance / 4.0) ** 2).astype(np.float32)
            mask[distance <= radius] = label
            ct[np.linalg.norm(ct_world - centres[name], axis=-1) <= radius] += 500
        files = {"pet": pet, "ct": np.rint(ct).astype(np.int16), "mask": mask}
        for kind, data in files.items():
            aff = CT_AFFINE if kind == "ct" else pet_affine
            nib.save(nib.Nifti1Image(data, aff), root / f"images/{pid}_{kind}.nii.gz")
        images.append({"patient_id": pid, **{k: f"images/{pid}_{k}.nii.gz" for k in files}})
        patients.append({"patient_id": pid, "age": 70 + p, "bmi": 27.5, "ecog": p % 2,
                         "psa": 12.5 * (p + 1), "gleason": 8, "adt": 1, "arpi": p % 2,
                         "docetaxel": 0, "radiotherapy": 1, "lu_psma": 0,
                         "pfs_months": 10.0 + 5 * p, "event": 1 - p % 2})
        sites = {"L1": "bone", "L2": "lymph_node", "L3": ""}
        for name, label in (("L1", 1), ("L2", 2)):
            lesions.append({"patient_id": pid, "lesion_id": name, "mask_label": label,
                            "center_x_mm": None, "center_y_mm": None, "center_z_mm": None,
                            "site": sites[name]})
        given = centre + [2.0, 8.0, -5.0]
        lesions.append({"patient_id": pid, "lesion_id": "L3", "mask_label": None,
                        "center_x_mm": given[0], "center_y_mm": given[1], "center_z_mm": given[2],
                        "site": ""})
        centres["L3"] = given
        truth[pid] = {"centres": centres, "pet": pet, "mask": mask, "pet_affine": pet_affine}
    manifest = write_manifest(root, pd.DataFrame(patients), pd.DataFrame(images),
                              pd.DataFrame(lesions),
                              {"name": "tiny", "synthetic": True, "description": "crop test"})
    return {"manifest": manifest, "truth": truth, "lesions": pd.DataFrame(lesions)}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    return make_cohort(tmp_path_factory.mktemp("cohort"))


@pytest.fixture(scope="module")
def crops_dir(cohort, tmp_path_factory) -> Path:
    return crop_cohort(cohort["manifest"], tmp_path_factory.mktemp("out") / "crops",
                       size_mm=SIZE_MM, spacing_mm=SPACING_MM, workers=1, progress=False)


def test_crops_follow_the_contract(cohort, crops_dir):
    crop_set = load_crops(crops_dir)
    n = len(cohort["lesions"])

    assert crop_set.images.shape == (n, 2, N, N, N) and crop_set.images.dtype == np.float32
    assert crop_set.n_lesions == n
    assert list(crop_set.lesions.columns) == list(LESION_TABLE_COLUMNS)
    assert crop_set.lesions[["patient_id", "lesion_id"]].values.tolist() == \
        cohort["lesions"][["patient_id", "lesion_id"]].values.tolist(), "manifest row order"
    assert crop_set.lesions["site"].tolist()[:3] == ["bone", "lymph_node", ""]
    source = Path(cohort["manifest"]).parent / "patients.csv"
    assert (crops_dir / "patients.csv").read_bytes() == source.read_bytes()
    assert crop_set.patients["patient_id"].tolist() == ["P001", "P002", "P003"]

    meta = crop_set.meta
    assert meta["size_mm"] == SIZE_MM and meta["spacing_mm"] == SPACING_MM
    assert meta["shape"] == [n, 2, N, N, N]
    assert meta["orientation"] == CROP_ORIENTATION and meta["center_mode"] == "centroid"
    assert meta["manifest"] == str(Path(cohort["manifest"]).resolve())
    assert meta["data_checksum"] == data_checksum(cohort["manifest"])
    assert meta["synthetic"] is True
    assert meta["provenance"]["parameters"]["spacing_mm"] == SPACING_MM
    assert "numpy" in meta["provenance"]["versions"]
    # No leftovers beside the output (the temporary directory was renamed into place).
    assert sorted(p.name for p in crops_dir.parent.iterdir()) == ["crops"]


def test_lesion_measurements_and_centres(cohort, crops_dir):
    crop_set = load_crops(crops_dir)
    for row, lesion in crop_set.lesions.iterrows():
        truth = cohort["truth"][lesion["patient_id"]]
        centre = lesion[["center_x_mm", "center_y_mm", "center_z_mm"]].to_numpy(float)
        expected = truth["centres"][lesion["lesion_id"]]
        if lesion["lesion_id"] == "L3":
            assert np.allclose(centre, expected, atol=1e-3), "given centre used as is"
            assert math.isnan(lesion["volume_ml"]) and math.isnan(lesion["suvmax"])
            continue
        label = int(lesion["lesion_id"][1])
        in_label = truth["mask"] == label
        voxel_ml = abs(np.linalg.det(truth["pet_affine"][:3, :3])) / 1000
        assert lesion["volume_ml"] == pytest.approx(in_label.sum() * voxel_ml, abs=1e-4)
        assert lesion["suvmax"] == pytest.approx(float(truth["pet"][in_label].max()), abs=1e-4)
        # Centroid of a voxelised ball (possibly clipped by the field of view): near the truth.
        assert np.linalg.norm(centre - expected) < 2.5
        # The lesion is bright at the crop centre in both channels.
        pet_crop, ct_crop = crop_set.images[row]
        assert pet_crop[N // 2, N // 2, N // 2] > 0.6 * lesion["suvmax"]
        assert ct_crop[N // 2, N // 2, N // 2] > 300


def test_edge_flag_and_padding(cohort, crops_dir):
    crop_set = load_crops(crops_dir)
    edge = crop_set.lesions.set_index(["patient_id", "lesion_id"])["edge"]
    assert edge[("P003", "L2")] == 1, "lesion 1 voxel from the PET edge"
    assert edge.drop(("P003", "L2")).eq(0).all()
    row = int(np.flatnonzero((crop_set.lesions["patient_id"] == "P003")
                             & (crop_set.lesions["lesion_id"] == "L2"))[0])
    assert (crop_set.images[row, 0] == 0).any(), "PET padded with 0 SUV"
    # The CT extends beyond the PET there, so it is sampled, not padded.
    assert not (crop_set.images[row, 1] == CT_PAD_HU).any()


@pytest.mark.parametrize("center", ["suvmax", "given"])
def test_center_modes(cohort, center, tmp_path):
    out = crop_cohort(cohort["manifest"], tmp_path / "crops", size_mm=SIZE_MM,
                      spacing_mm=SPACING_MM, center=center, workers=1, progress=False)
    lesions = load_crops(out).lesions
    assert load_crops(out).meta["center_mode"] == center
    for _, lesion in lesions.iterrows():
        truth = cohort["truth"][lesion["patient_id"]]
        centre = lesion[["center_x_mm", "center_y_mm", "center_z_mm"]].to_numpy(float)
        if center == "suvmax" and lesion["lesion_id"] != "L3":
            label = int(lesion["lesion_id"][1])
            hottest = np.unravel_index(np.argmax(np.where(truth["mask"] == label, truth["pet"], -1)),
                                       PET_SHAPE)
            assert np.allclose(centre, voxel_to_world(truth["pet_affine"], hottest), atol=1e-3)
            voxel = world_to_voxel(truth["pet_affine"], centre)
            assert np.allclose(voxel, np.rint(voxel), atol=1e-3), "a PET voxel centre"
        elif lesion["lesion_id"] == "L3":
            assert np.allclose(centre, truth["centres"]["L3"], atol=1e-3)


def test_output_does_not_depend_on_the_number_of_workers(cohort, crops_dir, tmp_path):
    parallel = crop_cohort(cohort["manifest"], tmp_path / "crops2", size_mm=SIZE_MM,
                           spacing_mm=SPACING_MM, workers=2, progress=False)
    assert (parallel / "crops.npy").read_bytes() == (crops_dir / "crops.npy").read_bytes()
    assert (parallel / "lesions.csv").read_bytes() == (crops_dir / "lesions.csv").read_bytes()


def test_rows_follow_the_manifest_even_when_patients_interleave(cohort, crops_dir, tmp_path):
    root = tmp_path / "cohort"
    info = make_cohort(root)
    order = np.random.default_rng(3).permutation(len(info["lesions"]))
    shuffled = info["lesions"].iloc[order].reset_index(drop=True)
    manifest = _rewrite_lesions(root, shuffled)
    out = crop_cohort(manifest, tmp_path / "crops", size_mm=SIZE_MM, spacing_mm=SPACING_MM,
                      workers=1, progress=False)
    reference, result = load_crops(crops_dir), load_crops(out)
    keys = list(zip(result.lesions["patient_id"], result.lesions["lesion_id"], strict=True))
    assert keys == list(zip(shuffled["patient_id"], shuffled["lesion_id"], strict=True))
    index = {key: i for i, key in enumerate(zip(reference.lesions["patient_id"],
                                                 reference.lesions["lesion_id"], strict=True))}
    assert np.array_equal(result.images, reference.images[[index[key] for key in keys]])


def test_corrupt_file_in_second_patient_leaves_no_output(tmp_path):
    info = make_cohort(tmp_path / "cohort")
    pet_file = tmp_path / "cohort/images/P002_pet.nii.gz"
    pet_file.write_bytes(pet_file.read_bytes()[:500])  # truncated download
    images = pd.read_csv(tmp_path / "cohort/images.csv", dtype=str)[["patient_id", "pet", "ct", "mask"]]
    patients = pd.read_csv(tmp_path / "cohort/patients.csv", dtype={"patient_id": str})
    manifest = write_manifest(tmp_path / "cohort", patients, images, info["lesions"],
                              {"name": "tiny", "synthetic": True, "description": "corrupt"})
    out = tmp_path / "out" / "crops"
    for workers in (1, 2):
        with pytest.raises(InputError) as caught:
            crop_cohort(manifest, out, size_mm=SIZE_MM, spacing_mm=SPACING_MM,
                        workers=workers, progress=False)
        assert caught.value.patient == "P002" and caught.value.file == "images/P002_pet.nii.gz"
        assert "patient P002: file images/P002_pet.nii.gz: cannot read NIfTI" in str(caught.value)
        assert not out.exists() and list(out.parent.iterdir()) == []
    # An existing crops directory survives a failed rerun untouched.
    out.mkdir()
    (out / "keep.txt").write_text("previous result")
    with pytest.raises(InputError):
        crop_cohort(manifest, out, size_mm=SIZE_MM, spacing_mm=SPACING_MM, workers=1, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["crops"]


def test_pet_and_ct_that_do_not_overlap(tmp_path):
    info = make_cohort(tmp_path / "cohort", n_patients=2)
    ct_file = tmp_path / "cohort/images/P002_ct.nii.gz"
    ct = nib.load(ct_file)
    shifted = ct.affine.copy()
    shifted[2, 3] += 400.0  # the CT of another body region (or a broken origin)
    nib.save(nib.Nifti1Image(np.asarray(ct.dataobj), shifted), ct_file)
    manifest = _rewrite_lesions(tmp_path / "cohort", info["lesions"])
    with pytest.raises(InputError, match="patient P002: file images/P002_ct.nii.gz: PET and CT do "
                                         "not overlap"):
        crop_cohort(manifest, tmp_path / "crops", size_mm=SIZE_MM, spacing_mm=SPACING_MM,
                    workers=1, progress=False)
    assert not (tmp_path / "crops").exists()


def _rewrite_lesions(root: Path, lesions: pd.DataFrame) -> Path:
    images = pd.read_csv(root / "images.csv", dtype=str)[["patient_id", "pet", "ct", "mask"]]
    patients = pd.read_csv(root / "patients.csv", dtype={"patient_id": str})
    return write_manifest(root, patients, images, lesions,
                          {"name": "tiny", "synthetic": False, "description": "edited"})


def test_lesion_outside_the_field_of_view(tmp_path):
    info = make_cohort(tmp_path / "cohort", n_patients=2)
    lesions = info["lesions"].copy()
    far = (lesions["patient_id"] == "P002") & (lesions["lesion_id"] == "L3")
    lesions.loc[far, "center_x_mm"] = 500.0
    manifest = _rewrite_lesions(tmp_path / "cohort", lesions)
    with pytest.raises(InputError, match=r"patient P002: file images/P002_pet.nii.gz: lesion 'L3': "
                                         r"centre .* outside the PET field of view"):
        crop_cohort(manifest, tmp_path / "crops", size_mm=SIZE_MM, spacing_mm=SPACING_MM,
                    workers=1, progress=False)
    assert not (tmp_path / "crops").exists()


def test_mask_label_missing_from_the_mask(tmp_path):
    info = make_cohort(tmp_path / "cohort", n_patients=1)
    lesions = info["lesions"].copy()
    lesions.loc[lesions["lesion_id"] == "L2", "mask_label"] = 7
    manifest = _rewrite_lesions(tmp_path / "cohort", lesions)
    with pytest.raises(InputError, match="patient P001: file images/P001_mask.nii.gz: lesion 'L2': "
                                         "mask_label 7 does not occur"):
        crop_cohort(manifest, tmp_path / "crops", size_mm=SIZE_MM, spacing_mm=SPACING_MM,
                    workers=1, progress=False)
    assert not (tmp_path / "crops").exists()


def test_bad_parameters(cohort, tmp_path):
    for kwargs in ({"center": "middle"}, {"workers": 0}, {"spacing_mm": 0.0}):
        with pytest.raises(InputError):
            crop_cohort(cohort["manifest"], tmp_path / "crops", progress=False, **kwargs)
    assert not (tmp_path / "crops").exists()


def _copy(crops_dir: Path, target: Path) -> Path:
    target.mkdir()
    for item in crops_dir.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    return target


def test_load_crops_errors(crops_dir, tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_crops(tmp_path / "nothing")

    missing = _copy(crops_dir, tmp_path / "missing")
    (missing / "crops.json").unlink()
    with pytest.raises(InputError, match="crops.json: crops directory is incomplete"):
        load_crops(missing)

    short = _copy(crops_dir, tmp_path / "short")
    lesions = pd.read_csv(short / "lesions.csv")
    lesions.iloc[:-1].to_csv(short / "lesions.csv", index=False)
    with pytest.raises(InputError, match="rows in lesions.csv but"):
        load_crops(short)

    meta_shape = _copy(crops_dir, tmp_path / "meta")
    meta = json.loads((meta_shape / "crops.json").read_text())
    meta["shape"][2] = 16
    (meta_shape / "crops.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="disagrees with crops.json"):
        load_crops(meta_shape)

    corrupt = _copy(crops_dir, tmp_path / "corrupt")
    (corrupt / "crops.npy").write_bytes(b"not an npy file")
    with pytest.raises(InputError, match="crops.npy: cannot read crop array"):
        load_crops(corrupt)

    pickled = _copy(crops_dir, tmp_path / "pickled")
    np.save(pickled / "crops.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="cannot read crop array"):
        load_crops(pickled)


def test_cli(cohort, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    out = tmp_path / "cli_crops"
    args = parser.parse_args(["crop", str(cohort["manifest"]), "--out", str(out), "--size-mm", "24",
                              "--spacing-mm", "3", "--workers", "1", "--center", "suvmax",
                              "--no-progress"])
    assert args.func(args) == 0
    assert f"wrote {len(cohort['lesions'])} crops" in capsys.readouterr().out
    assert load_crops(out).meta["center_mode"] == "suvmax"
    bad = parser.parse_args(["crop", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "x")])
    with pytest.raises(InputError, match="not found"):
        bad.func(bad)


# ---------------------------------------------------------------------------------------------
# psma_lib.images.load_image: the image side of bad input
# ---------------------------------------------------------------------------------------------


def _nifti(path: Path, data: np.ndarray, srow_x=None) -> Path:
    """Write ``data`` with a flipped anisotropic affine (or a raw first sform row)."""
    image = nib.Nifti1Image(data, np.diag([-2.0, 3.0, 4.0, 1.0]))
    if srow_x is not None:
        header = image.header
        header["srow_x"] = srow_x
        header.set_qform(None, code=0)
        header["sform_code"] = 1
        image = nib.Nifti1Image(data, None, header)
    nib.save(image, path)
    return path


def test_load_image_reads_data_and_affine(tmp_path):
    pet = np.random.default_rng(0).gamma(2.0, 1.0, (5, 6, 7)).astype(np.float32)
    pet[0, 0, 0] = -0.01  # reconstruction noise around zero: clipped, not refused
    data, aff = load_image(_nifti(tmp_path / "pet.nii.gz", pet), patient="P1")
    assert data.dtype == np.float32 and data.shape == (5, 6, 7)
    assert data[0, 0, 0] == 0.0 and np.array_equal(data[1:], pet[1:])
    assert np.allclose(aff, np.diag([-2.0, 3.0, 4.0, 1.0]))
    squeezed, _ = load_image(_nifti(tmp_path / "4d.nii.gz", pet[..., None]), kind="pet")
    assert squeezed.shape == (5, 6, 7)
    ct, _ = load_image(_nifti(tmp_path / "ct.nii.gz", np.full((3, 3, 3), -1024, np.int16)), kind="ct")
    assert ct.dtype == np.float32 and ct.min() == -1024.0
    mask, _ = load_image(_nifti(tmp_path / "m.nii.gz", np.eye(3, dtype=np.float32)[None] * 2),
                         kind="mask")
    assert mask.dtype == np.int32 and sorted(np.unique(mask)) == [0, 2]
    low, high = image_bounds_mm((5, 6, 7), aff)
    assert np.allclose(low, [-9.0, -1.5, -2.0]) and np.allclose(high, [1.0, 16.5, 26.0])


BAD_IMAGES = {
    "missing": (None, "pet", "PET file not found"),
    "truncated": ("truncate", "pet", "cannot read NIfTI image"),
    "not gzip": ("garbage", "pet", "cannot read NIfTI image"),
    "2-D": (np.ones((4, 5), np.float32), "pet", r"expected a 3-D volume, got shape \(4, 5\)"),
    "NaN": ("nan", "pet", "PET contains 1 NaN or infinite voxel"),
    "inf CT": ("inf", "ct", "CT contains 1 NaN or infinite voxel"),
    "negative SUV": ("negative", "pet", r"PET has 1 voxel\(s\) below -0.05 SUV"),
    "fractional mask": ("fraction", "mask", "mask has non-integer labels"),
    "negative mask": ("negative", "mask", "mask has negative label -1"),
    "NaN affine": ("nan-affine", "pet", "affine contains NaN"),
    "singular affine": ("zero-affine", "pet", "affine is singular"),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_load_image_refuses_bad_files(case, tmp_path):
    how, kind, message = BAD_IMAGES[case]
    path = tmp_path / "img.nii.gz"
    volume = np.ones((4, 5, 6), np.float32)
    if isinstance(how, np.ndarray):
        _nifti(path, how)
    elif how in ("nan", "inf", "negative", "fraction"):
        volume[1, 2, 3] = {"nan": np.nan, "inf": np.inf, "negative": -1.0, "fraction": 0.5}[how]
        _nifti(path, volume)
    elif how in ("truncate", "garbage"):
        _nifti(path, volume)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if how == "truncate" else b"not a NIfTI")
    elif how in ("nan-affine", "zero-affine"):
        _nifti(path, volume, srow_x=[np.nan if how == "nan-affine" else 0.0, 0, 0, 0])
    with pytest.raises(InputError, match=f"^patient P9: file images/img.nii.gz: {message}") as caught:
        load_image(path, patient="P9", kind=kind, label="images/img.nii.gz")
    assert caught.value.patient == "P9" and caught.value.file == "images/img.nii.gz"
