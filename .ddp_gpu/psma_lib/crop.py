"""Lesion-centred PET/CT crops in world coordinates (``psma-pfs crop``).

For each lesion of a cohort manifest, a cube of fixed physical size (default 64 mm at 2 mm
spacing = 32^3 voxels) is sampled around the lesion centre from the PET and from the CT, each
through its own affine (trilinear), so PET and CT on different grids, flipped axes, anisotropic
voxels and oblique affines need no special handling. Crops keep physical units (SUV, HU);
normalisation belongs to the model. Outside a field of view the crop is padded with 0 SUV /
-1000 HU and the lesion's ``edge`` flag is set. A lesion centre outside the PET field of view,
PET and CT that do not overlap in world space, or a ``mask_label`` absent from the mask is an
:class:`~psma_lib.errors.InputError` naming the patient, the lesion and the file.

Lesion centre (``center``):

* ``"centroid"`` (default): centroid of the lesion's mask label (voxel centres through the
  mask's affine, in world mm);
* ``"suvmax"``: the native PET voxel with the highest SUV inside the lesion's label;
* ``"given"``: the manifest's world centre, falling back to the centroid where none is given.

A lesion with a world centre but no mask label is always centred on its given centre; its
``volume_ml``, ``suvmax`` and ``suvmean`` are then unknown (NaN, empty in the CSV). ``suvmax``
and ``suvmean`` are the maximum and the mean of the native PET voxels covering the lesion's label
(never of the resampled crop; each mask voxel reads the PET voxel containing its centre, so on a
mask grid finer than the PET the mean is volume-weighted) and ``volume_ml`` is the label's voxel
count times the mask voxel volume. ``lesions.csv`` rounds centres to 0.001 mm, ``volume_ml``,
``suvmax`` and ``suvmean`` to 4 decimals. Conventional PSMA biomarkers (PSMA-TV, TL-PSMA, ...)
are derived from these columns by :mod:`psma_lib.biomarkers`.

Output (docs/ARCHITECTURE.md, "Crops directory"): ``crops.npy`` float32
``[n_lesions, 2, D, H, W]`` (channel 0 PET, channel 1 CT), ``lesions.csv`` (row i describes
``crops[i]`` and is row i of the manifest's lesions table), ``patients.csv`` (copy of the
cohort's), ``crops.json``. The crop grid orientation is :data:`psma_lib.geometry.CROP_ORIENTATION`.

The cohort is processed patient by patient in a process pool (one patient's volumes in memory
per worker), results are written in manifest order into a ``.npy`` file inside a temporary
directory that replaces ``out_dir`` only on success, so memory is flat in cohort size, a failure
leaves nothing behind, and the output is identical for any number of workers.

>>> import tempfile; from psma_lib.testing import tiny_cohort
>>> crops_dir = crop_cohort(tiny_cohort(), Path(tempfile.mkdtemp()) / "crops", size_mm=32,
...                         spacing_mm=4, workers=1, progress=False)
>>> crop_set = load_crops(crops_dir)
>>> crop_set.images.shape[1:], crop_set.planes("axial").shape[1:]
((2, 8, 8, 8), (2, 8, 8))
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import yaml

from .errors import InputError
from .geometry import (
    CROP_ORIENTATION,
    crop_grid_mm,
    crop_shape,
    inside_field_of_view,
    sample_world,
    voxel_to_world,
    world_to_voxel,
)
from .images import bounds_overlap_mm, image_bounds_mm, load_image
from .io import atomic_dir
from .repro import provenance

CenterMode = Literal["centroid", "suvmax", "given"]
CENTER_MODES = ("centroid", "suvmax", "given")
View = Literal["axial", "coronal", "sagittal"]

PET_PAD_SUV = 0.0
CT_PAD_HU = -1000.0
CROPS_FILE = "crops.npy"
LESIONS_FILE = "lesions.csv"
PATIENTS_FILE = "patients.csv"
META_FILE = "crops.json"
LESION_TABLE_COLUMNS = (
    "patient_id", "lesion_id", "site", "center_x_mm", "center_y_mm", "center_z_mm",
    "volume_ml", "suvmax", "suvmean", "edge",
)


@dataclass(frozen=True)
class LesionMeasurement:
    """A lesion's mask-derived geometry and uptake.

    Attributes:
        centroid_mm: (x, y, z) world mm, mean of the label's voxel centres.
        suvmax_mm: (x, y, z) world mm of the native PET voxel with the highest SUV in the label.
        volume_ml: label voxel count x mask voxel volume, in mL.
        suvmax: highest native PET voxel value (SUV) in the label.
        suvmean: mean of the native PET voxel values (SUV) read by the label's voxels (one
            value per mask voxel inside the PET field of view).
    """

    centroid_mm: np.ndarray
    suvmax_mm: np.ndarray
    volume_ml: float
    suvmax: float
    suvmean: float


def measure_lesion(
    mask: np.ndarray,
    mask_affine: np.ndarray,
    label: int,
    pet: np.ndarray,
    pet_affine: np.ndarray,
) -> LesionMeasurement:
    """Centroid, SUVmax location, volume, SUVmax and SUVmean of one label of a lesion mask.

    The mask may sit on its own grid: each label voxel is mapped to the PET voxel that contains
    its centre, so ``suvmax`` is always a native PET voxel value and ``suvmean`` the mean of the
    values so read (label voxels outside the PET field of view are left out of both).

    Args:
        mask: ``(I, J, K)`` integer label map; ``mask_affine`` its voxel -> RAS+ mm matrix.
        label: the lesion's label (> 0).
        pet: ``(I', J', K')`` PET in SUV; ``pet_affine`` its voxel -> RAS+ mm matrix.

    Raises:
        ValueError: the label is absent from the mask, or none of its voxels lies in the PET.

    >>> mask = np.zeros((5, 5, 5), np.int32); mask[1:3, 2, 2] = 7
    >>> pet = np.zeros((5, 5, 5), np.float32); pet[2, 2, 2] = 9.0
    >>> m = measure_lesion(mask, np.diag([2.0, 2, 2, 1]), 7, pet, np.diag([2.0, 2, 2, 1]))
    >>> m.centroid_mm.tolist(), m.suvmax_mm.tolist(), round(m.volume_ml, 6), m.suvmax, m.suvmean
    ([3.0, 4.0, 4.0], [4.0, 4.0, 4.0], 0.016, 9.0, 4.5)
    """
    voxels = np.argwhere(mask == label)
    if len(voxels) == 0:
        raise ValueError(f"label {label} does not occur in the mask")
    return _measure_voxels(voxels, mask_affine, pet, pet_affine)


def _measure_voxels(
    voxels: np.ndarray, mask_affine: np.ndarray, pet: np.ndarray, pet_affine: np.ndarray
) -> LesionMeasurement:
    """:func:`measure_lesion` for the label's voxel indices ``[m, 3]``."""
    world = voxel_to_world(mask_affine, voxels)
    pet_voxels = np.rint(world_to_voxel(pet_affine, world)).astype(np.int64)
    in_pet = np.all((pet_voxels >= 0) & (pet_voxels < np.array(pet.shape)), axis=1)
    if not in_pet.any():
        raise ValueError("the lesion's mask voxels all lie outside the PET field of view")
    pet_voxels = pet_voxels[in_pet]
    uptake = pet[pet_voxels[:, 0], pet_voxels[:, 1], pet_voxels[:, 2]]
    hottest = int(np.argmax(uptake))  # first maximum in mask voxel order: deterministic
    voxel_ml = abs(float(np.linalg.det(np.asarray(mask_affine, dtype=np.float64)[:3, :3]))) / 1000.0
    return LesionMeasurement(
        centroid_mm=world.mean(axis=0),
        suvmax_mm=voxel_to_world(pet_affine, pet_voxels[hottest]),
        volume_ml=len(voxels) * voxel_ml,
        suvmax=float(uptake[hottest]),
        suvmean=float(np.mean(uptake, dtype=np.float64)),
    )


def crop_volumes(
    pet: np.ndarray,
    pet_affine: np.ndarray,
    ct: np.ndarray,
    ct_affine: np.ndarray,
    centers_mm: np.ndarray,
    size_mm: float = 64.0,
    spacing_mm: float = 2.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop PET and CT around world centres, each through its own affine (trilinear).

    Args:
        pet: ``(I, J, K)`` SUV with ``pet_affine``; ct: ``(I', J', K')`` HU with ``ct_affine``.
        centers_mm: ``[n, 3]`` crop centres (x, y, z) in RAS+ mm.
        size_mm, spacing_mm: crop edge length and voxel spacing in mm.

    Returns:
        ``(crops, edge)``: float32 ``[n, 2, D, H, W]`` (channel 0 PET, 1 CT; orientation
        :data:`~psma_lib.geometry.CROP_ORIENTATION`) and bool ``[n]``, True where the crop
        reached outside the PET or CT field of view and was padded with 0 SUV / -1000 HU.

    >>> pet = np.ones((10, 10, 10), np.float32); ct = np.zeros((10, 10, 10), np.float32)
    >>> crops, edge = crop_volumes(pet, np.eye(4), ct, np.eye(4), np.array([[4.5, 4.5, 4.5]]), 4, 1)
    >>> crops.shape, edge.tolist(), float(crops[0, 0].min())
    ((1, 2, 4, 4, 4), [False], 1.0)
    """
    centers_mm = np.asarray(centers_mm, dtype=np.float64).reshape(-1, 3)
    shape = crop_shape(size_mm, spacing_mm)
    crops = np.empty((len(centers_mm), 2, *shape), dtype=np.float32)
    edge = np.zeros(len(centers_mm), dtype=bool)
    for index, centre in enumerate(centers_mm):
        grid = crop_grid_mm(centre, size_mm, spacing_mm)
        crops[index, 0] = sample_world(pet, pet_affine, grid, order=1, cval=PET_PAD_SUV)
        crops[index, 1] = sample_world(ct, ct_affine, grid, order=1, cval=CT_PAD_HU)
        edge[index] = not (
            inside_field_of_view(pet.shape, pet_affine, grid).all()
            and inside_field_of_view(ct.shape, ct_affine, grid).all()
        )
    return crops, edge


# ---------------------------------------------------------------------------------------------
# One patient (runs in a worker process)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PatientTask:
    """Everything a worker needs to crop one patient's lesions (plain, picklable values)."""

    patient_id: str
    files: dict[str, tuple[str, str]]  # kind -> (absolute path, path as named in the manifest)
    lesions: list[tuple[str, int | None, tuple[float, float, float] | None]]  # id, label, centre
    size_mm: float
    spacing_mm: float
    center_mode: str


@dataclass
class _PatientResult:
    crops: np.ndarray | None = None  # [k, 2, D, H, W]
    stats: list[dict] = field(default_factory=list)  # centre, volume_ml, suvmax, suvmean, edge
    error: tuple[str, str | None, str | None] | None = None  # InputError (problem, patient, file)


def _box_text(bounds: tuple[np.ndarray, np.ndarray]) -> str:
    """``x -10..20, y ..., z ...`` for an error message."""
    return ", ".join(f"{axis} {lo:.0f}..{hi:.0f}" for axis, lo, hi in zip("xyz", *bounds, strict=True))


def _crop_patient_safe(task: _PatientTask) -> _PatientResult:
    """:func:`_crop_patient`, returning an InputError's parts instead of raising it, so they
    cross the process boundary intact."""
    try:
        return _crop_patient(task)
    except InputError as exc:
        return _PatientResult(error=(exc.problem, exc.patient, exc.file))


def _crop_patient(task: _PatientTask) -> _PatientResult:
    """Load one patient's PET, CT (and mask), locate and measure its lesions, crop them."""
    pid = task.patient_id
    volumes = {}
    for kind, (path, label) in task.files.items():
        volumes[kind] = load_image(path, patient=pid, kind=kind, label=label)
    pet, pet_affine = volumes["pet"]
    ct, ct_affine = volumes["ct"]
    pet_file = task.files["pet"][1]
    pet_box, ct_box = image_bounds_mm(pet.shape, pet_affine), image_bounds_mm(ct.shape, ct_affine)
    if not np.all(bounds_overlap_mm(pet_box, ct_box) > 0):
        raise InputError(
            f"PET and CT do not overlap in world space (PET {_box_text(pet_box)}, CT "
            f"{_box_text(ct_box)} mm): wrong affine or not the same study?",
            patient=pid, file=task.files["ct"][1])

    label_voxels = {}
    if "mask" in volumes:
        mask, mask_affine = volumes["mask"]
        voxels = np.argwhere(mask > 0)
        labels = mask[tuple(voxels.T)]
        order = np.argsort(labels, kind="stable")
        voxels, labels = voxels[order], labels[order]
        values, starts = np.unique(labels, return_index=True)
        for value, chunk in zip(values, np.split(voxels, starts[1:]), strict=True):
            label_voxels[int(value)] = chunk

    centres, stats = [], []
    for lesion_id, label, given_centre in task.lesions:
        measured = None
        if label is not None:
            if label not in label_voxels:
                raise InputError(
                    f"lesion {lesion_id!r}: mask_label {label} does not occur in the mask",
                    patient=pid, file=task.files["mask"][1] if "mask" in task.files else pet_file)
            try:
                measured = _measure_voxels(label_voxels[label], mask_affine, pet, pet_affine)
            except ValueError as exc:
                raise InputError(f"lesion {lesion_id!r}: {exc}", patient=pid, file=pet_file) from exc
        if measured is None or (task.center_mode == "given" and given_centre is not None):
            centre = np.asarray(given_centre, dtype=np.float64)
        elif task.center_mode == "suvmax":
            centre = measured.suvmax_mm
        else:
            centre = measured.centroid_mm
        if not inside_field_of_view(pet.shape, pet_affine, centre):
            voxel = np.round(world_to_voxel(pet_affine, centre), 1).tolist()
            raise InputError(
                f"lesion {lesion_id!r}: centre ({', '.join(f'{c:.1f}' for c in centre)}) mm is "
                f"outside the PET field of view (voxel {voxel}, PET shape {list(pet.shape)})",
                patient=pid, file=pet_file)
        centres.append(centre)
        stats.append({
            "center_mm": centre,
            "volume_ml": measured.volume_ml if measured else math.nan,
            "suvmax": measured.suvmax if measured else math.nan,
            "suvmean": measured.suvmean if measured else math.nan,
        })

    crops, edge = crop_volumes(pet, pet_affine, ct, ct_affine, np.array(centres),
                               task.size_mm, task.spacing_mm)
    for lesion_stats, flag in zip(stats, edge, strict=True):
        lesion_stats["edge"] = int(flag)
    return _PatientResult(crops=crops, stats=stats)


# ---------------------------------------------------------------------------------------------
# The cohort
# ---------------------------------------------------------------------------------------------


def crop_cohort(
    manifest_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    size_mm: float = 64.0,
    spacing_mm: float = 2.0,
    center: CenterMode = "centroid",
    workers: int = 2,
    progress: bool = True,
) -> Path:
    """Crop every lesion of a cohort and write a crops directory (see module docstring).

    Args:
        manifest_path: the cohort's ``manifest.yaml`` (or its folder).
        out_dir: the crops directory to create (replaced atomically if it exists).
        size_mm: crop edge length in mm (same on all three axes).
        spacing_mm: crop voxel spacing in mm; the crop has ``round(size/spacing)`` voxels a side.
        center: ``"centroid"``, ``"suvmax"`` or ``"given"`` (module docstring).
        workers: processes cropping patients in parallel (1 = in this process); the output does
            not depend on it.
        progress: show a tqdm progress bar over patients.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        InputError: an invalid manifest, an unreadable or bad image, a missing mask label, or a
            lesion centre outside the PET field of view (naming patient, lesion and file);
            ``out_dir`` is then left as it was.
    """
    from tqdm.auto import tqdm

    from .manifest import data_checksum, load_manifest, manifest_file

    if center not in CENTER_MODES:
        raise InputError(f"center must be one of {', '.join(CENTER_MODES)}, got {center!r}")
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    try:
        shape = crop_shape(size_mm, spacing_mm)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    manifest_path = manifest_file(manifest_path).resolve()
    cohort = load_manifest(manifest_path)
    tasks, rows = _patient_tasks(cohort, float(size_mm), float(spacing_mm), center)
    n_lesions = len(cohort.lesions)
    if n_lesions == 0:
        raise InputError("the cohort has no lesions to crop", file=str(manifest_path))

    lesion_table = cohort.lesions[["patient_id", "lesion_id", "site"]].copy()
    for column in LESION_TABLE_COLUMNS[3:]:
        lesion_table[column] = np.nan
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        crops_file = tmp / CROPS_FILE
        np.lib.format.open_memmap(crops_file, mode="w+", dtype=np.float32,
                                  shape=(n_lesions, 2, *shape)).flush()
        bar = tqdm(total=len(tasks), desc="crop", unit="patient", disable=not progress)
        for task, result in zip(tasks, _run_in_order(tasks, workers), strict=True):
            if result.error is not None:
                problem, patient, file = result.error
                raise InputError(problem, patient=patient, file=file)
            patient_rows = rows[task.patient_id]
            _write_rows(crops_file, patient_rows, result.crops)
            for row, lesion_stats in zip(patient_rows, result.stats, strict=True):
                x, y, z = lesion_stats["center_mm"]
                # Rounded for readable tables: 1 um and 0.1 uL / 1e-4 SUV are far below a voxel.
                lesion_table.loc[row, list(LESION_TABLE_COLUMNS[3:])] = [
                    round(x, 3), round(y, 3), round(z, 3), round(lesion_stats["volume_ml"], 4),
                    round(lesion_stats["suvmax"], 4), round(lesion_stats["suvmean"], 4),
                    lesion_stats["edge"]]
            bar.update(1)
        bar.close()

        lesion_table["edge"] = lesion_table["edge"].astype(int)
        lesion_table.to_csv(tmp / LESIONS_FILE, index=False)
        shutil.copyfile(_patients_table_path(cohort), tmp / PATIENTS_FILE)
        meta = {
            "format": "psma-pfs-crops",
            "version": 1,
            "size_mm": float(size_mm),
            "spacing_mm": float(spacing_mm),
            "shape": [n_lesions, 2, *shape],
            "channels": ["PET (SUV)", "CT (HU)"],
            "pad_values": {"pet_suv": PET_PAD_SUV, "ct_hu": CT_PAD_HU},
            "interpolation": "trilinear for PET and CT, each through its own affine",
            "orientation": CROP_ORIENTATION,
            "center_mode": center,
            "row_order": "row i of crops.npy and lesions.csv is row i of the manifest's lesions.csv",
            "n_patients": len(cohort.patients),
            "n_lesions": n_lesions,
            "n_edge": int(lesion_table["edge"].sum()),
            "manifest": str(manifest_path),
            "data_checksum": data_checksum(manifest_path),
            "synthetic": bool(cohort.info.get("synthetic", False)),
            "cohort_name": cohort.info.get("name"),
            "provenance": provenance(size_mm=float(size_mm), spacing_mm=float(spacing_mm),
                                     center=center, workers=workers),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out_dir


def _patient_tasks(cohort, size_mm: float, spacing_mm: float, center: str
                   ) -> tuple[list[_PatientTask], dict[str, list[int]]]:
    """One task per patient with lesions (in order of first appearance in the lesions table)
    and, per patient, the output rows of its lesions."""
    images = cohort.images.set_index("patient_id")
    tasks, rows = [], {}
    for pid, group in cohort.lesions.groupby("patient_id", sort=False):
        pid = str(pid)
        if pid not in images.index:
            raise InputError("patient has lesions but no row in images.csv", patient=pid)
        files = {}
        for kind in ("pet", "ct", "mask"):
            relative = str(images.at[pid, kind] or "")
            if relative:
                files[kind] = (str(cohort.root / relative), relative)
        lesions = []
        for _, lesion in group.iterrows():
            label = None if pd.isna(lesion["mask_label"]) else int(lesion["mask_label"])
            centre = tuple(float(lesion[c]) for c in ("center_x_mm", "center_y_mm", "center_z_mm"))
            lesions.append((str(lesion["lesion_id"]), label,
                            None if any(math.isnan(c) for c in centre) else centre))
        tasks.append(_PatientTask(pid, files, lesions, size_mm, spacing_mm, center))
        rows[pid] = [int(row) for row in group.index]
    return tasks, rows


def _run_in_order(tasks: list[_PatientTask], workers: int):
    """Yield each task's result in task order, keeping at most ``2 * workers`` in flight."""
    if workers == 1:
        for task in tasks:
            yield _crop_patient_safe(task)
        return
    # 'spawn', not 'fork': the caller (a notebook) may hold torch/OpenMP threads that forking can
    # deadlock; spawned workers are also direct children, so getrusage(RUSAGE_CHILDREN) sees them.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending = collections.deque()
        upcoming = iter(tasks)
        try:
            for task in upcoming:
                pending.append(pool.submit(_crop_patient_safe, task))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _write_rows(crops_file: Path, rows: list[int], crops: np.ndarray) -> None:
    """Write ``crops[i]`` to row ``rows[i]`` of the .npy file, mapping it only for this write
    (so the written pages leave this process's resident memory)."""
    array = np.lib.format.open_memmap(crops_file, mode="r+")
    if rows == list(range(rows[0], rows[0] + len(rows))):
        array[rows[0]:rows[0] + len(rows)] = crops
    else:
        array[rows] = crops
    array.flush()
    del array


def _patients_table_path(cohort) -> Path:
    """The cohort's patients table file, as named in its manifest."""
    manifest = yaml.safe_load(Path(cohort.path).read_text())
    return Path(cohort.root) / manifest["tables"]["patients"]["path"]


# ---------------------------------------------------------------------------------------------
# Reading a crops directory
# ---------------------------------------------------------------------------------------------


@dataclass
class CropSet:
    """A loaded crops directory.

    Attributes:
        images: float32 ``[n, 2, D, H, W]`` (memory-mapped, read-only): channel 0 PET (SUV),
            channel 1 CT (HU), axes along world (+z, +y, +x).
        lesions: row i describes ``images[i]`` (``LESION_TABLE_COLUMNS``; ids as str;
            ``suvmean`` is NaN for a crops directory written before it was measured).
        patients: the cohort's patients table (clinical + outcome; ``patient_id`` as str).
        meta: the ``crops.json`` record (size, spacing, orientation, checksum, provenance, ...).
        root: the crops directory it was loaded from.
    """

    images: np.ndarray
    lesions: pd.DataFrame
    patients: pd.DataFrame
    meta: dict
    root: Path | None = None

    @property
    def n_lesions(self) -> int:
        return int(self.images.shape[0])

    @property
    def synthetic(self) -> bool:
        """The cohort's own flag, copied into ``crops.json``: True for a generated cohort."""
        return bool(self.meta.get("synthetic", False))

    def planes(self, view: View = "axial") -> np.ndarray:
        """2-D planes through each crop's centre voxel, float32 ``[n, 2, H', W']``.

        ``"axial"``: ``images[:, :, D//2]`` -> ``[n, 2, H, W]`` (rows +y, columns +x);
        ``"coronal"``: ``images[:, :, :, H//2]`` -> ``[n, 2, D, W]`` (rows +z, columns +x);
        ``"sagittal"``: ``images[:, :, :, :, W//2]`` -> ``[n, 2, D, H]`` (rows +z, columns +y).
        """
        n_d, n_h, n_w = self.images.shape[2:]
        if view == "axial":
            plane = self.images[:, :, n_d // 2]
        elif view == "coronal":
            plane = self.images[:, :, :, n_h // 2]
        elif view == "sagittal":
            plane = self.images[:, :, :, :, n_w // 2]
        else:
            raise ValueError(f"view must be 'axial', 'coronal' or 'sagittal', got {view!r}")
        return np.array(plane, dtype=np.float32)


def load_crops(crops_dir: str | os.PathLike) -> CropSet:
    """Open a crops directory written by :func:`crop_cohort`.

    Raises:
        InputError: a missing file, an unreadable array/table/JSON, or shapes that disagree
            (array vs ``crops.json`` vs number of rows in ``lesions.csv``).

    >>> import tempfile; from psma_lib.testing import write_tiny_crops
    >>> crop_set = load_crops(write_tiny_crops(Path(tempfile.mkdtemp()), n_patients=6, size=8))
    >>> crop_set.n_lesions == len(crop_set.lesions), crop_set.planes("coronal").shape[1:]
    (True, (2, 8, 8))
    """
    crops_dir = Path(crops_dir)
    if not crops_dir.is_dir():
        raise InputError("crops directory not found", file=str(crops_dir))
    for name in (CROPS_FILE, LESIONS_FILE, PATIENTS_FILE, META_FILE):
        if not (crops_dir / name).is_file():
            raise InputError("crops directory is incomplete: file missing (rerun psma-pfs crop)",
                             file=str(crops_dir / name))
    try:
        images = np.load(crops_dir / CROPS_FILE, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"cannot read crop array ({exc})", file=str(crops_dir / CROPS_FILE)) from exc
    try:
        meta = json.loads((crops_dir / META_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read JSON ({exc})", file=str(crops_dir / META_FILE)) from exc
    tables = {}
    for name in (LESIONS_FILE, PATIENTS_FILE):
        try:
            tables[name] = pd.read_csv(crops_dir / name, dtype={"patient_id": str, "lesion_id": str})
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read CSV ({exc})", file=str(crops_dir / name)) from exc
    lesions = tables[LESIONS_FILE]
    if "suvmean" not in lesions.columns and "suvmax" in lesions.columns:
        # Crops written before suvmean was measured: still readable, SUVmean unknown (NaN).
        lesions.insert(lesions.columns.get_loc("suvmax") + 1, "suvmean", np.nan)
    missing = [c for c in LESION_TABLE_COLUMNS if c not in lesions.columns]
    if missing:
        raise InputError(f"missing column(s): {', '.join(missing)}", file=str(crops_dir / LESIONS_FILE))
    lesions["site"] = lesions["site"].fillna("").astype(str)

    where = str(crops_dir / CROPS_FILE)
    if images.dtype != np.float32 or images.ndim != 5 or images.shape[1] != 2:
        raise InputError(f"expected float32 [n, 2, D, H, W], got {images.dtype} {list(images.shape)}",
                         file=where)
    if list(images.shape) != list(meta.get("shape", [])):
        raise InputError(f"array shape {list(images.shape)} disagrees with crops.json shape "
                         f"{meta.get('shape')}", file=where)
    if len(lesions) != images.shape[0]:
        raise InputError(f"{len(lesions)} rows in lesions.csv but {images.shape[0]} crops", file=where)
    unknown = sorted(set(lesions["patient_id"]) - set(tables[PATIENTS_FILE]["patient_id"]))
    if unknown:
        raise InputError(f"lesions of patients missing from patients.csv: {', '.join(unknown[:5])}",
                         file=str(crops_dir / PATIENTS_FILE))
    return CropSet(images=images, lesions=lesions, patients=tables[PATIENTS_FILE], meta=meta,
                   root=crops_dir)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _cli_crop(args: argparse.Namespace) -> int:
    out = crop_cohort(args.manifest, args.out, size_mm=args.size_mm, spacing_mm=args.spacing_mm,
                      center=args.center, workers=args.workers, progress=not args.no_progress)
    crop_set = load_crops(out)
    meta = crop_set.meta
    print(f"wrote {crop_set.n_lesions} crops {meta['shape'][1:]} ({meta['size_mm']:g} mm at "
          f"{meta['spacing_mm']:g} mm, centre: {meta['center_mode']}; {meta['n_edge']} padded at "
          f"a field-of-view edge) to {out}")
    return 0


def register_cli(subparsers) -> None:
    """Add ``psma-pfs crop MANIFEST --out DIR [--size-mm 64] [--spacing-mm 2] [--center ...]``."""
    parser = subparsers.add_parser(
        "crop", help="crop every lesion of a cohort from PET and CT in world coordinates",
        description="Sample a fixed-size cube around each lesion from PET (SUV) and CT (HU), each "
                    "through its own affine, and write crops.npy [n, 2, D, H, W], lesions.csv, "
                    "patients.csv and crops.json to --out (atomically).")
    parser.add_argument("manifest", help="the cohort's manifest.yaml or its folder")
    parser.add_argument("--out", required=True, help="crops directory to write")
    parser.add_argument("--size-mm", type=float, default=64.0, help="crop edge length in mm (64)")
    parser.add_argument("--spacing-mm", type=float, default=2.0, help="crop voxel spacing in mm (2)")
    parser.add_argument("--center", choices=CENTER_MODES, default="centroid",
                        help="lesion centre: mask centroid (default), SUVmax voxel, or the "
                             "manifest's world centre")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_cli_crop)
