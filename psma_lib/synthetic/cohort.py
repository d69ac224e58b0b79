"""A synthetic cohort directory: NIfTI images, tables, manifest and ``truth/`` (docs/ARCHITECTURE.md).

:func:`generate_cohort` draws the tables (:func:`~psma_lib.synthetic.outcome.sample_tables`),
renders every patient (:func:`~psma_lib.synthetic.scanner.render_patient`, in worker processes
if asked) and writes it all; :func:`load_truth` reads the ground truth back.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import yaml

from ..errors import InputError
from ..io import atomic_dir
from .outcome import STREAM_RENDER, CohortTables, sample_tables, stream_rng
from .scanner import render_patient
from .spec import ImagingSpec, Spec, build_spec, spec_to_dict


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, level: int) -> None:
    """gzip NIfTI with mtime 0, so the same array gives the same file bytes (and SHA-256)."""
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=level, mtime=0))


def _render_job(job: dict) -> dict:
    """Worker: render one patient into ``job['root']/images``; return its lesion centres."""
    spec = build_spec(ImagingSpec, job["imaging"], "imaging")
    out = render_patient(job["pid"], job["bmi"], job["lesions"],
                         stream_rng(job["seed"], STREAM_RENDER, job["index"]), spec)
    root, pid = Path(job["root"]), job["pid"]
    paths = {kind: f"images/{pid}_{kind}.nii.gz" for kind in ("pet", "ct", "mask")}
    for kind, path in paths.items():
        _write_nifti(root / path, out[kind], out[f"{kind}_affine" if kind != "mask" else "pet_affine"],
                     spec.nifti_compresslevel)
    return {"pid": pid, "paths": paths, "centres": out["centres"].tolist(), "hosts": out["hosts"],
            "suvmax_pet": out["suvmax_pet"]}


def _render_jobs(tables: CohortTables, seed: int, spec: Spec, root: Path) -> list[dict]:
    """One :func:`_render_job` argument per patient (plain data: they cross process boundaries)."""
    bmi_true = dict(zip(tables.truth["patient_id"], tables.truth["bmi_true"], strict=True))
    return [{"pid": pid, "index": i, "seed": seed, "bmi": float(bmi_true[pid]), "root": str(root),
             "imaging": dataclasses.asdict(spec.imaging),
             "lesions": tables.lesions[tables.lesions["patient_id"] == pid].to_dict("records")}
            for i, pid in enumerate(tables.patients["patient_id"])]


def _run_jobs(jobs: list[dict], workers: int, progress: bool) -> list[dict]:
    """Render every patient, in ``workers`` spawned processes when > 1; results in job order."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="generate", unit="patient", disable=not progress)
    if workers > 1:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = []
            for res in pool.map(_render_job, jobs):
                results.append(res)
                bar.update()
    else:
        results = []
        for job in jobs:
            results.append(_render_job(job))
            bar.update()
    bar.close()
    return results


def _lesion_truth(tables: CohortTables, results: list[dict]) -> pd.DataFrame:
    """``truth/lesion_truth.csv``: drawn lesion properties plus where and how they were rendered."""
    lesion_truth = tables.lesions.copy()
    centres = np.concatenate([np.asarray(r["centres"]).reshape(-1, 3) for r in results])
    lesion_truth[["center_x_mm", "center_y_mm", "center_z_mm"]] = np.round(centres, 2)
    lesion_truth["host_tissue"] = [h for r in results for h in r["hosts"]]
    lesion_truth["suvmax_pet"] = np.round([v for r in results for v in r["suvmax_pet"]], 3)
    lesion_truth["bone_ct_pattern"] = np.where(
        lesion_truth["site"] != "bone", "",
        np.select([lesion_truth["necrosis"] < 1 / 3, lesion_truth["necrosis"] < 2 / 3],
                  ["sclerotic", "mixed"], "lytic"))
    return lesion_truth


