"""Lesion-centred PET/CT crops in world coordinates (``psma-pfs crop``).

For each lesion of a cohort manifest, a cube of fixed physical size (default 64 mm at 2 mm
spacing = 32^3 voxels) is sampled around the lesion centre from the PET and from the CT, each
through its own affine (trilinear), so PET and CT on different grids, flipped axes, anisotropic
voxels and oblique affines need no special handling. A third channel is the lesion's own mask:
1 where the crop voxel's nearest mask voxel (through the mask's affine) carries this lesion's
label, 0 elsewhere (background, other lesions, outside the mask, a lesion without a label), so
a model can be told which voxels its measurements were read from. Crops keep physical units (SUV,
HU); normalisation belongs to the model. Outside a field of view the crop is padded with 0 SUV /
-1000 HU and the lesion's ``edge`` flag is set. A lesion centre outside the PET field of view,
PET and CT that do not overlap in world space, or a ``mask_label`` absent from the mask is an
:class:`~psma_lib.errors.InputError` naming the patient, the lesion and the file.

Lesion centre (``center``):

* ``"centroid"`` (default): centroid of the lesion's mask label (voxel centres through the
  mask's affine, in world mm);
* ``"suvmax"``: the native PET voxel with the highest SUV inside the lesion's label;
* ``"given"``: the manifest's world centre, falling back to the centroid where none is given.

A lesion with a world centre but no mask label is always centred on its given centre; its
``volume_ml``, ``suvmax``, ``suvmean`` and ``hu_mean`` are then unknown (NaN, empty in the CSV).
``suvmax`` and ``suvmean`` are the maximum and the mean of the native PET voxels covering the
lesion's label (never of the resampled crop; each mask voxel reads the PET voxel containing its
centre, so on a mask grid finer than the PET the mean is volume-weighted), ``hu_mean`` the mean of
the native CT voxels read the same way (the lesion's density: sclerotic bone lesions are dense,
lytic ones are not), and ``volume_ml`` is the label's voxel count times the mask voxel volume.
``lesions.csv`` rounds centres to 0.001 mm, ``volume_ml``, ``suvmax`` and ``suvmean`` to 4
decimals, ``hu_mean`` to 0.01 HU. Conventional PSMA biomarkers (PSMA-TV, TL-PSMA, ...)
are derived from these columns by :mod:`psma_lib.biomarkers`.

Output (docs/ARCHITECTURE.md, "Crops directory", format version 3): ``lesions.csv`` (row i is
row i of the manifest's lesions table, with the ``shard`` and ``row`` holding its crop),
``patients.csv`` (copy of the cohort's), ``crops.json`` and ``shards/NNNNN-of-NNNNN/`` with
``crops-NNNNN.npy`` ``[n_k, 3, D, H, W]`` (channel 0 PET, 1 CT, 2 lesion mask) and the three
central planes ``planes-<view>-NNNNN.npy``, so 2D training never reads a volume. The crop grid
orientation is :data:`psma_lib.geometry.CROP_ORIENTATION`. :func:`load_crops` also reads version
2 directories (the same without the mask channel) and version 1 ones (one ``crops.npy``, PET and
CT).

Storage is float32 (exact) or float16 (``dtype="float16"``, half the bytes); float16's error is
measured on every crop as it is written and kept in ``crops.json`` (``storage_error``: largest
absolute and relative error on PET SUV and CT HU). Readers always get float32.

At scale, :func:`crop_shard` crops one of N contiguous groups of patients (e.g. one SLURM array
task each) and :func:`merge_shards` then writes the tables that make the shards one crops
directory, copying no array; :func:`crop_cohort` is shard 0 of 1 plus the merge. Patients are
cropped one by one in a process pool (one patient's volumes in memory per worker) and written
in manifest order into ``.npy`` files inside a temporary directory that replaces the output only
on success, so memory is flat in cohort size, a failure leaves nothing behind, and the output
is identical for any number of workers or shards (apart from the shard/row columns).

>>> import tempfile; from psma_lib.testing import tiny_cohort
>>> crops_dir = crop_cohort(tiny_cohort(), Path(tempfile.mkdtemp()) / "crops", size_mm=32,
...                         spacing_mm=4, workers=1, progress=False)
>>> crop_set = load_crops(crops_dir)
>>> crop_set.images.shape[1:], crop_set.planes("axial").shape[1:], crop_set.meta["n_shards"]
((3, 8, 8, 8), (3, 8, 8), 1)
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import multiprocessing
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
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
from .io import atomic_dir, sha256_file
from .repro import provenance
from .shards import ShardedArray, npy_header, parse_shard, split_contiguous

CenterMode = Literal["centroid", "suvmax", "given"]
CENTER_MODES = ("centroid", "suvmax", "given")
View = Literal["axial", "coronal", "sagittal"]

PET_PAD_SUV = 0.0
CT_PAD_HU = -1000.0
MASK_PAD = 0.0
LESIONS_FILE = "lesions.csv"
PATIENTS_FILE = "patients.csv"
META_FILE = "crops.json"
CROPS_FORMAT = "psma-pfs-crops"
# 1: one float32 crops.npy; 2: shards with planes, float32/float16 (both still read, PET and CT);
# 3: as 2 with the lesion-mask channel.
CROPS_VERSION = 3
#: What each channel of a crop holds, by format version (versions 1 and 2 have no mask channel).
CROP_CHANNELS = ("PET (SUV)", "CT (HU)", "lesion mask (1 = this lesion's label)")
CHANNELS_BY_VERSION = {1: 2, 2: 2, 3: len(CROP_CHANNELS)}
LEGACY_CROPS_FILE = "crops.npy"  # version 1's array
SHARDS_DIR = "shards"
SHARD_FORMAT = "psma-pfs-crop-shard"
SHARD_META_FILE = "shard.json"
SHARD_LESIONS_FILE = "lesions.csv"
PLANE_VIEWS = ("axial", "coronal", "sagittal")
STORAGE_DTYPES = ("float32", "float16")
STORAGE_ERROR_CHANNELS = ("pet_suv", "ct_hu")
#: Relative storage error is measured where |value| >= float16's smallest normal number.
REL_ERROR_FLOOR = float(np.finfo(np.float16).smallest_normal)
STORAGE_ERROR_NOTE = (
    "float16 storage error measured on every crop when written: max_abs = largest |stored - "
    f"float32| (SUV, HU); max_rel = largest |stored - float32| / |float32| where |float32| >= "
    f"{REL_ERROR_FLOOR:.3g}; max_value = largest |float32|. Null: float32 storage, exact.")
SETTING_KEYS = ("size_mm", "spacing_mm", "center_mode", "dtype", "item_shape")
LESION_TABLE_COLUMNS = (
    "patient_id", "lesion_id", "site", "center_x_mm", "center_y_mm", "center_z_mm",
    "volume_ml", "suvmax", "suvmean", "hu_mean", "edge",
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
        hu_mean: mean of the native CT voxel values (HU) read the same way (NaN without a CT).
    """

    centroid_mm: np.ndarray
    suvmax_mm: np.ndarray
    volume_ml: float
    suvmax: float
    suvmean: float
    hu_mean: float = math.nan


