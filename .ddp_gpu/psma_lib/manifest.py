"""The cohort manifest: write it, load it, validate it (``psma-pfs validate``).

A cohort directory (docs/ARCHITECTURE.md, "Cohort directory") holds ``manifest.yaml`` and three
tables beside it::

    COHORT/manifest.yaml   format, version, cohort info, SHA-256 of each table
    COHORT/patients.csv    patient_id + clinical columns + pfs_months (months), event (0/1)
    COHORT/images.csv      patient_id, pet, ct, mask paths (relative to COHORT) + their SHA-256
    COHORT/lesions.csv     patient_id, lesion_id, mask_label and/or world centre (RAS+ mm), site

Every later stage starts from :func:`load_manifest`, which checks the tables cheaply and raises
:class:`~psma_lib.errors.ValidationFailed` listing every problem; :func:`validate_manifest` also
opens every image (patient by patient) and returns the full list of problems.

>>> from psma_lib.testing import tiny_cohort
>>> cohort = load_manifest(tiny_cohort())
>>> len(cohort.patients), cohort.synthetic, validate_manifest(tiny_cohort())
(2, True, [])
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from .errors import InputError, ValidationFailed, format_problem
from .io import atomic_path, sha256_file, write_csv
from .vocabulary import CLINICAL_COLUMNS, OUTCOME_COLUMNS, SITES, TREATMENT_COLUMNS

MANIFEST_NAME = "manifest.yaml"
MANIFEST_FORMAT = "psma-pfs-manifest"
MANIFEST_VERSION = 1

TABLE_NAMES = ("patients", "images", "lesions")

PATIENT_COLUMNS = ("patient_id", *CLINICAL_COLUMNS, *OUTCOME_COLUMNS)
IMAGE_KINDS = ("pet", "ct", "mask")
_KIND_NAMES = {"pet": "PET", "ct": "CT", "mask": "mask"}
IMAGE_COLUMNS = ("patient_id", "pet", "pet_sha256", "ct", "ct_sha256", "mask", "mask_sha256")
CENTER_COLUMNS = ("center_x_mm", "center_y_mm", "center_z_mm")
LESION_COLUMNS = ("patient_id", "lesion_id", "mask_label", *CENTER_COLUMNS, "site")

TABLE_COLUMNS = {"patients": PATIENT_COLUMNS, "images": IMAGE_COLUMNS, "lesions": LESION_COLUMNS}
TABLE_FILES = {name: f"{name}.csv" for name in TABLE_NAMES}

#: Allowed clinical values: (low, high) inclusive, ``integer`` = must be a whole number.
CLINICAL_RANGES: dict[str, tuple[float, float, bool]] = {
    "age": (18, 110, False),
    "bmi": (10, 70, False),
    "ecog": (0, 4, True),
    "psa": (0, math.inf, False),
    "gleason": (6, 10, True),
    **{name: (0, 1, True) for name in TREATMENT_COLUMNS},
}

# Columns stored as nullable integers so that CSVs read "1", not "1.0".
_INTEGER_COLUMNS = ("ecog", "gleason", *TREATMENT_COLUMNS, "event", "mask_label")
# Two affines describe the same grid when they agree to this many mm (float32 NIfTI headers).
_AFFINE_TOLERANCE_MM = 1e-3


@dataclass
class Cohort:
    """A loaded cohort manifest.

    Attributes:
        root: the manifest's folder; every path in ``images`` is relative to it.
        info: the manifest's ``cohort`` mapping (``name``, ``synthetic``, ``description``, ...).
        patients: one row per patient, ``PATIENT_COLUMNS`` (clinical as float with NaN for
            missing, ``pfs_months`` float months, ``event`` int 0/1).
        images: one row per patient, ``IMAGE_COLUMNS`` as strings (``mask`` is ``""`` if absent).
        lesions: one row per lesion, ``LESION_COLUMNS`` (``mask_label`` nullable Int64, centres
            float mm with NaN if absent, ``site`` ``""`` if unknown).
        path: the ``manifest.yaml`` file.
    """

    root: Path
    info: dict
    patients: pd.DataFrame
    images: pd.DataFrame
    lesions: pd.DataFrame
    path: Path
    checksum: str = field(default="")

    @property
    def synthetic(self) -> bool:
        """True for a generated cohort, False for real patients."""
        return bool(self.info.get("synthetic", False))

    def image_path(self, patient_id: str, kind: str) -> Path | None:
        """Absolute path of a patient's ``"pet"``, ``"ct"`` or ``"mask"`` (None if no mask)."""
        row = self.images.loc[self.images["patient_id"] == patient_id]
        if row.empty:
            raise KeyError(f"patient {patient_id} has no row in images.csv")
        relative = row.iloc[0][kind]
        return self.root / relative if relative else None


