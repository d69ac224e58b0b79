"""Shared fixtures: a tiny crops directory in the contract's format, written directly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest


def write_tiny_crops(root: Path, *, n_patients: int = 24, size: int = 16, seed: int = 0) -> Path:
    """A crops directory (crops.npy, lesions.csv, patients.csv, crops.json) with random data.

    1-3 lesions per patient; PET ~ SUV 0-20 with a hot centre, CT ~ -100..1000 HU; clinical
    columns with a few missing values; outcome with ~60 % events.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    pids = [f"P{i:03d}" for i in range(n_patients)]
    patients = pd.DataFrame({
        "patient_id": pids,
        "age": rng.normal(70, 8, n_patients).round(), "bmi": rng.normal(27, 4, n_patients).round(1),
        "ecog": rng.integers(0, 3, n_patients), "psa": np.exp(rng.normal(2, 1.5, n_patients)).round(2),
        "gleason": rng.integers(6, 11, n_patients),
        **{c: rng.integers(0, 2, n_patients) for c in ("adt", "arpi", "docetaxel", "radiotherapy", "lu_psma")},
        "pfs_months": rng.exponential(20, n_patients).round(2) + 0.5,
        "event": (rng.random(n_patients) < 0.6).astype(int),
    })
    patients.loc[rng.choice(n_patients, 3, replace=False), "bmi"] = np.nan
    rows = []
    measured = np.random.default_rng(seed + 1)  # own stream: the crops stay what they were
    for pid in pids:
        for j in range(int(rng.integers(1, 4))):
            suvmax = float(np.exp(measured.normal(2.8, 0.6)))
            rows.append({"patient_id": pid, "lesion_id": f"{pid}_L{j}",
                         "site": ("bone", "lymph_node")[int(measured.integers(0, 2))],
                         "center_x_mm": 0.0, "center_y_mm": 0.0, "center_z_mm": 0.0,
                         "volume_ml": round(float(np.exp(measured.normal(0.5, 0.8))), 4),
                         "suvmax": round(suvmax, 4), "suvmean": round(suvmax * 0.55, 4), "edge": 0})
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


@pytest.fixture(scope="session")
def tiny_crops(tmp_path_factory) -> Path:
    """24 patients, 16^3 crops (read-only: tests copy it if they modify it)."""
    return write_tiny_crops(tmp_path_factory.mktemp("tiny") / "crops")
