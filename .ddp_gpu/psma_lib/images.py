"""Load PET, CT and lesion-mask NIfTI volumes with their affines, refusing bad files clearly.

Every problem becomes one :class:`~psma_lib.errors.InputError` naming the patient and the file,
e.g. ``patient P007: file images/P007_pet.nii.gz: PET contains 12 NaN voxel(s)``.

Conventions (docs/ARCHITECTURE.md): the affine maps voxel indices ``(i, j, k)`` to nibabel's
RAS+ world millimetres, ``affine @ [i, j, k, 1] = [x, y, z, 1]``.

Negative PET values. A PET volume in SUV is physically non-negative, but reconstruction and
resampling can leave tiny negative voxels (noise around zero in air, rounding, interpolation
overshoot). Values in ``[-NEGATIVE_SUV_TOLERANCE, 0)`` are therefore clipped to 0; anything more
negative (or NaN/inf) means wrong units, a CT given as PET, or a broken file, and is an error.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Literal

import nibabel as nib
import numpy as np

from .errors import InputError

ImageKind = Literal["pet", "ct", "mask"]

#: PET voxels down to this many SUV below zero are reconstruction noise and are clipped to 0;
#: lower values are refused (the soft-tissue background is ~0.3-1 SUV, so -0.05 is not data).
NEGATIVE_SUV_TOLERANCE = 0.05

_KINDS = ("pet", "ct", "mask")
# Exceptions nibabel, gzip and numpy raise on a corrupt, truncated or non-NIfTI file.
_READ_ERRORS = (
    nib.filebasedimages.ImageFileError,
    gzip.BadGzipFile,
    zlib.error,
    EOFError,
    OSError,
    ValueError,
    TypeError,
    MemoryError,
)


def load_image(
    path: str | os.PathLike,
    *,
    patient: str | None = None,
    kind: ImageKind = "pet",
    label: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read one NIfTI volume and its voxel-to-world affine, checking it is usable.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        patient: patient id, only used to name the patient in error messages.
        kind: ``"pet"`` (SUV), ``"ct"`` (HU) or ``"mask"`` (integer lesion labels, 0 = background).
        label: how to name the file in error messages (default: ``path`` as given), e.g. the
            path relative to the manifest.

    Returns:
        ``(data, affine)``: ``data`` of shape ``(I, J, K)`` in voxel order, ``float32`` for PET
        and CT, ``int32`` for a mask; ``affine`` float64 ``(4, 4)``, voxel -> RAS+ mm.

    Raises:
        InputError: missing file; unreadable, corrupt or truncated NIfTI; not 3-D (trailing
        singleton dimensions are squeezed first); non-finite or singular affine; NaN/inf
        voxels; PET below ``-NEGATIVE_SUV_TOLERANCE`` SUV; mask with non-integer or negative
        labels.

    >>> from psma_lib.testing import tiny_cohort
    >>> pet, affine = load_image(tiny_cohort().parent / "images" / "SYN001_pet.nii.gz", patient="SYN001")
    >>> pet.ndim, pet.dtype, affine.shape
    (3, dtype('float32'), (4, 4))
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    path = Path(path)
    name = label if label is not None else str(path)

    def fail(problem: str) -> InputError:
        return InputError(problem, patient=patient, file=name)

    if not path.is_file():
        raise fail(f"{kind.upper()} file not found" if not path.exists() else "not a regular file")
    try:
        image = nib.load(str(path), mmap=False)  # read into memory: no map left on the file
        affine = np.asarray(image.affine, dtype=np.float64)
        # dataobj applies the NIfTI scl_slope/scl_inter scaling; reading it forces the whole
        # (possibly truncated) gzip stream to be decoded here, inside the try.
        raw = np.asanyarray(image.dataobj)
    except _READ_ERRORS as exc:
        raise fail(f"cannot read NIfTI image ({type(exc).__name__}: {exc})") from exc

    while raw.ndim > 3 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    if raw.ndim != 3:
        raise fail(f"expected a 3-D volume, got shape {tuple(raw.shape)}")
    if min(raw.shape) < 1:
        raise fail(f"empty volume of shape {tuple(raw.shape)}")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise fail("affine contains NaN or infinite values")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise fail("affine is singular (zero voxel size or collapsed axes)")

    if kind == "mask":
        return _as_label_map(raw, fail), affine

    data = np.asarray(raw, dtype=np.float32)
    n_bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if n_bad:
        raise fail(f"{kind.upper()} contains {n_bad} NaN or infinite voxel(s)")
    if kind == "pet":
        data = _clip_small_negative_suv(data, fail)
    return data, affine


def _clip_small_negative_suv(pet: np.ndarray, fail) -> np.ndarray:
    """Clip reconstruction noise in ``[-tolerance, 0)`` to 0; refuse clearly negative SUV."""
    lowest = float(pet.min())
    if lowest < -NEGATIVE_SUV_TOLERANCE:
        n_negative = int(np.count_nonzero(pet < -NEGATIVE_SUV_TOLERANCE))
        raise fail(
            f"PET has {n_negative} voxel(s) below -{NEGATIVE_SUV_TOLERANCE} SUV (minimum "
            f"{lowest:.4g}); SUV cannot be negative: wrong units or not a PET image?"
        )
    if lowest < 0:
        pet = np.maximum(pet, 0, out=pet if pet.flags.writeable else None)
    return pet


def _as_label_map(raw: np.ndarray, fail) -> np.ndarray:
    """Integer label map (int32) from a mask array, refusing fractional or negative labels."""
    if np.issubdtype(raw.dtype, np.integer) or raw.dtype == bool:
        labels = np.asarray(raw, dtype=np.int64)
    else:
        values = np.asarray(raw, dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise fail("mask contains NaN or infinite voxels")
        labels = np.rint(values)
        if np.any(np.abs(values - labels) > 1e-3):
            raise fail("mask has non-integer labels (expected 0 = background, k = lesion k)")
        labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise fail(f"mask has negative label {int(labels.min())}")
    if labels.max() > np.iinfo(np.int32).max:
        raise fail(f"mask label {int(labels.max())} is too large")
    return labels.astype(np.int32)


def image_bounds_mm(shape: tuple[int, ...], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World bounding box (RAS+ mm) of a volume's field of view, voxel edges included.

    The box encloses the 8 outer corners of the volume, i.e. voxel indices ``-0.5`` and
    ``n - 0.5`` on each axis pushed through the affine, so it is exact for axis-aligned
    affines and a tight enclosing box for oblique ones.

    Args:
        shape: the volume's shape ``(I, J, K)`` (extra trailing entries are ignored).
        affine: ``(4, 4)`` voxel -> world matrix.

    Returns:
        ``(lower, upper)``: two float64 arrays ``(3,)`` of (x, y, z) in mm.

    >>> lo, hi = image_bounds_mm((10, 20, 5), np.diag([2.0, -1.0, 3.0, 1.0]))
    >>> lo.tolist(), hi.tolist()
    ([-1.0, -19.5, -1.5], [19.0, 0.5, 13.5])
    """
    shape = tuple(int(n) for n in shape[:3])
    edges = [(-0.5, n - 0.5) for n in shape]
    corners = np.array([[i, j, k, 1.0] for i in edges[0] for j in edges[1] for k in edges[2]])
    world = corners @ np.asarray(affine, dtype=np.float64).T
    return world[:, :3].min(axis=0), world[:, :3].max(axis=0)


def bounds_overlap_mm(
    bounds_a: tuple[np.ndarray, np.ndarray], bounds_b: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """Extent (mm, per x/y/z, clipped at 0) of the intersection of two world bounding boxes.

    Two fields of view overlap when every entry is positive.

    >>> box = (np.zeros(3), np.full(3, 10.0))
    >>> bounds_overlap_mm(box, (np.full(3, 4.0), np.full(3, 20.0))).tolist()
    [6.0, 6.0, 6.0]
    """
    lower = np.maximum(bounds_a[0], bounds_b[0])
    upper = np.minimum(bounds_a[1], bounds_b[1])
    return np.clip(upper - lower, 0.0, None)
