"""Tiny inputs in the pipeline's formats, for the tests and the docstring examples.

>>> import tempfile
>>> from psma_lib.crop import load_crops
>>> load_crops(write_tiny_crops(Path(tempfile.mkdtemp()), n_patients=6, size=4)).images.shape[1:]
(2, 4, 4, 4)
"""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from .vocabulary import TREATMENT_COLUMNS


@functools.cache
def tiny_cohort() -> Path:
    """The manifest of a two-patient synthetic cohort on coarse grids (about a second to make),
    generated once per process into a temporary folder; treat it as read-only."""
    from .synthetic import ImagingSpec, Spec, generate_cohort

    spec = Spec(imaging=ImagingSpec(phantom_spacing_mm=[4.0, 4.0, 3.0], ct_inplane_mm=[3.0, 3.0]))
    return generate_cohort(Path(tempfile.mkdtemp(prefix="psma-tiny-")) / "cohort", n_patients=2,
                           seed=0, spec=spec, workers=1, progress=False)


def write_tiny_nnunet(root: Path) -> tuple[Path, Path]:
    """An nnU-Net folder with two 16³ cases of one cubic lesion each, and its clinical CSV."""
    import nibabel as nib

    root = Path(root)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for i, case in enumerate(("case1", "case2")):
        mask = np.zeros((16, 16, 16), np.uint8)
        mask[4 + i:8 + i, 5:9, 6:10] = 1
        pet = (0.5 + 9.5 * mask).astype(np.float32)
        nib.save(nib.Nifti1Image(np.full(mask.shape, 40, np.int16), affine), root / f"imagesTr/{case}_0000.nii.gz")
        nib.save(nib.Nifti1Image(pet, affine), root / f"imagesTr/{case}_0001.nii.gz")
        nib.save(nib.Nifti1Image(mask, affine), root / f"labelsTr/{case}.nii.gz")
    clinical = tiny_patients().iloc[:2].assign(patient_id=["case1", "case2"])
    clinical.to_csv(root / "clinical.csv", index=False)
    return root, root / "clinical.csv"


def write_tiny_crops(root: Path, *, n_patients: int = 24, size: int = 16, seed: int = 0) -> Path:
    """A crops directory with random data, in format version 1 (one ``crops.npy`` beside
    lesions.csv, patients.csv, crops.json), which :func:`psma_lib.crop.load_crops` still reads.

    1-3 lesions per patient; PET ~ SUV 0-20 with a hot centre, CT ~ -100..1000 HU; clinical
    columns with a few missing values; outcome with ~60 % events.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    pids = [f"P{i:03d}" for i in range(n_patients)]
    patients = pd.DataFrame({
        "patient_id": pids,
        "age": rng.normal(70, 8, n_patients).round(), "bmi": rng.normal(27, 4, n_patients).round(1),
        "ecog": rng.integers(0, 3, n_patients), "psa": np.exp(rng.normal(2, 1.5, n_patients)).round(2),
        "gleason": rng.integers(6, 11, n_patients),
        **{c: rng.integers(0, 2, n_patients) for c in TREATMENT_COLUMNS},
        "pfs_months": rng.exponential(20, n_patients).round(2) + 0.5,
        "event": (rng.random(n_patients) < 0.6).astype(int),
    })
    patients.loc[rng.choice(n_patients, 3, replace=False), "bmi"] = np.nan
    rows = []
    measured = np.random.default_rng(seed + 1)  # own stream: the crops stay what they were
    density = np.random.default_rng(seed + 2)  # and the measured quantities above stay too
    for pid in pids:
        for j in range(int(rng.integers(1, 4))):
            suvmax = float(np.exp(measured.normal(2.8, 0.6)))
            rows.append({"patient_id": pid, "lesion_id": f"{pid}_L{j}",
                         "site": ("bone", "lymph_node")[int(measured.integers(0, 2))],
                         "center_x_mm": 0.0, "center_y_mm": 0.0, "center_z_mm": 0.0,
                         "volume_ml": round(float(np.exp(measured.normal(0.5, 0.8))), 4),
                         "suvmax": round(suvmax, 4), "suvmean": round(suvmax * 0.55, 4),
                         "hu_mean": round(float(density.normal(300, 250)), 2), "edge": 0})
    lesions = pd.DataFrame(rows)
    n = len(lesions)
    crops = np.empty((n, 2, size, size, size), dtype=np.float32)
    crops[:, 0] = rng.gamma(2.0, 2.0, (n, size, size, size))
    crops[:, 1] = rng.normal(40, 100, (n, size, size, size))
    c = slice(size // 2 - 2, size // 2 + 2)
    crops[:, 0, c, c, c] += rng.uniform(5, 40, (n, 1, 1, 1))
    np.save(root / "crops.npy", crops)
    lesions.to_csv(root / "lesions.csv", index=False)
    patients.to_csv(root / "patients.csv", index=False)
    meta = {"size_mm": size * 2.0, "spacing_mm": 2.0, "shape": list(crops.shape),
            "orientation": "D,H,W along +z,+y,+x", "center_mode": "given", "manifest": "none",
            "data_checksum": f"tiny-{seed}-{n_patients}", "synthetic": True, "provenance": {}}
    (root / "crops.json").write_text(json.dumps(meta))
    return root


def tiny_patients() -> pd.DataFrame:
    """Six patients with every clinical column and the outcome, a few values missing."""
    return pd.DataFrame({
        "patient_id": ["P1", "P2", "P3", "P4", "P5", "P6"],
        "age": [60, 64, 68, 72, 76, np.nan],
        "bmi": [20.0, 22.0, 24.0, 26.0, 28.0, 30.0],
        "ecog": [0, 0, 1, 2, np.nan, 0],
        "psa": [1.0, 2.0, 3.0, 4.0, 5.0, 100.0],
        "gleason": [7, 8, 8, 9, 7, 8],
        "adt": [1, 1, 1, 1, 1, 0],
        "arpi": [1, 0, 0, 0, 0, 0],
        "docetaxel": [0, 0, 0, 0, 0, 0],
        "radiotherapy": [1, 1, 0, 0, 0, np.nan],
        "lu_psma": [0, 1, 0, 1, 0, 1],
        "pfs_months": [2.0, 4.0, 6.0, 8.0, 10.0, 12.0],
        "event": [1, 0, 1, 0, 1, 0],
    })