def measure_lesion(
    mask: np.ndarray,
    mask_affine: np.ndarray,
    label: int,
    pet: np.ndarray,
    pet_affine: np.ndarray,
    ct: np.ndarray | None = None,
    ct_affine: np.ndarray | None = None,
) -> LesionMeasurement:
    """Centroid, SUVmax location, volume, SUVmax, SUVmean (and CT HU mean) of one label of a mask.

    The mask may sit on its own grid: each label voxel is mapped to the PET voxel that contains
    its centre, so ``suvmax`` is always a native PET voxel value and ``suvmean`` the mean of the
    values so read (label voxels outside the PET field of view are left out of both).

    Args:
        mask: ``(I, J, K)`` integer label map; ``mask_affine`` its voxel -> RAS+ mm matrix.
        label: the lesion's label (> 0).
        pet: ``(I', J', K')`` PET in SUV; ``pet_affine`` its voxel -> RAS+ mm matrix.
        ct: optional CT in HU on its own grid; ``ct_affine`` its voxel -> RAS+ mm matrix. Each
            label voxel reads the CT voxel containing its centre (those outside the CT are left
            out); ``hu_mean`` is NaN without a CT or if no label voxel lies inside it.

    Raises:
        ValueError: the label is absent from the mask, or none of its voxels lies in the PET.

    >>> mask = np.zeros((5, 5, 5), np.int32); mask[1:3, 2, 2] = 7
    >>> pet = np.zeros((5, 5, 5), np.float32); pet[2, 2, 2] = 9.0
    >>> m = measure_lesion(mask, np.diag([2.0, 2, 2, 1]), 7, pet, np.diag([2.0, 2, 2, 1]))
    >>> m.centroid_mm.tolist(), m.suvmax_mm.tolist(), round(m.volume_ml, 6), m.suvmax, m.suvmean
    ([3.0, 4.0, 4.0], [4.0, 4.0, 4.0], 0.016, 9.0, 4.5)
    >>> ct = np.zeros((3, 3, 3), np.float32); ct[1, 1, 1] = 800.0  # 4 mm CT voxels, shifted 2 mm
    >>> measure_lesion(mask, np.diag([2.0, 2, 2, 1]), 7, pet, np.diag([2.0, 2, 2, 1]),
    ...                ct, np.array([[4.0, 0, 0, -2], [0, 4, 0, 0], [0, 0, 4, 0], [0, 0, 0, 1]])).hu_mean
    400.0
    """
    voxels = np.argwhere(mask == label)
    if len(voxels) == 0:
        raise ValueError(f"label {label} does not occur in the mask")
    return _measure_voxels(voxels, mask_affine, pet, pet_affine, ct, ct_affine)


def _containing_voxels(shape: tuple[int, ...], affine: np.ndarray, world: np.ndarray) -> np.ndarray:
    """``[m', 3]`` indices of the voxels of an image (``shape``, ``affine``) that contain the world
    points ``[m, 3]``; points outside the image are left out."""
    index = np.rint(world_to_voxel(affine, world)).astype(np.int64)
    return index[np.all((index >= 0) & (index < np.array(shape)), axis=1)]


def _measure_voxels(
    voxels: np.ndarray, mask_affine: np.ndarray, pet: np.ndarray, pet_affine: np.ndarray,
    ct: np.ndarray | None = None, ct_affine: np.ndarray | None = None,
) -> LesionMeasurement:
    """:func:`measure_lesion` for the label's voxel indices ``[m, 3]``."""
    world = voxel_to_world(mask_affine, voxels)
    pet_voxels = _containing_voxels(pet.shape, pet_affine, world)
    if not len(pet_voxels):
        raise ValueError("the lesion's mask voxels all lie outside the PET field of view")
    uptake = pet[tuple(pet_voxels.T)]
    density = ct[tuple(_containing_voxels(ct.shape, ct_affine, world).T)] if ct is not None else np.empty(0)
    hottest = int(np.argmax(uptake))  # first maximum in mask voxel order: deterministic
    voxel_ml = abs(float(np.linalg.det(np.asarray(mask_affine, dtype=np.float64)[:3, :3]))) / 1000.0
    return LesionMeasurement(
        centroid_mm=world.mean(axis=0),
        suvmax_mm=voxel_to_world(pet_affine, pet_voxels[hottest]),
        volume_ml=len(voxels) * voxel_ml,
        suvmax=float(uptake[hottest]),
        suvmean=float(np.mean(uptake, dtype=np.float64)),
        hu_mean=float(np.mean(density, dtype=np.float64)) if len(density) else math.nan,
    )