def manifest_file(path: str | os.PathLike) -> Path:
    """``path`` itself, or ``path/manifest.yaml`` when ``path`` is a cohort folder."""
    path = Path(path)
    return path / MANIFEST_NAME if path.is_dir() else path


def data_checksum(path: str | os.PathLike) -> str:
    """One SHA-256 identifying a cohort's data: the hash of ``manifest.yaml``'s bytes.

    The manifest pins each table's SHA-256 and ``images.csv`` pins each image's, so any change to
    any file of the cohort changes this checksum (once the manifest is rewritten; a stale
    manifest is caught by :func:`validate_manifest`).
    """
    path = manifest_file(path)
    if not path.is_file():
        raise InputError("manifest not found", file=str(path))
    return sha256_file(path)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_manifest(
    root: str | os.PathLike,
    patients: pd.DataFrame,
    images: pd.DataFrame,
    lesions: pd.DataFrame,
    info: dict,
) -> Path:
    """Write ``patients.csv``, ``images.csv``, ``lesions.csv`` and ``manifest.yaml`` into ``root``.

    Args:
        root: the cohort folder (created if needed); image paths are relative to it.
        patients: ``PATIENT_COLUMNS`` (extra columns are kept after them).
        images: ``patient_id, pet, ct[, mask]``, paths relative to ``root``; the ``*_sha256``
            columns are computed here from the files (which must already exist).
        lesions: ``LESION_COLUMNS`` (``mask_label`` or all three centre columns per lesion).
        info: the ``cohort`` section: ``name``, ``synthetic`` (bool), ``description`` and any
            other provenance (``seed``, ``signal``, ...). Must be YAML-serialisable.

    Returns:
        The path of ``manifest.yaml``.

    Raises:
        ValidationFailed: the tables break the contract (missing columns, duplicate ids, values
            out of range, missing image files, paths escaping ``root``, ...); nothing is written.

    >>> import shutil, tempfile; from psma_lib.testing import tiny_cohort
    >>> root = Path(tempfile.mkdtemp()) / "cohort"
    >>> _ = shutil.copytree(tiny_cohort().parent / "images", root / "images")
    >>> c = load_manifest(tiny_cohort())
    >>> manifest = write_manifest(root, c.patients, c.images[["patient_id", "pet", "ct", "mask"]],
    ...                           c.lesions, {"name": "demo", "synthetic": True, "description": "toy"})
    >>> manifest.name, len(load_manifest(manifest).lesions) == len(c.lesions)
    ('manifest.yaml', True)
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tables = {
        "patients": _ordered(patients, PATIENT_COLUMNS),
        "images": _ordered(_with_image_hashes(root, images), IMAGE_COLUMNS),
        "lesions": _ordered(lesions, LESION_COLUMNS),
    }
    # The hashes were just computed from the files, so only paths and values need checking.
    info = _plain(info)
    problems = _info_problems(info, "cohort info") + _check_tables(root, tables, hash_images=False)
    if problems:
        raise ValidationFailed(problems, what=f"cohort {root}")

    entries = {}
    for name, table in tables.items():
        target = root / TABLE_FILES[name]
        write_csv(target, table)
        entries[name] = {"path": TABLE_FILES[name], "sha256": sha256_file(target)}
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "cohort": info,
        "tables": entries,
    }
    path = root / MANIFEST_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def _with_image_hashes(root: Path, images: pd.DataFrame) -> pd.DataFrame:
    """Copy of ``images`` with ``pet_sha256``, ``ct_sha256``, ``mask_sha256`` from the files."""
    images = images.copy()
    if "mask" not in images.columns:
        images["mask"] = ""
    for kind in IMAGE_KINDS:
        if kind not in images.columns:
            continue
        hashes = []
        for relative in images[kind].map(_text):
            target = _inside(root, relative) if relative else None
            hashes.append(sha256_file(target) if target is not None and target.is_file() else "")
        images[f"{kind}_sha256"] = hashes
    return images


def _ordered(table: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """Contract columns first (in contract order), extra columns after; integers as Int64."""
    columns = list(columns)
    ordered = [c for c in columns if c in table.columns]
    extra = [c for c in table.columns if c not in columns]
    table = table[ordered + extra].copy()
    for column in _INTEGER_COLUMNS:
        if column in table.columns:
            numeric = pd.to_numeric(table[column], errors="coerce")
            whole = numeric.dropna()
            if len(whole) == table[column].notna().sum() and np.all(whole == np.round(whole)):
                table[column] = numeric.astype("Int64")
    return table


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_manifest(path: str | os.PathLike) -> Cohort:
    """Load a cohort, checking the manifest and tables (not the images) first.

    Args:
        path: ``manifest.yaml`` or the cohort folder holding it.

    Returns:
        A :class:`Cohort` with typed tables (see its attributes).

    Raises:
        ValidationFailed: every problem :func:`validate_manifest` finds with
            ``check_images=False`` (tables, columns, ids, values, file paths and hashes).
    """
    path = manifest_file(path)
    problems, manifest, tables = _read_and_check(path)
    if problems:
        raise ValidationFailed(problems, what=f"manifest {path}")
    patients = tables["patients"].copy()
    for column in (*CLINICAL_COLUMNS, "pfs_months"):
        patients[column] = pd.to_numeric(patients[column]).astype(float)
    patients["event"] = pd.to_numeric(patients["event"]).astype(int)
    lesions = tables["lesions"].copy()
    lesions["mask_label"] = pd.to_numeric(lesions["mask_label"]).astype("Int64")
    for column in CENTER_COLUMNS:
        lesions[column] = pd.to_numeric(lesions[column]).astype(float)
    return Cohort(
        root=path.parent,
        info=dict(manifest.get("cohort") or {}),
        patients=patients.reset_index(drop=True),
        images=tables["images"].reset_index(drop=True),
        lesions=lesions.reset_index(drop=True),
        path=path,
        checksum=sha256_file(path),
    )


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def validate_manifest(
    path: str | os.PathLike, check_images: bool = True, *, progress: bool = False
) -> list[str]:
    """Every problem of a cohort manifest, each naming the patient and/or file; ``[]`` if fine.

    Checks the manifest (readable YAML, format, version, table entries, table SHA-256), the
    tables (columns, duplicate/unknown ids, clinical ranges, outcome, lesion definitions, sites),
    every image path (inside the cohort folder after resolving symlinks, existing, SHA-256) and,
    with ``check_images``, the images themselves, one patient at a time: readable 3-D NIfTI,
    no NaN or negative SUV, PET and CT overlapping in world space, mask on the PET grid, every
    ``mask_label`` present in the mask, every lesion centre inside the PET field of view.

    Args:
        path: ``manifest.yaml`` or the cohort folder.
        check_images: also open the images (slow: reads every volume once).
        progress: show a tqdm bar over patients for the image checks.

    >>> import shutil, tempfile; from psma_lib.testing import tiny_cohort
    >>> root = Path(shutil.copytree(tiny_cohort().parent, Path(tempfile.mkdtemp()) / "cohort"))
    >>> (root / "images" / "SYN002_ct.nii.gz").unlink()
    >>> validate_manifest(root)
    ['patient SYN002: file images/SYN002_ct.nii.gz: CT file not found']
    """
    path = manifest_file(path)
    problems, _, tables = _read_and_check(path)
    if check_images and tables:
        problems += _check_images(path.parent, tables, progress=progress)
    return problems


def _read_and_check(path: Path) -> tuple[list[str], dict, dict]:
    """Read manifest + tables and check them; returns (problems, manifest, tables)."""
    where = str(path)
    if not path.is_file():
        return [format_problem("manifest not found", file=where)], {}, {}
    try:
        manifest = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
        return [format_problem(f"manifest is not readable YAML ({exc})", file=where)], {}, {}
    if not isinstance(manifest, dict):
        return [format_problem("manifest is not a YAML mapping", file=where)], {}, {}
    if manifest.get("format") != MANIFEST_FORMAT:
        problem = f"format is {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}"
        return [format_problem(problem, file=where)], manifest, {}
    if manifest.get("version") != MANIFEST_VERSION:
        problem = f"version is {manifest.get('version')!r}, expected {MANIFEST_VERSION}"
        return [format_problem(problem, file=where)], manifest, {}
    problems = _info_problems(manifest.get("cohort"), where)

    root = path.parent
    entries = manifest.get("tables")
    if not isinstance(entries, dict):
        entries = {}
    tables = {}
    for name in TABLE_NAMES:
        table, table_problems = _read_table(root, name, entries.get(name), where)
        problems += table_problems
        if table is not None:
            tables[name] = table
    if len(tables) < len(TABLE_NAMES):
        # Cross-table checks need all three tables; report what was found so far.
        return problems, manifest, {}
    problems += _check_tables(root, tables)
    return problems, manifest, tables


def _info_problems(info, where: str) -> list[str]:
    """The ``cohort`` section must be a mapping with a boolean ``synthetic``."""
    if not isinstance(info, dict):
        return [format_problem("'cohort' section missing or not a mapping", file=where)]
    if not isinstance(info.get("synthetic"), bool):
        return [format_problem("cohort.synthetic must be true or false", file=where)]
    return []


def _read_table(root: Path, name: str, entry, where: str) -> tuple[pd.DataFrame | None, list[str]]:
    """Read one table named in the manifest, checking its entry, path and SHA-256."""
    if not isinstance(entry, dict) or not entry.get("path"):
        return None, [format_problem(f"table '{name}' missing from the manifest", file=where)]
    relative = str(entry["path"])
    target = _inside(root, relative)
    if target is None:
        return None, [format_problem(f"table '{name}' path escapes the cohort folder", file=relative)]
    if not target.is_file():
        return None, [format_problem(f"table '{name}' file not found", file=relative)]
    problems = []
    expected = str(entry.get("sha256") or "")
    actual = sha256_file(target)
    if expected != actual:
        problems.append(format_problem(
            f"SHA-256 mismatch (manifest {expected[:12] or 'empty'}..., file {actual[:12]}...):"
            " the table changed after the manifest was written", file=relative))
    try:
        # Everything as text: ids stay strings, and value checks see exactly what was written.
        table = pd.read_csv(target, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        return None, [*problems, format_problem(f"cannot read CSV ({exc})", file=relative)]
    missing = [c for c in TABLE_COLUMNS[name] if c not in table.columns]
    if name == "images" and "mask" not in table.columns:
        # The mask columns are optional as a pair.
        missing = [c for c in missing if c not in ("mask", "mask_sha256")]
        table["mask"] = ""
        table["mask_sha256"] = ""
    if missing:
        problems.append(format_problem(f"missing column(s): {', '.join(missing)}", file=relative))
        return None, problems
    return _as_text(table), problems


def _check_tables(root: Path, tables: dict[str, pd.DataFrame], *, hash_images: bool = True
                  ) -> list[str]:
    """Table-level problems (columns, ids, values, paths); tables may hold text or numbers."""
    tables = {name: _as_text(table) for name, table in tables.items()}
    problems = []
    for name in TABLE_NAMES:
        missing = [c for c in TABLE_COLUMNS[name] if c not in tables[name].columns]
        if missing:
            problems.append(format_problem(f"missing column(s): {', '.join(missing)}",
                                           file=TABLE_FILES[name]))
    if problems:
        return problems
    patients, images, lesions = tables["patients"], tables["images"], tables["lesions"]
    problems += patient_table_problems(patients)
    known = set(patients["patient_id"]) - {""}
    problems += _check_images_table(root, images, known, hash_images=hash_images)
    problems += _check_lesions(lesions, known, images)
    return problems


def patient_table_problems(patients: pd.DataFrame, file: str = TABLE_FILES["patients"]) -> list[str]:
    """Problems of a patients table (ids, clinical ranges, outcome), each naming patient and file.

    Args:
        patients: ``PATIENT_COLUMNS`` as text or numbers (missing clinical values allowed).
        file: how to name the table in messages.

    >>> row = dict.fromkeys(PATIENT_COLUMNS, "") | {"patient_id": "P1", "pfs_months": -2, "event": 1}
    >>> patient_table_problems(pd.DataFrame([row]))
    ['patient P1: file patients.csv: pfs_months = -2 must be a positive time in months']
    """
    patients = _as_text(patients)
    missing = [c for c in PATIENT_COLUMNS if c not in patients.columns]
    if missing:
        return [format_problem(f"missing column(s): {', '.join(missing)}", file=file)]
    if patients.empty:
        return [format_problem("no patients", file=file)]
    problems = []
    ids = patients["patient_id"]
    for row in np.flatnonzero(ids == ""):
        problems.append(format_problem(f"row {row + 2}: empty patient_id", file=file))
    for pid in sorted(set(ids[ids.duplicated() & (ids != "")])):
        problems.append(format_problem(
            f"duplicate patient_id ({int((ids == pid).sum())} rows)", patient=pid, file=file))
    for _, row in patients.iterrows():
        pid = row["patient_id"] or "?"
        for column, (low, high, integer) in CLINICAL_RANGES.items():
            text = row[column]
            if text == "":
                continue  # missing clinical values are allowed
            problem = _check_number(column, text, low, high, integer)
            if problem:
                problems.append(format_problem(problem, patient=pid, file=file))
        time = row["pfs_months"]
        if time == "":
            problems.append(format_problem("pfs_months is missing", patient=pid, file=file))
        else:
            value = _number(time)
            if value is None:
                problems.append(format_problem(f"pfs_months = {time!r} is not a number",
                                               patient=pid, file=file))
            elif not value > 0 or not math.isfinite(value):
                problems.append(format_problem(
                    f"pfs_months = {time} must be a positive time in months", patient=pid, file=file))
        event = row["event"]
        if _number(event) not in (0.0, 1.0):
            shown = repr(event) if event else "missing"
            problems.append(format_problem(f"event = {shown} must be 0 (censored) or 1 (progression)",
                                           patient=pid, file=file))
    return problems


def _check_number(column: str, text: str, low: float, high: float, integer: bool) -> str | None:
    value = _number(text)
    if value is None or not math.isfinite(value):
        return f"{column} = {text!r} is not a number"
    if integer and value != round(value):
        return f"{column} = {text} is not a whole number"
    if not low <= value <= high:
        span = f"[{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
        return f"{column} = {text} is outside {span}"
    return None


def _check_images_table(root: Path, images: pd.DataFrame, known: set[str], *,
                        hash_images: bool) -> list[str]:
    problems = []
    file = TABLE_FILES["images"]
    ids = images["patient_id"]
    for pid in sorted(set(ids[ids.duplicated()])):
        problems.append(format_problem("more than one row in images.csv", patient=pid, file=file))
    for pid in sorted(set(ids) - known):
        problems.append(format_problem("patient in images.csv but not in patients.csv",
                                       patient=pid or "?", file=file))
    for pid in sorted(known - set(ids)):
        problems.append(format_problem("patient has no row in images.csv", patient=pid, file=file))
    for _, row in images.iterrows():
        pid = row["patient_id"] or "?"
        for kind in IMAGE_KINDS:
            relative = row[kind]
            if relative == "":
                if kind != "mask":
                    problems.append(format_problem(f"{_KIND_NAMES[kind]} path is empty",
                                                   patient=pid, file=file))
                continue
            target = _inside(root, relative)
            if target is None:
                problems.append(format_problem(
                    f"{_KIND_NAMES[kind]} path escapes the cohort folder (absolute, '..' or a"
                    " symlink pointing outside); copy the file into the cohort",
                    patient=pid, file=relative))
            elif not target.is_file():
                problems.append(format_problem(f"{_KIND_NAMES[kind]} file not found",
                                               patient=pid, file=relative))
            elif hash_images:
                expected = row[f"{kind}_sha256"]
                actual = sha256_file(target)
                if expected != actual:
                    problems.append(format_problem(
                        f"SHA-256 mismatch (images.csv {expected[:12] or 'empty'}..., file"
                        f" {actual[:12]}...): the file changed after the manifest was written",
                        patient=pid, file=relative))
    return problems


def _check_lesions(lesions: pd.DataFrame, known: set[str], images: pd.DataFrame) -> list[str]:
    problems = []
    file = TABLE_FILES["lesions"]
    has_mask = dict(zip(images["patient_id"], images["mask"] != "", strict=False))
    repeated = lesions[lesions.duplicated(["patient_id", "lesion_id"])]
    for pid, lid in sorted(set(zip(repeated["patient_id"], repeated["lesion_id"], strict=True))):
        problems.append(format_problem(f"duplicate lesion_id {lid!r}", patient=pid, file=file))
    for pid in sorted(set(lesions["patient_id"]) - known):
        problems.append(format_problem("patient in lesions.csv but not in patients.csv",
                                       patient=pid or "?", file=file))
    for pid in sorted(known - set(lesions["patient_id"])):
        problems.append(format_problem("patient has no lesions", patient=pid, file=file))
    for _, row in lesions.iterrows():
        pid, lid = row["patient_id"] or "?", row["lesion_id"]
        what = f"lesion {lid!r}" if lid else "lesion with empty lesion_id"
        if not lid:
            problems.append(format_problem("empty lesion_id", patient=pid, file=file))
        label_text = row["mask_label"]
        label = _number(label_text) if label_text else None
        if label_text and (label is None or label != round(label) or label < 1):
            problems.append(format_problem(
                f"{what}: mask_label = {label_text!r} must be a positive integer",
                patient=pid, file=file))
        elif label_text and not has_mask.get(row["patient_id"], False):
            problems.append(format_problem(
                f"{what}: mask_label {label_text} given but the patient has no mask image",
                patient=pid, file=file))
        centre = [row[c] for c in CENTER_COLUMNS]
        given = [c for c in centre if c != ""]
        if given and len(given) < 3:
            problems.append(format_problem(
                f"{what}: incomplete centre (need all of {', '.join(CENTER_COLUMNS)})",
                patient=pid, file=file))
        elif given and any(_number(c) is None or not math.isfinite(_number(c)) for c in centre):
            problems.append(format_problem(f"{what}: centre {centre} is not numeric",
                                           patient=pid, file=file))
        if not label_text and len(given) < 3:
            problems.append(format_problem(
                f"{what}: neither a mask_label nor a complete world centre", patient=pid, file=file))
        if row["site"] not in ("", *SITES):
            problems.append(format_problem(
                f"{what}: unknown site {row['site']!r} (allowed: {', '.join(SITES)} or empty)",
                patient=pid, file=file))
    return problems


def _check_images(root: Path, tables: dict[str, pd.DataFrame], *, progress: bool) -> list[str]:
    """Open each patient's PET, CT and mask in turn (one patient in memory at a time)."""
    from tqdm.auto import tqdm

    from .images import bounds_overlap_mm, image_bounds_mm, load_image

    images, lesions = tables["images"], tables["lesions"]
    problems = []
    for _, row in tqdm(list(images.iterrows()), desc="validate images", unit="patient",
                       disable=None if progress else True):
        pid = row["patient_id"]
        loaded = {}
        for kind in IMAGE_KINDS:
            relative = row[kind]
            target = _inside(root, relative) if relative else None
            if target is None or not target.is_file():
                continue  # already reported by the table checks
            try:
                loaded[kind] = load_image(target, patient=pid, kind=kind, label=relative)
            except InputError as exc:
                problems.append(str(exc))
        if "pet" not in loaded:
            continue
        pet, pet_affine = loaded["pet"]
        pet_bounds = image_bounds_mm(pet.shape, pet_affine)
        if "ct" in loaded:
            ct, ct_affine = loaded["ct"]
            overlap = bounds_overlap_mm(pet_bounds, image_bounds_mm(ct.shape, ct_affine))
            if not np.all(overlap > 0):
                problems.append(format_problem(
                    f"PET and CT do not overlap in world space (PET box {_box(pet_bounds)}, CT box"
                    f" {_box(image_bounds_mm(ct.shape, ct_affine))} mm): wrong affine or wrong pair?",
                    patient=pid, file=row["ct"]))
        patient_lesions = lesions[lesions["patient_id"] == pid]
        mask_labels = None
        if "mask" in loaded:
            mask, mask_affine = loaded["mask"]
            if mask.shape != pet.shape or not np.allclose(mask_affine, pet_affine,
                                                           atol=_AFFINE_TOLERANCE_MM):
                problems.append(format_problem(
                    f"mask is not on the PET grid (mask shape {mask.shape}, PET shape {pet.shape};"
                    " affines must match too)", patient=pid, file=row["mask"]))
            else:
                mask_labels = set(np.unique(mask).tolist())
        inverse = np.linalg.inv(pet_affine)
        for _, lesion in patient_lesions.iterrows():
            lid = lesion["lesion_id"]
            label = _number(lesion["mask_label"]) if lesion["mask_label"] else None
            if mask_labels is not None and label is not None and int(label) not in mask_labels:
                problems.append(format_problem(
                    f"lesion {lid!r}: mask_label {int(label)} does not occur in the mask",
                    patient=pid, file=row["mask"]))
            centre = [_number(lesion[c]) if lesion[c] else None for c in CENTER_COLUMNS]
            if any(c is None or not math.isfinite(c) for c in centre):
                continue
            voxel = (inverse @ np.array([*centre, 1.0]))[:3]
            if np.any(voxel < -0.5) or np.any(voxel > np.array(pet.shape) - 0.5):
                problems.append(format_problem(
                    f"lesion {lid!r}: centre ({', '.join(f'{c:g}' for c in centre)}) mm is outside"
                    f" the PET field of view (voxel {np.round(voxel, 1).tolist()}, shape"
                    f" {list(pet.shape)})", patient=pid, file=row["pet"]))
        del loaded
    return problems


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _inside(root: Path, relative: str) -> Path | None:
    """``root / relative`` if it stays inside ``root`` after resolving symlinks, else None."""
    if not relative or Path(relative).is_absolute():
        return None
    base = root.resolve()
    target = (root / relative).resolve()
    return target if target.is_relative_to(base) and target != base else None