def generate_cohort(out_dir: str | os.PathLike, n_patients: int = 99, seed: int = 0,
                    signal: str = "both", spec: Spec | None = None, workers: int = 2,
                    progress: bool = True) -> Path:
    """Write a synthetic cohort directory (docs/ARCHITECTURE.md) and return its manifest path.

    The whole directory is built in a temporary folder and renamed at the end, so a failure
    leaves nothing behind. Results do not depend on ``workers``.

    >>> import tempfile
    >>> from psma_lib.synthetic import ImagingSpec, Spec
    >>> coarse = Spec(imaging=ImagingSpec(phantom_spacing_mm=[4.0, 4.0, 3.0], ct_inplane_mm=[3.0, 3.0]))
    >>> manifest = generate_cohort(Path(tempfile.mkdtemp()) / "tiny", n_patients=1, spec=coarse,
    ...                            workers=1, progress=False)
    >>> manifest.name, sorted(p.name for p in (manifest.parent / "images").iterdir())
    ('manifest.yaml', ['SYN001_ct.nii.gz', 'SYN001_mask.nii.gz', 'SYN001_pet.nii.gz'])
    """
    from ..manifest import write_manifest

    spec = spec or Spec()
    tables = sample_tables(n_patients, seed, signal, spec)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        (tmp / "truth").mkdir()
        results = _run_jobs(_render_jobs(tables, seed, spec, tmp), workers, progress)
        lesion_truth = _lesion_truth(tables, results)
        lesions = lesion_truth[["patient_id", "lesion_id", "mask_label", "center_x_mm",
                                "center_y_mm", "center_z_mm", "site"]]
        images = pd.DataFrame([{"patient_id": r["pid"], "pet": r["paths"]["pet"], "ct": r["paths"]["ct"],
                                "mask": r["paths"]["mask"]} for r in results])
        tables.truth.to_csv(tmp / "truth" / "truth.csv", index=False)
        lesion_truth.to_csv(tmp / "truth" / "lesion_truth.csv", index=False)
        (tmp / "truth" / "spec.yaml").write_text(yaml.safe_dump(
            {"seed": seed, "signal": signal, "n_patients": n_patients, **spec_to_dict(spec)}, sort_keys=False))
        info = {"name": f"synthetic-{signal}-seed{seed}", "synthetic": True, "seed": seed, "signal": signal,
                "description": f"synthetic PSMA PET/CT cohort: {n_patients} patients, {len(lesions)} "
                               f"lesions, outcome signal '{signal}' (psma_lib.synthetic)"}
        write_manifest(tmp, tables.patients, images, lesions, info)
    return out_dir / "manifest.yaml"


def load_truth(cohort_dir: str | os.PathLike) -> pd.DataFrame:
    """``truth/truth.csv`` of a synthetic cohort (patient_id as str).

    >>> from psma_lib.testing import tiny_cohort
    >>> load_truth(tiny_cohort().parent)["patient_id"].tolist()
    ['SYN001', 'SYN002']
    >>> load_truth("/no/such/cohort")
    Traceback (most recent call last):
    psma_lib.errors.InputError: file /no/such/cohort/truth/truth.csv: no truth/truth.csv: not a synthetic cohort (or truth was removed)
    """
    return _read_truth(cohort_dir, "truth.csv")


def load_lesion_truth(cohort_dir: str | os.PathLike) -> pd.DataFrame:
    """``truth/lesion_truth.csv`` of a synthetic cohort: each lesion's drawn properties (ids as str).

    >>> from psma_lib.testing import tiny_cohort
    >>> load_lesion_truth(tiny_cohort().parent)["lesion_id"].str.startswith("SYN00").all()
    np.True_
    """
    return _read_truth(cohort_dir, "lesion_truth.csv")


def _read_truth(cohort_dir: str | os.PathLike, name: str) -> pd.DataFrame:
    path = Path(cohort_dir) / "truth" / name
    if not path.is_file():
        raise InputError(f"no truth/{name}: not a synthetic cohort (or truth was removed)", file=str(path))
    return pd.read_csv(path, dtype={"patient_id": str, "lesion_id": str})
