"""``crop_cohort`` / ``load_crops`` on a tiny cohort written as real NIfTI files by the test.

Three patients with different geometry: PET axis-aligned, flipped (LPS-like) and oblique; the CT
always on its own, finer and flipped grid; the mask on the PET grid. Crops are 24 mm at 3 mm
(8^3 voxels) to stay fast.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from psma_lib import report
from psma_lib.cli import main as cli_main
from psma_lib.crop import (
    CROP_CHANNELS,
    CT_PAD_HU,
    LESION_TABLE_COLUMNS,
    PLANE_VIEWS,
    crop_cohort,
    crop_shard,
    load_crops,
    merge_shards,
    register_cli,
    shard_name,
)
from psma_lib.errors import InputError
from psma_lib.geometry import CROP_ORIENTATION, voxel_to_world, world_to_voxel
from psma_lib.images import image_bounds_mm, load_image
from psma_lib.manifest import data_checksum, write_manifest
from psma_lib.shards import ShardedArray

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

    assert crop_set.images.shape == (n, 3, N, N, N) and crop_set.images.dtype == np.float32
    assert crop_set.has_mask_channel
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
    assert meta["shape"] == [n, 3, N, N, N] and meta["version"] == 3
    assert meta["channels"] == list(CROP_CHANNELS)
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
            assert not crop_set.images[row][2].any(), "no label, no mask"
            continue
        label = int(lesion["lesion_id"][1])
        in_label = truth["mask"] == label
        voxel_ml = abs(np.linalg.det(truth["pet_affine"][:3, :3])) / 1000
        assert lesion["volume_ml"] == pytest.approx(in_label.sum() * voxel_ml, abs=1e-4)
        assert lesion["suvmax"] == pytest.approx(float(truth["pet"][in_label].max()), abs=1e-4)
        # Centroid of a voxelised ball (possibly clipped by the field of view): near the truth.
        assert np.linalg.norm(centre - expected) < 2.5
        # The lesion is bright at the crop centre in both channels.
        pet_crop, ct_crop, lesion_mask = crop_set.images[row]
        assert pet_crop[N // 2, N // 2, N // 2] > 0.6 * lesion["suvmax"]
        assert ct_crop[N // 2, N // 2, N // 2] > 300
        # Its own label fills the mask channel at the centre, about as many mL as it measures.
        assert lesion_mask[N // 2, N // 2, N // 2] == 1 and set(np.unique(lesion_mask)) == {0, 1}
        assert lesion_mask.sum() * SPACING_MM**3 / 1000 == pytest.approx(lesion["volume_ml"], rel=0.35)


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
    shard = Path("shards") / shard_name(0, 1)
    names = sorted(p.name for p in (crops_dir / shard).iterdir())
    assert names == sorted(p.name for p in (parallel / shard).iterdir())
    for name in [n for n in names if n != "shard.json"]:  # shard.json: provenance differs
        assert (parallel / shard / name).read_bytes() == (crops_dir / shard / name).read_bytes()
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
    return Path(shutil.copytree(crops_dir, target))


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

    array = Path("shards") / shard_name(0, 1) / "crops-00000.npy"
    corrupt = _copy(crops_dir, tmp_path / "corrupt")
    (corrupt / array).write_bytes(b"not an npy file")
    with pytest.raises(InputError, match="crops-00000.npy: cannot read .npy header"):
        load_crops(corrupt)

    truncated = _copy(crops_dir, tmp_path / "truncated")
    (truncated / array).write_bytes((crops_dir / array).read_bytes()[:-4])
    with pytest.raises(InputError, match="crops-00000.npy: file holds .* truncated"):
        load_crops(truncated)

    pickled = _copy(crops_dir, tmp_path / "pickled")
    np.save(pickled / array, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="expected a plain C-ordered numeric array"):
        load_crops(pickled)

    newer = _copy(crops_dir, tmp_path / "newer")
    meta = json.loads((newer / "crops.json").read_text())
    (newer / "crops.json").write_text(json.dumps({**meta, "version": 4}))
    with pytest.raises(InputError, match="format version 4"):
        load_crops(newer)


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
# Sharded cropping (psma-pfs crop --shard i/N, --merge), planes, float16, version 1 directories
# ---------------------------------------------------------------------------------------------

CROP_KW = dict(size_mm=SIZE_MM, spacing_mm=SPACING_MM, workers=1, progress=False)


def _crop_shards(manifest, out: Path, n_shards: int, shards=None, **kwargs) -> Path:
    for shard in range(n_shards) if shards is None else shards:
        crop_shard(manifest, out, shard, n_shards, **{**CROP_KW, **kwargs})
    return out


def _assert_same_crops(result: Path, reference: Path) -> None:
    """Every lesion's crop and planes, the lesion table (apart from shard/row) and the data
    identity are those of the reference crops directory."""
    got, want = load_crops(result), load_crops(reference)
    assert isinstance(got.images, ShardedArray) and got.images.shape == want.images.shape
    for row in range(want.n_lesions):
        assert np.array_equal(got.images[row], want.images[row]), f"lesion row {row}"
    for view in PLANE_VIEWS:
        assert np.array_equal(got.planes(view), want.planes(view)), view
    pd.testing.assert_frame_equal(got.lesions, want.lesions)
    on_disk = [pd.read_csv(d / "lesions.csv", dtype=str) for d in (result, reference)]
    pd.testing.assert_frame_equal(*(t.drop(columns=["shard", "row"]) for t in on_disk))
    assert (result / "patients.csv").read_bytes() == (reference / "patients.csv").read_bytes()
    for key in ("data_checksum", "shape", "size_mm", "spacing_mm", "center_mode", "dtype",
                "n_lesions", "n_patients", "n_edge", "manifest"):
        assert got.meta[key] == want.meta[key], key


@pytest.mark.parametrize("n_shards", [2, 3])
def test_sharded_crop_and_merge_equal_one_crop(cohort, crops_dir, tmp_path, n_shards):
    out = _crop_shards(cohort["manifest"], tmp_path / "crops", n_shards)
    assert sorted(p.name for p in (out / "shards").iterdir()) == \
        [shard_name(i, n_shards) for i in range(n_shards)]
    assert not (out / "crops.json").exists(), "shards alone are not a crops directory"
    merge_shards(cohort["manifest"], out)

    _assert_same_crops(out, crops_dir)
    meta = load_crops(out).meta
    assert meta["n_shards"] == n_shards
    # 3 patients: contiguous groups of [2, 1] or [1, 1, 1] patients, a patient never split.
    sizes = [2, 1] if n_shards == 2 else [1, 1, 1]
    assert [s["n_patients"] for s in meta["shards"]] == sizes
    table = pd.read_csv(out / "lesions.csv", dtype={"patient_id": str})
    assert table.groupby("patient_id")["shard"].nunique().eq(1).all()
    assert table.drop_duplicates("patient_id")["shard"].tolist() == \
        [i for i, n in enumerate(sizes) for _ in range(n)]
    assert all(g["row"].tolist() == list(range(len(g))) for _, g in table.groupby("shard"))
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [], "no temporary left"


def test_shards_of_an_interleaved_manifest(cohort, crops_dir, tmp_path):
    root = Path(shutil.copytree(Path(cohort["manifest"]).parent, tmp_path / "cohort"))
    order = np.random.default_rng(3).permutation(len(cohort["lesions"]))
    manifest = _rewrite_lesions(root, cohort["lesions"].iloc[order].reset_index(drop=True))
    out = merge_shards(manifest, _crop_shards(manifest, tmp_path / "sharded", 2))
    _assert_same_crops(out, crop_cohort(manifest, tmp_path / "one", **CROP_KW))
    reference, result = load_crops(crops_dir), load_crops(out)
    assert np.array_equal(result.images, np.asarray(reference.images)[order])


def test_cli_shard_and_merge(cohort, crops_dir, tmp_path, capsys):
    out = tmp_path / "crops"
    common = [str(cohort["manifest"]), "--out", str(out), "--size-mm", "24", "--spacing-mm", "3",
              "--workers", "1", "--no-progress"]
    for shard in ("1/2", "0/2"):
        assert cli_main(["crop", *common, "--shard", shard]) == 0
    assert "wrote shard 0 of 2 (6 crops of 2 patient(s))" in capsys.readouterr().out
    # Merge takes the shards' settings; given ones are checked against them.
    assert cli_main(["crop", str(cohort["manifest"]), "--out", str(out), "--merge",
                     "--size-mm", "48"]) == 2
    assert "shard 0 was cropped with size_mm 24.0, not 48.0 (requested)" in capsys.readouterr().err
    assert not (out / "crops.json").exists()
    assert cli_main(["crop", str(cohort["manifest"]), "--out", str(out), "--merge"]) == 0
    assert "merged 2 shard(s): 9 crops" in capsys.readouterr().out
    _assert_same_crops(out, crops_dir)


BAD_SHARDS = {"3/2": "must be below the number of shards 2", "2/2": "numbered 0 to 1",
              "0/0": "must be at least 1", "a/b": "expected i/N", "1": "expected i/N",
              "-1/2": "expected i/N"}


@pytest.mark.parametrize("shard", list(BAD_SHARDS))
def test_cli_refuses_a_bad_shard(cohort, tmp_path, capsys, shard):
    out = tmp_path / "crops"
    assert cli_main(["crop", str(cohort["manifest"]), "--out", str(out), f"--shard={shard}",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"psma-pfs crop: error: --shard {shard}: ")
    assert BAD_SHARDS[shard] in err[0]
    assert not out.exists()


@pytest.fixture(scope="module")
def two_shards(cohort, tmp_path_factory) -> Path:
    """Shards 0/2 and 1/2 of the cohort, not merged (tests copy it)."""
    return _crop_shards(cohort["manifest"], tmp_path_factory.mktemp("two") / "crops", 2)


def _other_manifest(cohort, root: Path) -> Path:
    """The same cohort with one lesion's site changed: another data checksum."""
    root = Path(shutil.copytree(Path(cohort["manifest"]).parent, root))
    return _rewrite_lesions(root, cohort["lesions"].assign(site="bone"))