def _plain(value):
    """``value`` with NumPy scalars and arrays, tuples and paths turned into plain YAML types."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_plain(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return str(value)
    return value


def _number(text) -> float | None:
    """``float(text)`` or None when it is not a number."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _text(value) -> str:
    """A table cell as stripped text; missing values become ``""``."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    return str(value).strip()


def _as_text(table: pd.DataFrame) -> pd.DataFrame:
    """All cells as stripped text (missing -> ""), so in-memory and on-disk tables check alike."""
    # Series.map, not DataFrame.map: the latter needs pandas >= 2.1.
    return table.astype(object).apply(lambda column: column.map(_text))


def _box(bounds: tuple[np.ndarray, np.ndarray]) -> str:
    low, high = bounds
    return "[" + ", ".join(f"{a:.0f}..{b:.0f}" for a, b in zip(low, high, strict=True)) + "]"


def _cli_validate(args: argparse.Namespace) -> int:
    path = manifest_file(args.manifest)
    problems = validate_manifest(path, check_images=not args.no_images, progress=True)
    if problems:
        raise ValidationFailed(problems, what=f"manifest {path}")
    cohort = load_manifest(path)
    checked = "tables only" if args.no_images else "tables and images"
    print(f"OK: {len(cohort.patients)} patients, {len(cohort.lesions)} lesions, checksum"
          f" {cohort.checksum} ({checked})")
    return 0


def register_cli(subparsers) -> None:
    """Add ``psma-pfs validate MANIFEST [--no-images]``."""
    parser = subparsers.add_parser(
        "validate", help="check a cohort manifest and its files, listing every problem",
        description="Check a cohort manifest, its tables and (unless --no-images) every image; "
                    "print OK with the data checksum, or every problem found (exit 2).")
    parser.add_argument("manifest", help="manifest.yaml or the cohort folder holding it")
    parser.add_argument("--no-images", action="store_true",
                        help="check tables, paths and SHA-256 only; do not open the NIfTI files")
    parser.set_defaults(func=_cli_validate)