def crop_volumes(
    pet: np.ndarray,
    pet_affine: np.ndarray,
    ct: np.ndarray,
    ct_affine: np.ndarray,
    centers_mm: np.ndarray,
    size_mm: float = 64.0,
    spacing_mm: float = 2.0,
    *,
    mask: np.ndarray | None = None,
    mask_affine: np.ndarray | None = None,
    labels: Sequence[int | None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Crop PET and CT around world centres, each through its own affine (trilinear), and each
    lesion's own mask label (nearest voxel).

    Args:
        pet: ``(I, J, K)`` SUV with ``pet_affine``; ct: ``(I', J', K')`` HU with ``ct_affine``.
        centers_mm: ``[n, 3]`` crop centres (x, y, z) in RAS+ mm.
        size_mm, spacing_mm: crop edge length and voxel spacing in mm.
        mask, mask_affine: the ``(I'', J'', K'')`` integer label map and its affine (None: no mask).
        labels: ``[n]`` each crop's lesion label in ``mask`` (None for a lesion without one).

    Returns:
        ``(crops, edge)``: float32 ``[n, 3, D, H, W]`` (channel 0 PET, 1 CT, 2 this lesion's
        mask, 1 inside and 0 elsewhere; orientation :data:`~psma_lib.geometry.CROP_ORIENTATION`)
        and bool ``[n]``, True where the crop reached outside the PET or CT field of view and was
        padded with 0 SUV / -1000 HU.

    >>> pet = np.ones((10, 10, 10), np.float32); ct = np.zeros((10, 10, 10), np.float32)
    >>> mask = np.zeros((10, 10, 10), np.int16); mask[4:6, 4:6, 4:6] = 3
    >>> crops, edge = crop_volumes(pet, np.eye(4), ct, np.eye(4), np.array([[4.5, 4.5, 4.5]]), 4, 1,
    ...                            mask=mask, mask_affine=np.eye(4), labels=[3])
    >>> crops.shape, edge.tolist(), float(crops[0, 0].min()), int(crops[0, 2].sum())
    ((1, 3, 4, 4, 4), [False], 1.0, 8)
    """
    centers_mm = np.asarray(centers_mm, dtype=np.float64).reshape(-1, 3)
    labels = [None] * len(centers_mm) if labels is None else list(labels)
    if len(labels) != len(centers_mm) or (mask is None and any(label is not None for label in labels)):
        raise ValueError("labels needs one entry per centre, and a mask for any label given")
    shape = crop_shape(size_mm, spacing_mm)
    crops = np.empty((len(centers_mm), len(CROP_CHANNELS), *shape), dtype=np.float32)
    edge = np.zeros(len(centers_mm), dtype=bool)
    for index, (centre, label) in enumerate(zip(centers_mm, labels, strict=True)):
        grid = crop_grid_mm(centre, size_mm, spacing_mm)
        crops[index, 0] = sample_world(pet, pet_affine, grid, order=1, cval=PET_PAD_SUV)
        crops[index, 1] = sample_world(ct, ct_affine, grid, order=1, cval=CT_PAD_HU)
        crops[index, 2] = MASK_PAD if label is None else \
            sample_world(mask, mask_affine, grid, order=0, cval=0) == label
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
    files: dict[str, tuple[str, str, str]]  # kind -> (absolute path, path in the manifest, SHA-256)
    lesions: list[tuple[str, int | None, tuple[float, float, float] | None]]  # id, label, centre
    size_mm: float
    spacing_mm: float
    center_mode: str
    dtype: str


@dataclass
class _PatientResult:
    crops: np.ndarray | None = None  # [k, 3, D, H, W] in the storage dtype
    stats: list[dict] = field(default_factory=list)  # centre, volume_ml, suvmax, suvmean, edge
    storage_error: dict | None = None  # float16 storage: measure_storage_error of these crops
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


def _check_sha256(path: str, expected: str, *, patient: str, file: str) -> None:
    """The manifest pins each image's SHA-256: crop only files that still match it (a missing
    file is left to :func:`~psma_lib.images.load_image`'s message)."""
    if expected and Path(path).is_file():
        actual = sha256_file(path)
        if actual != expected:
            raise InputError(f"SHA-256 mismatch (images.csv {expected[:12]}..., file {actual[:12]}...):"
                             " the file changed after the manifest was written",
                             patient=patient, file=file)


def _crop_patient(task: _PatientTask) -> _PatientResult:
    """Load one patient's PET, CT (and mask), locate and measure its lesions, crop them."""
    pid = task.patient_id
    volumes = {}
    for kind, (path, label, sha256) in task.files.items():
        _check_sha256(path, sha256, patient=pid, file=label)
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

    label_voxels, mask, mask_affine = {}, None, None
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
                measured = _measure_voxels(label_voxels[label], mask_affine, pet, pet_affine, ct, ct_affine)
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
            "hu_mean": measured.hu_mean if measured else math.nan,
        })

    crops, edge = crop_volumes(pet, pet_affine, ct, ct_affine, np.array(centres),
                               task.size_mm, task.spacing_mm, mask=mask, mask_affine=mask_affine,
                               labels=[label for _, label, _ in task.lesions])
    for lesion_stats, flag in zip(stats, edge, strict=True):
        lesion_stats["edge"] = int(flag)
    stored, storage_error = _to_storage(crops, task.dtype, pid, pet_file)
    return _PatientResult(crops=stored, stats=stats, storage_error=storage_error)



# ---------------------------------------------------------------------------------------------
# Storage: float32 or float16 shards, the central planes
# ---------------------------------------------------------------------------------------------


def measure_storage_error(crops: np.ndarray, stored: np.ndarray) -> dict[str, dict[str, float]]:
    """Per channel, how far the ``stored`` crops (e.g. float16) are from the float32 ``crops``.

    Args:
        crops: float32 ``[n, 2, ...]`` as cropped (channel 0 PET in SUV, channel 1 CT in HU).
        stored: the same crops in their storage dtype.

    Returns:
        ``{"pet_suv": {...}, "ct_hu": {...}}``, each with ``max_abs`` (largest
        ``|stored - crop|``, in SUV or HU), ``max_rel`` (largest ``|stored - crop| / |crop|`` over
        voxels with ``|crop| >= REL_ERROR_FLOOR``; below it the absolute error is at most 3e-8)
        and ``max_value`` (largest ``|crop|``).

    >>> crops = np.array([[[0.1, 20.3], [-1000.3, 40.0]]], np.float32)
    >>> error = measure_storage_error(crops, crops.astype(np.float16))
    >>> {k: float(f"{v:.3g}") for k, v in error["pet_suv"].items()}  # 20.3 SUV stored as 20.297
    {'max_abs': 0.00312, 'max_rel': 0.000244, 'max_value': 20.3}
    >>> {k: float(f"{v:.3g}") for k, v in error["ct_hu"].items()}  # -1000.3 HU stored as -1000.5
    {'max_abs': 0.2, 'max_rel': 0.0002, 'max_value': 1000.0}
    """
    record = {}
    for channel, name in enumerate(STORAGE_ERROR_CHANNELS):
        exact = np.asarray(crops[:, channel], dtype=np.float64)
        diff = np.abs(np.asarray(stored[:, channel], dtype=np.float64) - exact)
        magnitude = np.abs(exact)
        normal = magnitude >= REL_ERROR_FLOOR
        record[name] = {
            "max_abs": float(diff.max(initial=0.0)),
            "max_rel": float((diff[normal] / magnitude[normal]).max(initial=0.0)),
            "max_value": float(magnitude.max(initial=0.0)),
        }
    return record


def _combine_storage_errors(records: list[dict]) -> dict[str, dict[str, float]]:
    """The worst of several :func:`measure_storage_error` records, field by field."""
    return {channel: {key: max(r[channel][key] for r in records)
                      for key in ("max_abs", "max_rel", "max_value")}
            for channel in STORAGE_ERROR_CHANNELS}


def _to_storage(crops: np.ndarray, dtype: str, patient: str, file: str
                ) -> tuple[np.ndarray, dict | None]:
    """The crops in the storage dtype and, for float16, their measured error."""
    if dtype == "float32":
        return crops, None
    stored = crops.astype(dtype)
    if not np.isfinite(stored).all():
        raise InputError(f"crop values up to {float(np.abs(crops).max()):.6g} exceed {dtype}'s range "
                         f"({float(np.finfo(dtype).max):g}): crop with --dtype float32",
                         patient=patient, file=file)
    return stored, measure_storage_error(crops, stored)


def _central_plane(crops, view: str):
    """The plane through each crop's centre voxel: ``crops[:, :, D//2]`` (axial),
    ``crops[:, :, :, H//2]`` (coronal) or ``crops[:, :, :, :, W//2]`` (sagittal)."""
    n_d, n_h, n_w = crops.shape[2:]
    if view == "axial":
        return crops[:, :, n_d // 2]
    if view == "coronal":
        return crops[:, :, :, n_h // 2]
    if view == "sagittal":
        return crops[:, :, :, :, n_w // 2]
    raise ValueError(f"view must be 'axial', 'coronal' or 'sagittal', got {view!r}")


def _plane_shape(item_shape: tuple[int, ...], view: str) -> tuple[int, ...]:
    """One lesion's plane shape for a crop of ``item_shape`` = ``(C, D, H, W)``."""
    channels, n_d, n_h, n_w = item_shape
    return {"axial": (channels, n_h, n_w), "coronal": (channels, n_d, n_w),
            "sagittal": (channels, n_d, n_h)}[view]


def shard_name(shard: int, n_shards: int) -> str:
    """The folder of shard ``shard`` of ``n_shards`` under ``CROPS/shards/``.

    >>> shard_name(3, 16)
    '00003-of-00016'
    """
    return f"{shard:05d}-of-{n_shards:05d}"


def _shard_files(shard: int) -> dict[str, str]:
    """A shard's array files: ``volume`` -> ``crops-00003.npy``, each view -> its planes."""
    return {"volume": f"crops-{shard:05d}.npy",
            **{view: f"planes-{view}-{shard:05d}.npy" for view in PLANE_VIEWS}}


def _file_shapes(item_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """One lesion's shape in each of a shard's array files."""
    return {"volume": item_shape, **{view: _plane_shape(item_shape, view) for view in PLANE_VIEWS}}


# ---------------------------------------------------------------------------------------------
# The cohort: shards and their merge
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    """What defines a crop's output (besides the data)."""

    size_mm: float
    spacing_mm: float
    center: str
    dtype: str

    def record(self) -> dict:
        return {"size_mm": self.size_mm, "spacing_mm": self.spacing_mm,
                "center_mode": self.center, "dtype": self.dtype}

    @property
    def item_shape(self) -> tuple[int, ...]:
        return (len(CROP_CHANNELS), *crop_shape(self.size_mm, self.spacing_mm))


def _settings(size_mm: float, spacing_mm: float, center: str, dtype: str) -> _Settings:
    if center not in CENTER_MODES:
        raise InputError(f"center must be one of {', '.join(CENTER_MODES)}, got {center!r}")
    if dtype not in STORAGE_DTYPES:
        raise InputError(f"dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    try:
        crop_shape(size_mm, spacing_mm)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    return _Settings(float(size_mm), float(spacing_mm), center, dtype)


def _open_cohort(manifest_path: str | os.PathLike):
    """(manifest file, cohort, data checksum). Image hashes are checked patient by patient as
    each is cropped, so a shard reads only its own patients' files."""
    from .manifest import data_checksum, load_manifest, manifest_file

    manifest_path = manifest_file(manifest_path).resolve()
    cohort = load_manifest(manifest_path, hash_images=False)
    if len(cohort.lesions) == 0:
        raise InputError("the cohort has no lesions to crop", file=str(manifest_path))
    return manifest_path, cohort, data_checksum(manifest_path)


def _shard_of_rows(cohort, n_shards: int, manifest_path: Path) -> np.ndarray:
    """The shard of each row of the manifest's lesions table: the patients with lesions, in
    patients.csv order, split into ``n_shards`` contiguous groups of sizes differing by <= 1."""
    with_lesions = set(cohort.lesions["patient_id"])
    patients = [pid for pid in cohort.patients["patient_id"] if pid in with_lesions]
    if n_shards > len(patients):
        raise InputError(f"cannot split {len(patients)} patients with lesions into {n_shards} shards "
                         f"(use at most {len(patients)})", file=str(manifest_path))
    shard_of = {}
    for shard, group in enumerate(split_contiguous(len(patients), n_shards)):
        shard_of.update((patients[i], shard) for i in group)
    return cohort.lesions["patient_id"].map(shard_of).to_numpy(dtype=np.int64)


def crop_shard(
    manifest_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    shard: int = 0,
    n_shards: int = 1,
    *,
    size_mm: float = 64.0,
    spacing_mm: float = 2.0,
    center: CenterMode = "centroid",
    dtype: str = "float32",
    workers: int = 2,
    progress: bool = True,
) -> Path:
    """Crop shard ``shard`` of ``n_shards`` of a cohort into ``out_dir/shards/<shard_name>/``.

    The cohort's patients with lesions, in ``patients.csv`` order, are split into ``n_shards``
    contiguous groups whose sizes differ by at most one; a shard crops every lesion of its
    group's patients (a patient is never split), checks those patients' image SHA-256 and
    writes its folder atomically, so shards can run at once on different machines that share
    ``out_dir``. :func:`merge_shards` then makes ``out_dir`` a crops directory.

    Args:
        manifest_path, size_mm, spacing_mm, center, workers, progress: as :func:`crop_cohort`.
        out_dir: the crops directory the shard belongs to (created if missing).
        shard, n_shards: which shard (0 to ``n_shards - 1``) of how many.
        dtype: storage dtype, ``"float32"`` or ``"float16"`` (module docstring).

    Returns:
        The shard's folder.

    Raises:
        InputError: bad settings or shard numbers, more shards than patients, or any error of
            :func:`crop_cohort` for this shard's patients; the shard's folder is then left as
            it was.
    """
    settings = _settings(size_mm, spacing_mm, center, dtype)
    _check_shard(shard, n_shards)
    _check_workers(workers)
    manifest_path, cohort, checksum = _open_cohort(manifest_path)
    return _crop_shard(cohort, checksum, manifest_path, Path(out_dir), shard, n_shards, settings,
                       workers, progress)


def _check_shard(shard: int, n_shards: int) -> None:
    if n_shards < 1 or not 0 <= shard < n_shards:
        raise InputError(f"shard {shard} of {n_shards}: need 0 <= shard < n_shards "
                         "(shards are numbered from 0)")


def _check_workers(workers: int) -> None:
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")


def _crop_shard(cohort, checksum: str, manifest_path: Path, out_dir: Path, shard: int,
                n_shards: int, settings: _Settings, workers: int, progress: bool) -> Path:
    from tqdm.auto import tqdm

    rows = np.flatnonzero(_shard_of_rows(cohort, n_shards, manifest_path) == shard)
    lesions = cohort.lesions.iloc[rows]
    tasks, task_rows = _patient_tasks(cohort, lesions, settings)
    local = {int(row): i for i, row in enumerate(rows)}  # manifest row -> row in this shard
    table = lesions[["patient_id", "lesion_id", "site"]].copy()
    table.insert(0, "index", rows)
    for column in LESION_TABLE_COLUMNS[3:]:
        table[column] = np.nan
    errors = []
    folder = out_dir / SHARDS_DIR / shard_name(shard, n_shards)
    with atomic_dir(folder) as tmp:
        files = {key: tmp / name for key, name in _shard_files(shard).items()}
        for key, shape in _file_shapes(settings.item_shape).items():
            np.lib.format.open_memmap(files[key], mode="w+", dtype=settings.dtype,
                                      shape=(len(rows), *shape)).flush()
        bar = tqdm(total=len(tasks), desc=f"crop {shard_name(shard, n_shards)}", unit="patient",
                   disable=not progress)
        for task, result in zip(tasks, _run_in_order(tasks, workers), strict=True):
            if result.error is not None:
                problem, patient, file = result.error
                raise InputError(problem, patient=patient, file=file)
            patient_rows = task_rows[task.patient_id]
            shard_rows = [local[row] for row in patient_rows]
            _write_rows(files["volume"], shard_rows, result.crops)
            for view in PLANE_VIEWS:
                _write_rows(files[view], shard_rows, _central_plane(result.crops, view))
            if result.storage_error is not None:
                errors.append(result.storage_error)
            for row, lesion_stats in zip(patient_rows, result.stats, strict=True):
                x, y, z = lesion_stats["center_mm"]
                # Rounded for readable tables: 1 um and 0.1 uL / 1e-4 SUV are far below a voxel.
                table.loc[row, list(LESION_TABLE_COLUMNS[3:])] = [
                    round(x, 3), round(y, 3), round(z, 3), round(lesion_stats["volume_ml"], 4),
                    round(lesion_stats["suvmax"], 4), round(lesion_stats["suvmean"], 4),
                    round(lesion_stats["hu_mean"], 2), lesion_stats["edge"]]
            bar.update(1)
        bar.close()
        table["edge"] = table["edge"].astype(int)
        table.to_csv(tmp / SHARD_LESIONS_FILE, index=False)
        meta = {
            "format": SHARD_FORMAT,
            "version": CROPS_VERSION,
            "shard": shard,
            "n_shards": n_shards,
            **settings.record(),
            "item_shape": list(settings.item_shape),
            "n_patients": len(tasks),
            "n_lesions": len(rows),
            "patients": [tasks[0].patient_id, tasks[-1].patient_id],
            "manifest": str(manifest_path),
            "data_checksum": checksum,
            "storage_error": _combine_storage_errors(errors) if errors else None,
            "provenance": provenance(**settings.record(), shard=shard, n_shards=n_shards,
                                     workers=workers),
        }
        (tmp / SHARD_META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return folder


def merge_shards(
    manifest_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    size_mm: float | None = None,
    spacing_mm: float | None = None,
    center: CenterMode | None = None,
    dtype: str | None = None,
) -> Path:
    """Make ``out_dir`` a crops directory from its finished shards, without copying the arrays.

    Reads only each shard's lesion table, ``shard.json`` and array headers (memory grows with
    the lesion table, not the arrays) and writes ``lesions.csv`` (row i = the manifest's lesion
    i, with the ``shard`` and ``row`` that hold its crop), ``patients.csv`` and ``crops.json``
    into ``out_dir``; ``crops.json`` is replaced last, so an interrupted merge leaves no
    directory that loads.

    Args:
        manifest_path: the cohort's manifest (or its folder) the shards were cropped from.
        out_dir: the crops directory holding ``shards/NNNNN-of-NNNNN/`` folders.
        size_mm, spacing_mm, center, dtype: the settings the shards must have been cropped
            with; None takes shard 0's (every shard must agree with it).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        InputError: naming the shard: a missing shard, shards of different splits, a shard
            cropped from another cohort (data checksum), with other settings, holding lesions
            that are not its part of this manifest or another shard's (overlap), or with a
            truncated array; ``out_dir`` is then left as it was.
    """
    given = {"size_mm": size_mm, "spacing_mm": spacing_mm, "center_mode": center, "dtype": dtype}
    requested = {k: float(v) if k.endswith("_mm") else v for k, v in given.items() if v is not None}
    manifest_path, cohort, checksum = _open_cohort(manifest_path)
    return _merge(cohort, checksum, manifest_path, Path(out_dir), requested)


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise InputError(f"{what} is incomplete: {path.name} missing", file=str(path))
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise InputError(f"cannot read JSON ({exc})", file=str(path)) from exc


def _find_shards(shards_dir: Path) -> int:
    """The number of shards the complete set of folders under ``shards_dir`` was split into."""
    if not shards_dir.is_dir():
        raise InputError("no shards to merge: crop them first (psma-pfs crop MANIFEST --out DIR "
                         "--shard i/N for i = 0 .. N-1)", file=str(shards_dir))
    found = set()
    for entry in sorted(shards_dir.iterdir()):
        if entry.name.startswith("."):
            continue  # a shard being written, or left behind by a killed job
        match = re.fullmatch(r"(\d{5})-of-(\d{5})", entry.name)
        if match is None or not entry.is_dir() or int(match[1]) >= int(match[2]):
            raise InputError("not a shard folder (expected NNNNN-of-NNNNN, shard i of N)",
                             file=str(entry))
        found.add((int(match[1]), int(match[2])))
    counts = sorted({n for _, n in found})
    if not counts:
        raise InputError("no shards to merge", file=str(shards_dir))
    if len(counts) > 1:
        raise InputError(f"shards of different splits ({', '.join(f'of {n}' for n in counts)}): "
                         "remove the stale ones or crop every shard again", file=str(shards_dir))
    n_shards = counts[0]
    missing = [i for i in range(n_shards) if (i, n_shards) not in found]
    if missing:
        listed = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise InputError(f"shard {missing[0]} of {n_shards} is missing ({len(missing)} missing: "
                         f"{listed}); crop it with psma-pfs crop MANIFEST --out "
                         f"{shards_dir.parent} --shard {missing[0]}/{n_shards}",
                         file=str(shards_dir / shard_name(missing[0], n_shards)))
    return n_shards


def _merge(cohort, checksum: str, manifest_path: Path, out_dir: Path, requested: dict) -> Path:
    shards_dir = out_dir / SHARDS_DIR
    n_shards = _find_shards(shards_dir)
    expected = _shard_of_rows(cohort, n_shards, manifest_path)
    n_lesions = len(cohort.lesions)
    owner = np.full(n_lesions, -1, dtype=np.int64)
    reference = dict(requested)
    tables, records, errors = [], [], []
    for shard in range(n_shards):
        folder = shards_dir / shard_name(shard, n_shards)
        where = str(folder / SHARD_META_FILE)
        meta = _read_json(folder / SHARD_META_FILE, f"shard {shard} of {n_shards}")
        if meta.get("format") != SHARD_FORMAT or meta.get("version") != CROPS_VERSION:
            raise InputError(f"not a crop shard of format version {CROPS_VERSION}", file=where)
        if (meta.get("shard"), meta.get("n_shards")) != (shard, n_shards):
            raise InputError(f"holds shard {meta.get('shard')} of {meta.get('n_shards')}, not "
                             f"{shard} of {n_shards} as its folder says", file=where)
        if meta.get("data_checksum") != checksum:
            raise InputError(f"shard {shard} was cropped from another cohort or another version of "
                             f"it (data checksum {str(meta.get('data_checksum'))[:12]}..., manifest "
                             f"{manifest_path}: {checksum[:12]}...): crop it again", file=where)
        for key in SETTING_KEYS:
            given = meta.get(key)
            if key not in reference:
                reference[key] = given
            elif given != reference[key]:
                source = "requested" if key in requested else "shard 0's"
                raise InputError(f"shard {shard} was cropped with {key} {given}, not "
                                 f"{reference[key]} ({source})", file=where)
        settings = _settings(reference["size_mm"], reference["spacing_mm"],
                             reference["center_mode"], reference["dtype"])
        if list(settings.item_shape) != reference["item_shape"]:
            raise InputError(f"item_shape {reference['item_shape']} does not match the size and "
                             "spacing", file=where)

        table = _read_shard_table(folder / SHARD_LESIONS_FILE, meta.get("n_lesions"))
        rows = table["index"].to_numpy()
        if rows.min(initial=0) < 0 or rows.max(initial=0) >= n_lesions:
            raise InputError(f"lesion index outside the manifest's {n_lesions} lesions",
                             file=str(folder / SHARD_LESIONS_FILE))
        taken = np.flatnonzero(owner[rows] >= 0)
        if len(taken):
            row = rows[taken[0]]
            raise InputError(f"shard {shard} overlaps shard {owner[row]}: lesion "
                             f"{cohort.lesions.at[row, 'lesion_id']!r} of patient "
                             f"{cohort.lesions.at[row, 'patient_id']} is in both", file=where)
        owner[rows] = shard
        ids = cohort.lesions.iloc[rows][["patient_id", "lesion_id"]].to_numpy()
        if (not np.array_equal(rows, np.flatnonzero(expected == shard))
                or not np.array_equal(table[["patient_id", "lesion_id"]].to_numpy(), ids)):
            raise InputError(f"shard {shard} does not hold its part of this manifest's lesions "
                             f"(split into {n_shards} shards): crop it again", file=where)
        for key, name in _shard_files(shard).items():
            shape, stored = npy_header(folder / name)
            wanted = (len(rows), *_file_shapes(settings.item_shape)[key])
            if shape != wanted or stored != np.dtype(settings.dtype):
                raise InputError(f"array is {stored} {list(shape)}, expected {settings.dtype} "
                                 f"{list(wanted)}", file=str(folder / name))
        table["shard"] = shard
        table["row"] = np.arange(len(table))
        tables.append(table)
        if meta.get("storage_error"):
            errors.append(meta["storage_error"])
        records.append({"name": shard_name(shard, n_shards), "n_patients": meta.get("n_patients"),
                        "n_lesions": len(rows), "meta_sha256": sha256_file(folder / SHARD_META_FILE)})

    merged = pd.concat(tables, ignore_index=True).set_index("index")
    lesion_table = cohort.lesions[["patient_id", "lesion_id", "site"]].copy()
    for column in (*LESION_TABLE_COLUMNS[3:], "shard", "row"):
        lesion_table[column] = merged[column]
    for column in ("edge", "shard", "row"):
        lesion_table[column] = lesion_table[column].astype(int)
    meta = {
        "format": CROPS_FORMAT,
        "version": CROPS_VERSION,
        **settings.record(),
        "shape": [n_lesions, *settings.item_shape],
        "channels": list(CROP_CHANNELS),
        "pad_values": {"pet_suv": PET_PAD_SUV, "ct_hu": CT_PAD_HU, "mask": MASK_PAD},
        "interpolation": "trilinear for PET and CT, each through its own affine; nearest mask "
                         "voxel for the lesion mask, through the mask's affine",
        "orientation": CROP_ORIENTATION,
        "row_order": "row i of lesions.csv is row i of the manifest's lesions.csv; its crop is "
                     "row `row` of shard `shard`",
        "storage": f"{settings.dtype} in shards/NNNNN-of-NNNNN/crops-NNNNN.npy and "
                   "planes-<view>-NNNNN.npy; read as float32",
        "storage_error": _combine_storage_errors(errors) if errors else None,
        "storage_error_note": STORAGE_ERROR_NOTE,
        "planes": list(PLANE_VIEWS),
        "n_shards": n_shards,
        "shards": records,
        "n_patients": len(cohort.patients),
        "n_lesions": n_lesions,
        "n_edge": int(lesion_table["edge"].sum()),
        "manifest": str(manifest_path),
        "data_checksum": checksum,
        "synthetic": bool(cohort.info.get("synthetic", False)),
        "cohort_name": cohort.info.get("name"),
        "provenance": provenance(**settings.record(), n_shards=n_shards),
    }
    _write_merged(out_dir, lesion_table, _patients_table_path(cohort), meta)
    return out_dir


def _read_shard_table(path: Path, n_lesions) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype={"patient_id": str, "lesion_id": str})
    except FileNotFoundError as exc:
        raise InputError("shard is incomplete: lesions.csv missing", file=str(path)) from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read CSV ({exc})", file=str(path)) from exc
    missing = [c for c in ("index", *LESION_TABLE_COLUMNS) if c not in table.columns]
    if missing:
        raise InputError(f"missing column(s): {', '.join(missing)}", file=str(path))
    if not pd.api.types.is_integer_dtype(table["index"]):
        raise InputError("the index column must hold the manifest's lesion rows (integers)",
                         file=str(path))
    if len(table) != n_lesions:
        raise InputError(f"{len(table)} lesions, shard.json says {n_lesions}", file=str(path))
    return table


def _write_merged(out_dir: Path, lesions: pd.DataFrame, patients_file: Path, meta: dict) -> None:
    """Write the merged tables and ``crops.json`` beside the shards; ``crops.json`` (what makes
    the folder load) is withdrawn first and written last."""
    tmp = Path(tempfile.mkdtemp(prefix=".merge.", suffix=".tmp", dir=out_dir))
    try:
        lesions.to_csv(tmp / LESIONS_FILE, index=False)
        shutil.copyfile(patients_file, tmp / PATIENTS_FILE)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        (out_dir / META_FILE).unlink(missing_ok=True)
        for name in (LESIONS_FILE, PATIENTS_FILE, META_FILE):
            os.replace(tmp / name, out_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def crop_cohort(
    manifest_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    size_mm: float = 64.0,
    spacing_mm: float = 2.0,
    center: CenterMode = "centroid",
    workers: int = 2,
    progress: bool = True,
    dtype: str = "float32",
) -> Path:
    """Crop every lesion of a cohort and write a crops directory (see module docstring).

    The same as :func:`crop_shard` for shard 0 of 1 followed by :func:`merge_shards`, with the
    whole directory written atomically.

    Args:
        manifest_path: the cohort's ``manifest.yaml`` (or its folder).
        out_dir: the crops directory to create (replaced atomically if it exists).
        size_mm: crop edge length in mm (same on all three axes).
        spacing_mm: crop voxel spacing in mm; the crop has ``round(size/spacing)`` voxels a side.
        center: ``"centroid"``, ``"suvmax"`` or ``"given"`` (module docstring).
        workers: processes cropping patients in parallel (1 = in this process); the output does
            not depend on it.
        progress: show a tqdm progress bar over patients.
        dtype: storage dtype, ``"float32"`` (exact) or ``"float16"`` (half the bytes; the
            measured error is in ``crops.json``'s ``storage_error``); read back as float32.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        InputError: an invalid manifest, an image that changed since the manifest was written
            (SHA-256), an unreadable or bad image, a missing mask label, or a lesion centre
            outside the PET field of view (naming patient, lesion and file); ``out_dir`` is then
            left as it was.
    """
    settings = _settings(size_mm, spacing_mm, center, dtype)
    _check_workers(workers)
    manifest_path, cohort, checksum = _open_cohort(manifest_path)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        _crop_shard(cohort, checksum, manifest_path, tmp, 0, 1, settings, workers, progress)
        _merge(cohort, checksum, manifest_path, tmp, {})
    return out_dir


def _patient_tasks(cohort, lesions: pd.DataFrame, settings: _Settings
                   ) -> tuple[list[_PatientTask], dict[str, list[int]]]:
    """One task per patient of ``lesions`` (in order of first appearance) and, per patient, the
    manifest rows (``lesions``' index) of its lesions."""
    images = cohort.images.set_index("patient_id")
    tasks, rows = [], {}
    for pid, group in lesions.groupby("patient_id", sort=False):
        pid = str(pid)
        if pid not in images.index:
            raise InputError("patient has lesions but no row in images.csv", patient=pid)
        files = {}
        for kind in ("pet", "ct", "mask"):
            relative = str(images.at[pid, kind] or "")
            if relative:
                files[kind] = (str(cohort.root / relative), relative,
                               str(images.at[pid, f"{kind}_sha256"] or ""))
        task_lesions = []
        for _, lesion in group.iterrows():
            label = None if pd.isna(lesion["mask_label"]) else int(lesion["mask_label"])
            centre = tuple(float(lesion[c]) for c in ("center_x_mm", "center_y_mm", "center_z_mm"))
            task_lesions.append((str(lesion["lesion_id"]), label,
                                 None if any(math.isnan(c) for c in centre) else centre))
        tasks.append(_PatientTask(pid, files, task_lesions, settings.size_mm, settings.spacing_mm,
                                  settings.center, settings.dtype))
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


def _write_rows(array_file: Path, rows: list[int], values: np.ndarray) -> None:
    """Write ``values[i]`` to row ``rows[i]`` of the .npy file, mapping it only for this write
    (so the written pages leave this process's resident memory)."""
    array = np.lib.format.open_memmap(array_file, mode="r+")
    if rows == list(range(rows[0], rows[0] + len(rows))):
        array[rows[0]:rows[0] + len(rows)] = values
    else:
        array[rows] = values
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
        images: float32 ``[n, C, D, H, W]``, read-only: channel 0 PET (SUV), channel 1 CT (HU),
            channel 2 the lesion's mask (format version 3; ``C = 2`` for older directories),
            axes along world (+z, +y, +x). A :class:`~psma_lib.shards.ShardedArray` that reads
            only the rows indexed (stored float32 or float16, returned float32); for a crops
            directory of format version 1, the memory-mapped ``crops.npy``.
        lesions: row i describes ``images[i]`` (``LESION_TABLE_COLUMNS``; ids as str;
            ``suvmean`` is NaN for a crops directory written before it was measured).
        patients: the cohort's patients table (clinical + outcome; ``patient_id`` as str).
        meta: the ``crops.json`` record (size, spacing, orientation, checksum, provenance, ...).
        root: the crops directory it was loaded from.
        plane_arrays: view -> the central planes written at crop time (None: sliced from
            ``images``, as for a version 1 directory).
    """

    images: np.ndarray | ShardedArray
    lesions: pd.DataFrame
    patients: pd.DataFrame
    meta: dict
    root: Path | None = None
    plane_arrays: dict[str, ShardedArray] | None = None

    @property
    def n_lesions(self) -> int:
        return int(self.images.shape[0])

    @property
    def has_mask_channel(self) -> bool:
        """True where the crops carry the lesion-mask channel (format version 3)."""
        return int(self.images.shape[1]) == len(CROP_CHANNELS)

    @property
    def synthetic(self) -> bool:
        """The cohort's own flag, copied into ``crops.json``: True for a generated cohort."""
        return bool(self.meta.get("synthetic", False))

    def planes(self, view: View = "axial") -> np.ndarray:
        """2-D planes through each crop's centre voxel, float32 ``[n, C, H', W']``.

        ``"axial"``: ``images[:, :, D//2]`` -> ``[n, C, H, W]`` (rows +y, columns +x);
        ``"coronal"``: ``images[:, :, :, H//2]`` -> ``[n, C, D, W]`` (rows +z, columns +x);
        ``"sagittal"``: ``images[:, :, :, :, W//2]`` -> ``[n, C, D, H]`` (rows +z, columns +y).
        Read from the plane files written at crop time when there are some (no volume is
        read), else sliced from the volumes.
        """
        if view not in PLANE_VIEWS:
            raise ValueError(f"view must be 'axial', 'coronal' or 'sagittal', got {view!r}")
        if self.plane_arrays is not None:
            return np.asarray(self.plane_arrays[view])
        return np.array(_central_plane(self.images, view), dtype=np.float32)


def load_crops(crops_dir: str | os.PathLike) -> CropSet:
    """Open a crops directory written by :func:`crop_cohort` or :func:`merge_shards` (format
    version 3, or 2 without the mask channel), or a version 1 one (a single ``crops.npy``). Reads the tables, ``crops.json``
    and the arrays' headers, never the arrays' data.

    Raises:
        InputError: a missing file, an unreadable array/table/JSON, shapes that disagree
            (arrays vs ``crops.json`` vs ``lesions.csv``), or a shard changed since the merge.

    >>> import tempfile; from psma_lib.testing import write_tiny_crops
    >>> crop_set = load_crops(write_tiny_crops(Path(tempfile.mkdtemp()), n_patients=6, size=8))
    >>> crop_set.n_lesions == len(crop_set.lesions), crop_set.planes("coronal").shape[1:]
    (True, (2, 8, 8))
    """
    crops_dir = Path(crops_dir)
    if not crops_dir.is_dir():
        raise InputError("crops directory not found", file=str(crops_dir))
    for name in (META_FILE, LESIONS_FILE, PATIENTS_FILE):
        if not (crops_dir / name).is_file():
            raise InputError("crops directory is incomplete: file missing (rerun psma-pfs crop)",
                             file=str(crops_dir / name))
    meta = _read_json(crops_dir / META_FILE, "crops directory")
    version = meta.get("version", 1)
    if version not in CHANNELS_BY_VERSION:
        raise InputError(f"crops directory format version {version!r}: this psma_lib reads "
                         f"versions {', '.join(map(str, CHANNELS_BY_VERSION))}",
                         file=str(crops_dir / META_FILE))
    tables = {}
    for name in (LESIONS_FILE, PATIENTS_FILE):
        try:
            tables[name] = pd.read_csv(crops_dir / name, dtype={"patient_id": str, "lesion_id": str})
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read CSV ({exc})", file=str(crops_dir / name)) from exc
    lesions = tables[LESIONS_FILE]
    for before, column in (("suvmax", "suvmean"), ("suvmean", "hu_mean")):
        if column not in lesions.columns and before in lesions.columns:
            # Crops written before this column was measured: still readable, the value unknown (NaN).
            lesions.insert(lesions.columns.get_loc(before) + 1, column, np.nan)
    missing = [c for c in LESION_TABLE_COLUMNS if c not in lesions.columns]
    if missing:
        raise InputError(f"missing column(s): {', '.join(missing)}", file=str(crops_dir / LESIONS_FILE))
    lesions["site"] = lesions["site"].fillna("").astype(str)
    if version == 1:
        images, planes = _open_version_1(crops_dir, meta, lesions), None
    else:
        images, planes = _open_shards(crops_dir, meta, lesions)
        lesions = lesions.drop(columns=["shard", "row"])
    unknown = sorted(set(lesions["patient_id"]) - set(tables[PATIENTS_FILE]["patient_id"]))
    if unknown:
        raise InputError(f"lesions of patients missing from patients.csv: {', '.join(unknown[:5])}",
                         file=str(crops_dir / PATIENTS_FILE))
    return CropSet(images=images, lesions=lesions, patients=tables[PATIENTS_FILE], meta=meta,
                   root=crops_dir, plane_arrays=planes)


def _open_version_1(crops_dir: Path, meta: dict, lesions: pd.DataFrame) -> np.ndarray:
    """A version 1 directory's single float32 ``crops.npy``, memory-mapped."""
    where = str(crops_dir / LEGACY_CROPS_FILE)
    if not (crops_dir / LEGACY_CROPS_FILE).is_file():
        raise InputError("crops directory is incomplete: file missing (rerun psma-pfs crop)",
                         file=where)
    try:
        images = np.load(crops_dir / LEGACY_CROPS_FILE, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"cannot read crop array ({exc})", file=where) from exc
    if images.dtype != np.float32 or images.ndim != 5 or images.shape[1] != 2:
        raise InputError(f"expected float32 [n, 2, D, H, W], got {images.dtype} {list(images.shape)}",
                         file=where)
    if list(images.shape) != list(meta.get("shape", [])):
        raise InputError(f"array shape {list(images.shape)} disagrees with crops.json shape "
                         f"{meta.get('shape')}", file=where)
    if len(lesions) != images.shape[0]:
        raise InputError(f"{len(lesions)} rows in lesions.csv but {images.shape[0]} crops", file=where)
    return images


def _open_shards(crops_dir: Path, meta: dict, lesions: pd.DataFrame
                 ) -> tuple[ShardedArray, dict[str, ShardedArray]]:
    """The volumes and planes of a version 2 or 3 directory as lazy arrays (headers checked only)."""
    meta_file = str(crops_dir / META_FILE)
    try:
        shape = [int(n) for n in meta["shape"]]
        records = list(meta["shards"])
        stored = np.dtype(meta["dtype"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"crops.json lacks a valid shape, shards or dtype ({exc})",
                         file=meta_file) from exc
    item_shape = tuple(shape[1:])
    channels = CHANNELS_BY_VERSION[meta["version"]]
    if len(item_shape) != 4 or item_shape[0] != channels or stored.name not in STORAGE_DTYPES:
        raise InputError(f"expected [n, {channels}, D, H, W] in {', '.join(STORAGE_DTYPES)} (format "
                         f"version {meta['version']}), crops.json says {stored} {shape}", file=meta_file)
    lesions_file = str(crops_dir / LESIONS_FILE)
    if len(lesions) != shape[0]:
        raise InputError(f"{len(lesions)} rows in lesions.csv but crops.json shape {shape}",
                         file=lesions_file)
    if not {"shard", "row"} <= set(lesions.columns) or not all(
            pd.api.types.is_integer_dtype(lesions[c]) for c in ("shard", "row")):
        raise InputError("lesions.csv needs integer shard and row columns", file=lesions_file)
    shard, row = lesions["shard"].to_numpy(np.int64), lesions["row"].to_numpy(np.int64)
    counts = np.array([int(r["n_lesions"]) for r in records], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    inside = (shard >= 0) & (shard < len(records))
    inside[inside] &= (row[inside] >= 0) & (row[inside] < counts[shard[inside]])
    if not inside.all() or len(np.unique(offsets[shard] + row)) != len(lesions) \
            or offsets[-1] != len(lesions):
        raise InputError("shard and row columns do not map each lesion to its own row of the "
                         "shards listed in crops.json", file=lesions_file)
    files: dict[str, list[Path]] = {key: [] for key in ("volume", *PLANE_VIEWS)}
    file_shapes = _file_shapes(item_shape)
    for index, record in enumerate(records):
        folder = crops_dir / SHARDS_DIR / str(record["name"])
        shard_meta = folder / SHARD_META_FILE
        if not shard_meta.is_file() or sha256_file(shard_meta) != record.get("meta_sha256"):
            raise InputError("shard missing or cropped again since the merge: merge again "
                             "(psma-pfs crop MANIFEST --out DIR --merge)", file=str(shard_meta))
        for key, name in _shard_files(index).items():
            path = folder / name
            found, dtype = npy_header(path)
            if found != (int(counts[index]), *file_shapes[key]) or dtype != stored:
                raise InputError(f"array {dtype} {list(found)} disagrees with crops.json ({stored} "
                                 f"{[int(counts[index]), *file_shapes[key]]})", file=str(path))
            files[key].append(path)
    images = ShardedArray(files["volume"], shard, row, item_shape)
    planes = {view: ShardedArray(files[view], shard, row, file_shapes[view]) for view in PLANE_VIEWS}
    return images, planes


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _cli_crop(args: argparse.Namespace) -> int:
    if args.merge:
        out = merge_shards(args.manifest, args.out, size_mm=args.size_mm,
                           spacing_mm=args.spacing_mm, center=args.center, dtype=args.dtype)
        crop_set = load_crops(out)
        print(f"merged {crop_set.meta['n_shards']} shard(s): {crop_set.n_lesions} crops "
              f"{crop_set.meta['shape'][1:]} in {out}")
        _print_storage_error(crop_set.meta)
        return 0
    settings = dict(size_mm=64.0 if args.size_mm is None else args.size_mm,
                    spacing_mm=2.0 if args.spacing_mm is None else args.spacing_mm,
                    center=args.center or "centroid", dtype=args.dtype or "float32",
                    workers=args.workers, progress=not args.no_progress)
    if args.shard is not None:
        shard, n_shards = parse_shard(args.shard)
        folder = crop_shard(args.manifest, args.out, shard, n_shards, **settings)
        meta = json.loads((folder / SHARD_META_FILE).read_text())
        print(f"wrote shard {shard} of {n_shards} ({meta['n_lesions']} crops of "
              f"{meta['n_patients']} patient(s)) to {folder}; once every shard is done: "
              f"psma-pfs crop {args.manifest} --out {args.out} --merge")
        _print_storage_error(meta)
        return 0
    out = crop_cohort(args.manifest, args.out, **settings)
    crop_set = load_crops(out)
    meta = crop_set.meta
    print(f"wrote {crop_set.n_lesions} crops {meta['shape'][1:]} ({meta['size_mm']:g} mm at "
          f"{meta['spacing_mm']:g} mm, centre: {meta['center_mode']}, {meta['dtype']}; "
          f"{meta['n_edge']} padded at a field-of-view edge) to {out}")
    _print_storage_error(meta)
    return 0


def _print_storage_error(meta: dict) -> None:
    error = meta.get("storage_error")
    if error:
        pet, ct = error["pet_suv"], error["ct_hu"]
        print(f"{meta['dtype']} storage error (measured): PET max {pet['max_abs']:.3g} SUV "
              f"(relative {pet['max_rel']:.2g}), CT max {ct['max_abs']:.3g} HU "
              f"(relative {ct['max_rel']:.2g})")


def register_cli(subparsers) -> None:
    """Add ``psma-pfs crop MANIFEST --out DIR [--size-mm 64] [--spacing-mm 2] [--center ...]
    [--dtype float32|float16] [--shard i/N | --merge]``."""
    parser = subparsers.add_parser(
        "crop", help="crop every lesion of a cohort from PET and CT in world coordinates",
        description="Sample a fixed-size cube around each lesion from PET (SUV) and CT (HU), each "
                    "through its own affine, with the lesion's own mask as a third channel, and "
                    "write the crops directory --out (atomically): "
                    "lesions.csv, patients.csv, crops.json and shards/ with the crops and their "
                    "central planes. On a cluster, crop --shard i/N for i = 0 .. N-1 (each "
                    "writes its own shard, e.g. one SLURM array task each), then --merge.")
    parser.add_argument("manifest", help="the cohort's manifest.yaml or its folder")
    parser.add_argument("--out", required=True, help="crops directory to write")
    parser.add_argument("--size-mm", type=float, default=None, help="crop edge length in mm (64)")
    parser.add_argument("--spacing-mm", type=float, default=None, help="crop voxel spacing in mm (2)")
    parser.add_argument("--center", choices=CENTER_MODES, default=None,
                        help="lesion centre: mask centroid (default), SUVmax voxel, or the "
                             "manifest's world centre")
    parser.add_argument("--dtype", choices=STORAGE_DTYPES, default=None,
                        help="storage: float32 (default, exact) or float16 (half the bytes; the "
                             "measured error is printed and kept in crops.json)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--shard", metavar="i/N", default=None,
                       help="crop only shard i of N (0 <= i < N): a contiguous 1/N of the "
                            "patients, into DIR/shards/")
    split.add_argument("--merge", action="store_true",
                       help="combine the finished shards in --out into the crops directory "
                            "(no array is copied); settings given must match the shards'")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_cli_crop)