def test_merge_refuses_bad_shards_and_leaves_nothing(cohort, two_shards, tmp_path):
    manifest = cohort["manifest"]
    shard1 = Path("shards") / shard_name(1, 2)

    def case(name, edit, message, **requested):
        out = Path(shutil.copytree(two_shards, tmp_path / name))
        edit(out)
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        with pytest.raises(InputError, match=message):
            merge_shards(manifest, out, **requested)
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before, "nothing written"

    case("missing", lambda out: shutil.rmtree(out / shard1),
         rf"{shard1}: shard 1 of 2 is missing \(1 missing: 1\); crop it with .* --shard 1/2")
    case("split", lambda out: _crop_shards(manifest, out, 3, shards=[2]),
         r"shards: shards of different splits \(of 2, of 3\)")
    case("manifest", lambda out: _crop_shards(_other_manifest(cohort, tmp_path / "other"), out, 2,
                                              shards=[1]),
         rf"{shard1}/shard.json: shard 1 was cropped from another cohort")
    case("centre", lambda out: _crop_shards(manifest, out, 2, shards=[1], center="suvmax"),
         "shard 1 was cropped with center_mode suvmax, not centroid \\(shard 0's\\)")
    case("dtype", lambda out: None, "shard 0 was cropped with dtype float32, not float16 "
         r"\(requested\)", dtype="float16")

    def overlap(out):
        shutil.rmtree(out / shard1)
        shutil.copytree(out / "shards" / shard_name(0, 2), out / shard1)
        meta = json.loads((out / shard1 / "shard.json").read_text())
        (out / shard1 / "shard.json").write_text(json.dumps({**meta, "shard": 1}))
    case("overlap", overlap, "shard 1 overlaps shard 0: lesion 'L1' of patient P001 is in both")

    def truncate(out):
        array = out / shard1 / "planes-sagittal-00001.npy"
        array.write_bytes(array.read_bytes()[:-2])
    case("truncated", truncate, "planes-sagittal-00001.npy: file holds .* truncated")

    def half(out):
        array = out / shard1 / "crops-00001.npy"
        np.save(array, np.load(array).astype(np.float16))
    case("array dtype", half, r"crops-00001.npy: array is float16 \[3, 3, 8, 8, 8\], expected "
         r"float32 \[3, 3, 8, 8, 8\]")

    # A failed merge leaves an earlier merge as it was (and that one then refuses to load).
    out = merge_shards(manifest, Path(shutil.copytree(two_shards, tmp_path / "merged")))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    _crop_shards(manifest, out, 2, shards=[1], center="suvmax")
    with pytest.raises(InputError, match="center_mode"):
        merge_shards(manifest, out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    with pytest.raises(InputError, match="shard missing or cropped again since the merge"):
        load_crops(out)


def test_an_interrupted_merge_leaves_no_directory_that_loads(cohort, two_shards, tmp_path,
                                                             monkeypatch):
    out = merge_shards(cohort["manifest"], Path(shutil.copytree(two_shards, tmp_path / "crops")))
    real_replace = os.replace

    def crash_on_the_lesions_table(source, target):
        if Path(target).name == "lesions.csv":
            raise OSError("disk full")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", crash_on_the_lesions_table)
    with pytest.raises(OSError, match="disk full"):
        merge_shards(cohort["manifest"], out)
    monkeypatch.undo()
    with pytest.raises(InputError, match="crops.json: crops directory is incomplete"):
        load_crops(out)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    merge_shards(cohort["manifest"], out)  # merging again repairs it
    assert load_crops(out).n_lesions == 9


def test_more_shards_than_patients(cohort, tmp_path):
    with pytest.raises(InputError, match="cannot split 3 patients with lesions into 4 shards"):
        crop_shard(cohort["manifest"], tmp_path / "crops", 3, 4, **CROP_KW)
    assert not (tmp_path / "crops").exists()


def test_a_shard_checks_only_its_own_patients_images(cohort, tmp_path):
    root = Path(shutil.copytree(Path(cohort["manifest"]).parent, tmp_path / "cohort"))
    changed = root / "images/P003_mask.nii.gz"
    changed.write_bytes(changed.read_bytes() + b"\0")  # edited after the manifest was written
    crop_shard(root, tmp_path / "crops", 0, 3, **CROP_KW)
    with pytest.raises(InputError, match="patient P003: file images/P003_mask.nii.gz: SHA-256 "
                                         "mismatch"):
        crop_shard(root, tmp_path / "crops", 2, 3, **CROP_KW)
    assert [p.name for p in (tmp_path / "crops/shards").iterdir()] == [shard_name(0, 3)]


def test_planes_are_written_and_equal_the_volumes_centre(crops_dir):
    crop_set = load_crops(crops_dir)
    assert set(crop_set.plane_arrays) == set(PLANE_VIEWS)
    volumes = np.asarray(crop_set.images)
    assert volumes.dtype == np.float32 and volumes.shape == crop_set.images.shape
    centre = N // 2
    expected = {"axial": volumes[:, :, centre], "coronal": volumes[:, :, :, centre],
                "sagittal": volumes[:, :, :, :, centre]}
    for view, plane in expected.items():
        assert crop_set.plane_arrays[view].shape == plane.shape
        assert np.array_equal(crop_set.planes(view), plane), view
        assert np.array_equal(crop_set.plane_arrays[view][[4, 0]], plane[[4, 0]])
    with pytest.raises(ValueError):
        crop_set.planes("oblique")


def test_sharded_images_index_like_an_array(crops_dir):
    images = load_crops(crops_dir).images
    volumes = np.asarray(images)
    mask = np.arange(len(images)) % 2 == 0
    for key in (3, -1, slice(2, 7), slice(None, None, -2), [5, 1, 5], np.array([0, 8]), mask,
                (2, 0), (slice(1, 4), 1, N // 2), (Ellipsis, 0)):
        got = images[key]
        assert got.dtype == np.float32 and np.array_equal(got, volumes[key]), key
    assert len(images) == images.shape[0] == 9 and images.ndim == 5
    assert sum(1 for _ in images) == 9
    with pytest.raises(IndexError):
        images[9]


def test_2d_inputs_read_no_volume(crops_dir, tmp_path):
    from psma_lib.cv import image_inputs, read_crops

    reference = load_crops(crops_dir)
    poisoned = _copy(crops_dir, tmp_path / "crops")
    array = poisoned / "shards" / shard_name(0, 1) / "crops-00000.npy"
    volumes = np.load(array, mmap_mode="r+")
    volumes[:] = np.nan  # every voxel of every volume, header and size intact
    volumes.flush()
    del volumes
    crops = read_crops(poisoned)
    axial = image_inputs(crops, crops.lesions, "resnet18", "axial")
    assert np.array_equal(axial.numpy(), reference.planes("axial")[:, :2]), "PET and CT by default"
    orthogonal = image_inputs(crops, crops.lesions, "resnet18", "orthogonal", "pet,ct,mask")
    assert np.array_equal(orthogonal.numpy()[:, 2], reference.planes("sagittal"))
    # The 3D path does read the volumes, so it sees the poison.
    with pytest.raises(InputError, match="non-finite values"):
        image_inputs(crops, crops.lesions, "r3d_18", "axial")
    intact = image_inputs(reference, reference.lesions, "r3d_18", "axial")
    assert np.array_equal(intact.numpy(), np.asarray(reference.images)[:, :2])


@pytest.fixture(scope="module")
def float16_dir(cohort, tmp_path_factory) -> Path:
    return crop_cohort(cohort["manifest"], tmp_path_factory.mktemp("f16") / "crops",
                       dtype="float16", **CROP_KW)


def test_float16_storage_and_its_recorded_error(cohort, crops_dir, float16_dir, tmp_path):
    exact, half = load_crops(crops_dir), load_crops(float16_dir)
    stored = np.load(float16_dir / "shards" / shard_name(0, 1) / "crops-00000.npy", mmap_mode="r")
    assert stored.dtype == np.float16 and half.images.dtype == np.float32
    assert half.images[0].dtype == np.float32 and half.planes("axial").dtype == np.float32
    got, want = np.asarray(half.images, np.float64), np.asarray(exact.images, np.float64)
    recorded = half.meta["storage_error"]
    for channel, name in enumerate(("pet_suv", "ct_hu")):
        diff = np.abs(got[:, channel] - want[:, channel])
        magnitude = np.abs(want[:, channel])
        normal = magnitude >= np.finfo(np.float16).smallest_normal
        assert recorded[name]["max_abs"] == pytest.approx(diff.max(), rel=1e-12, abs=0)
        assert recorded[name]["max_rel"] == pytest.approx((diff[normal] / magnitude[normal]).max(),
                                                          rel=1e-12)
        assert recorded[name]["max_value"] == pytest.approx(magnitude.max(), rel=1e-12)
        assert 0 < recorded[name]["max_rel"] <= 2.0 ** -11, "float16 rounds to 11 bits"
    assert exact.meta["storage_error"] is None
    shown = report.crop_info_table(half.meta, half.lesions).set_index("Property")["Value"]
    assert shown["storage error (measured)"].startswith(
        f"PET ≤ {recorded['pet_suv']['max_abs']:.2g} SUV, CT ≤ {recorded['ct_hu']['max_abs']:.2g} HU")
    assert np.array_equal(half.planes("coronal"), np.asarray(half.images)[:, :, :, N // 2])
    sizes = [(d / "shards" / shard_name(0, 1) / "crops-00000.npy").stat().st_size
             for d in (crops_dir, float16_dir)]
    assert sizes[1] < 0.51 * sizes[0]
    # Sharded: each shard measures its own crops; the merge keeps the worst.
    out = merge_shards(cohort["manifest"], _crop_shards(cohort["manifest"], tmp_path / "s", 2,
                                                        dtype="float16"))
    assert load_crops(out).meta["storage_error"] == recorded
    _assert_same_crops(out, float16_dir)


def test_version_1_directory_still_loads(crops_dir, tmp_path):
    from psma_lib.cv import image_inputs

    reference = load_crops(crops_dir)
    old = tmp_path / "old"
    old.mkdir()
    np.save(old / "crops.npy", np.asarray(reference.images)[:, :2])  # version 1: PET and CT
    pd.read_csv(crops_dir / "lesions.csv").drop(columns=["shard", "row"]).to_csv(
        old / "lesions.csv", index=False)
    shutil.copyfile(crops_dir / "patients.csv", old / "patients.csv")
    meta = {k: v for k, v in reference.meta.items()
            if k not in ("shards", "n_shards", "dtype", "planes", "storage_error")}
    meta["shape"] = [meta["shape"][0], 2, *meta["shape"][2:]]
    (old / "crops.json").write_text(json.dumps({**meta, "version": 1}))

    loaded = load_crops(old)
    assert isinstance(loaded.images, np.memmap) and loaded.plane_arrays is None
    assert np.array_equal(loaded.images, np.asarray(reference.images)[:, :2])
    pd.testing.assert_frame_equal(loaded.lesions, reference.lesions)
    for view in PLANE_VIEWS:
        assert np.array_equal(loaded.planes(view), reference.planes(view)[:, :2])
    # PET and CT are what such crops can give; the lesion mask is one clear error.
    assert not loaded.has_mask_channel
    assert image_inputs(loaded, loaded.lesions, "resnet18", "axial").shape[1] == 2
    with pytest.raises(InputError, match="lesion-mask channel .* crop again"):
        image_inputs(loaded, loaded.lesions, "resnet18", "axial", "pet,ct,mask")


def test_merge_and_load_read_no_array_data(cohort, tmp_path, monkeypatch):
    def forbidden(*_args, **_kwargs):
        raise AssertionError("array data read")

    def merge_and_load(size_mm, spacing_mm):
        out = _crop_shards(cohort["manifest"], tmp_path / f"crops{spacing_mm}", 2,
                           size_mm=size_mm, spacing_mm=spacing_mm)
        with monkeypatch.context() as patch:
            for name in ("load", "fromfile", "memmap"):
                patch.setattr(np, name, forbidden)
            patch.setattr(np.lib.format, "open_memmap", forbidden)
            patch.setattr(np.lib.format, "read_array", forbidden)
            tracemalloc.start()
            merge_shards(cohort["manifest"], out)
            crop_set = load_crops(out)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        array_bytes = sum(p.stat().st_size for p in (out / "shards").rglob("*.npy"))
        assert np.isfinite(crop_set.images[0]).all()  # the arrays are read when indexed
        return peak, array_bytes

    small_peak, small_bytes = merge_and_load(SIZE_MM, SPACING_MM)  # 8^3 voxels
    large_peak, large_bytes = merge_and_load(SIZE_MM, SPACING_MM / 4)  # 32^3 voxels
    assert large_bytes - small_bytes > 2_000_000
    # Same lesion table, 64x the voxels: the peak memory of merge + load does not follow.
    assert large_peak - small_peak < 0.05 * (large_bytes - small_bytes), (small_peak, large_peak)


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
