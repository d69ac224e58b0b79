"""Import a real cohort from the nnU-Net layout of the public PSMA-FDG-PET-CT-Lesions data.

Input layout (one case = one patient; the case id becomes ``patient_id``)::

    DIR/imagesTr/<case>_0000.nii.gz   CT in HU, resampled to the PET grid
    DIR/imagesTr/<case>_0001.nii.gz   PET in SUV (body weight)
    DIR/labelsTr/<case>.nii.gz        lesion mask on the PET grid (0 = background, > 0 = lesion)

plus a clinical CSV with ``patient_id`` and the contract's clinical and outcome columns
(``psma_lib.manifest.PATIENT_COLUMNS``). The public images carry no outcomes: the outcomes must
come from the researcher's own records.

Lesions are the **3-D connected components** of the mask (``scipy.ndimage.label`` with
26-connectivity: voxels touching by a face, an edge or a corner belong to the same lesion);
components smaller than ``min_volume_ml`` are dropped. The output is a cohort folder
(docs/ARCHITECTURE.md) with the PET and CT copied in, a relabelled mask (label k = lesion k,
on the PET grid) and each lesion's centroid in world millimetres (RAS+, through the affine).

>>> import tempfile; from psma_lib.manifest import load_manifest
>>> from psma_lib.testing import write_tiny_nnunet
>>> root = Path(tempfile.mkdtemp())
>>> nnunet_dir, clinical_csv = write_tiny_nnunet(root / "PSMA_nnunet")
>>> manifest = import_nnunet(nnunet_dir, clinical_csv, root / "cohort_real", min_volume_ml=0.1)
>>> load_manifest(manifest).lesions[["patient_id", "lesion_id"]].values.tolist()
[['case1', 'L001'], ['case2', 'L001']]
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

from .errors import InputError, ValidationFailed, format_problem
from .images import load_image
from .io import atomic_dir, sha256_file
from .manifest import MANIFEST_NAME, PATIENT_COLUMNS, patient_table_problems, write_manifest

CT_SUFFIX = "_0000.nii.gz"
PET_SUFFIX = "_0001.nii.gz"
LABEL_SUFFIX = ".nii.gz"
#: 26-connectivity: a 3x3x3 block of ones joins face, edge and corner neighbours.
CONNECTIVITY_STRUCTURE = np.ones((3, 3, 3), dtype=bool)
# Two affines describe the same grid when they agree to this many mm (float32 NIfTI headers).
_AFFINE_TOLERANCE_MM = 1e-3


def lesion_components(
    mask: np.ndarray, affine: np.ndarray, min_volume_ml: float = 0.0
) -> tuple[np.ndarray, pd.DataFrame, int]:
    """Split a binary lesion mask into 26-connected lesions and locate each one in world space.

    Args:
        mask: ``(I, J, K)`` array, lesion where ``> 0``.
        affine: ``(4, 4)`` voxel -> RAS+ mm matrix of the mask's grid.
        min_volume_ml: components with a smaller volume (mL = cm³) are dropped.

    Returns:
        ``(labels, lesions, n_dropped)``: ``labels`` int32 ``(I, J, K)`` with lesion k = k
        (1..n, in scan order of each component's first voxel), 0 elsewhere; ``lesions`` one row
        per kept lesion: ``mask_label``, ``volume_ml``, ``n_voxels``, ``center_x_mm``,
        ``center_y_mm``, ``center_z_mm`` (centroid of the voxel centres); ``n_dropped`` the
        number of components below ``min_volume_ml``.

    >>> m = np.zeros((8, 8, 8)); m[1:3, 1:3, 1:3] = 1; m[6, 6, 6] = 1
    >>> labels, table, dropped = lesion_components(m, np.diag([2.0, 2.0, 2.0, 1.0]), 0.01)
    >>> table[["mask_label", "n_voxels", "center_x_mm"]].values.tolist(), dropped
    ([[1.0, 8.0, 3.0]], 1)
    """
    components, n_components = ndimage.label(np.asarray(mask) > 0, structure=CONNECTIVITY_STRUCTURE)
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0
    counts = np.bincount(components.ravel(), minlength=n_components + 1)
    keep = [k for k in range(1, n_components + 1) if counts[k] * voxel_ml >= min_volume_ml]
    lookup = np.zeros(n_components + 1, dtype=np.int32)
    lookup[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    labels = lookup[components]
    if keep:
        index = np.arange(1, len(keep) + 1)
        centres_voxel = np.array(ndimage.center_of_mass(labels > 0, labels, index), ndmin=2)
    else:
        centres_voxel = np.zeros((0, 3))
    centres_world = (np.c_[centres_voxel, np.ones(len(keep))] @ np.asarray(affine).T)[:, :3]
    lesions = pd.DataFrame({
        "mask_label": np.arange(1, len(keep) + 1),
        "volume_ml": counts[keep] * voxel_ml,
        "n_voxels": counts[keep],
        "center_x_mm": centres_world[:, 0],
        "center_y_mm": centres_world[:, 1],
        "center_z_mm": centres_world[:, 2],
    })
    return labels, lesions, n_components - len(keep)


def import_nnunet(
    nnunet_dir: str | os.PathLike,
    clinical_csv: str | os.PathLike,
    out_dir: str | os.PathLike,
    min_volume_ml: float = 0.0,
    copy: bool = True,
    *,
    exclude: Iterable[str] = (),
    name: str | None = None,
    progress: bool = False,
) -> Path:
    """Turn an nnU-Net PSMA folder plus a clinical CSV into a validated cohort folder.

    Args:
        nnunet_dir: folder with ``imagesTr/`` and ``labelsTr/`` (layout in the module docstring).
        clinical_csv: ``patient_id`` (= case id) + clinical + outcome columns, one row per case.
        out_dir: the cohort folder to write (replaced atomically if it is already a cohort).
        min_volume_ml: drop mask components below this volume (mL).
        copy: copy PET and CT into ``out_dir/images``; ``False`` hard-links them instead where
            the file system allows (no extra disk space, and unlike a symlink the link stays
            inside the cohort folder), falling back to a copy.
        exclude: case ids to leave out entirely (their images and clinical rows are ignored),
            e.g. a case whose mask is empty; recorded in the manifest.
        name: the cohort's name in the manifest (default: the nnU-Net folder's name).
        progress: show a tqdm bar over cases.

    Returns:
        The written ``manifest.yaml`` (``cohort.synthetic: false``).

    Raises:
        InputError: the nnU-Net folder or clinical CSV is missing, or ``out_dir`` is a non-empty
            folder that is not a cohort.
        ValidationFailed: every problem found, all cases together: cases without clinical rows,
            clinical rows without images, incomplete cases, unreadable/corrupt images, NaN or
            negative SUV, CT or mask not on the PET grid, empty masks, bad clinical values.
            Nothing is written.
    """
    from tqdm.auto import tqdm

    source, out_dir = Path(nnunet_dir), Path(out_dir)
    for folder in ("imagesTr", "labelsTr"):
        if not (source / folder).is_dir():
            raise InputError(f"not an nnU-Net folder: {folder}/ is missing", file=str(source))
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
        raise InputError("output folder exists, is not empty and is not a cohort; refusing to"
                         " replace it", file=str(out_dir))

    exclude = sorted(set(exclude))
    cases, problems = _find_cases(source, exclude)
    clinical, clinical_problems = _read_clinical(Path(clinical_csv), set(cases), exclude)
    problems += clinical_problems
    todo = [case for case in sorted(cases) if case in set(clinical["patient_id"])]

    n_dropped = 0
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        image_rows, lesion_rows = [], []
        for case in tqdm(todo, desc="import nnU-Net", unit="case", disable=None if progress else True):
            try:
                images, lesions, dropped = _import_case(source, case, tmp, min_volume_ml, copy)
            except ValidationFailed as exc:
                problems.extend(exc.problems)
                continue
            except InputError as exc:
                problems.append(str(exc))
                continue
            n_dropped += dropped
            image_rows.append(images)
            lesion_rows.extend(lesions)
        if problems:
            raise ValidationFailed(problems, what=f"import of {source}")
        patients = clinical.set_index("patient_id").loc[todo].reset_index()[list(PATIENT_COLUMNS)]
        info = {
            "name": name or source.resolve().name,
            "synthetic": False,
            "description": f"Imported from the nnU-Net folder {source.resolve().name} with"
                           f" clinical data {Path(clinical_csv).name}.",
            "source": {
                "layout": "nnU-Net (CT _0000 on the PET grid, PET _0001 in SUV, binary labelsTr)",
                "clinical_csv_sha256": sha256_file(clinical_csv),
                "lesions": "3-D connected components of the label mask, 26-connectivity",
                "min_volume_ml": float(min_volume_ml),
                "components_dropped_below_min_volume": int(n_dropped),
                "images": "copied" if copy else "hard-linked where possible",
                "excluded_cases": exclude,
            },
        }
        write_manifest(tmp, patients, pd.DataFrame(image_rows), pd.DataFrame(lesion_rows), info)
    return out_dir / MANIFEST_NAME


def _find_cases(source: Path, exclude: list[str]) -> tuple[dict[str, dict[str, Path]], list[str]]:
    """Complete cases {case: {ct, pet, label}} not in ``exclude``, and a problem per incomplete
    case and per excluded case that does not exist."""
    found: dict[str, dict[str, Path]] = {}
    for path in (source / "imagesTr").glob("*" + CT_SUFFIX):
        found.setdefault(path.name[: -len(CT_SUFFIX)], {})["ct"] = path
    for path in (source / "imagesTr").glob("*" + PET_SUFFIX):
        found.setdefault(path.name[: -len(PET_SUFFIX)], {})["pet"] = path
    for path in (source / "labelsTr").glob("*" + LABEL_SUFFIX):
        found.setdefault(path.name[: -len(LABEL_SUFFIX)], {})["label"] = path
    expected = {"ct": f"imagesTr/<case>{CT_SUFFIX}", "pet": f"imagesTr/<case>{PET_SUFFIX}",
                "label": f"labelsTr/<case>{LABEL_SUFFIX}"}
    problems, cases = [], {}
    for case in exclude:
        if found.pop(case, None) is None:
            problems.append(format_problem("excluded case not found (typo?)", patient=case,
                                           file=str(source)))
    for case, files in sorted(found.items()):
        missing = [expected[kind].replace("<case>", case) for kind in expected if kind not in files]
        if missing:
            problems.append(format_problem(f"incomplete nnU-Net case: missing {', '.join(missing)}",
                                           patient=case, file=str(source)))
        else:
            cases[case] = files
    if not found and not exclude:
        problems.append(format_problem("no cases found in imagesTr/ and labelsTr/", file=str(source)))
    return cases, problems


def _read_clinical(path: Path, cases: set[str], exclude: list[str]
                   ) -> tuple[pd.DataFrame, list[str]]:
    """The clinical table (text cells, excluded cases dropped) and its problems, including the
    join with the cases."""
    if not path.is_file():
        raise InputError("clinical CSV not found", file=str(path))
    try:
        clinical = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read clinical CSV ({exc})", file=str(path)) from exc
    missing = [c for c in PATIENT_COLUMNS if c not in clinical.columns]
    if missing:
        raise InputError(f"clinical CSV lacks column(s): {', '.join(missing)}", file=str(path))
    clinical = clinical.apply(lambda column: column.str.strip())
    clinical = clinical[~clinical["patient_id"].isin(exclude)]
    problems = patient_table_problems(clinical, file=path.name)
    ids = set(clinical["patient_id"]) - {""}
    for case in sorted(cases - ids):
        problems.append(format_problem("case has images but no row in the clinical CSV",
                                       patient=case, file=path.name))
    for pid in sorted(ids - cases):
        problems.append(format_problem("clinical row has no images (no complete nnU-Net case)",
                                       patient=pid, file=path.name))
    return clinical.drop_duplicates("patient_id"), problems


def _import_case(
    source: Path, case: str, out: Path, min_volume_ml: float, copy: bool
) -> tuple[dict, list[dict], int]:
    """Check, copy and relabel one case; returns (images row, lesion rows, components dropped)."""
    ct_file = f"imagesTr/{case}{CT_SUFFIX}"
    pet_file = f"imagesTr/{case}{PET_SUFFIX}"
    label_file = f"labelsTr/{case}{LABEL_SUFFIX}"
    problems = []
    loaded = {}
    for kind, relative in (("pet", pet_file), ("ct", ct_file), ("mask", label_file)):
        try:
            loaded[kind] = load_image(source / relative, patient=case, kind=kind, label=relative)
        except InputError as exc:
            problems.append(str(exc))
    if "pet" in loaded:
        pet_shape, pet_affine = loaded["pet"][0].shape, loaded["pet"][1]
        for kind, relative in (("ct", ct_file), ("mask", label_file)):
            if kind in loaded and not _same_grid(loaded[kind], pet_shape, pet_affine):
                problems.append(format_problem(
                    f"{'CT' if kind == 'ct' else 'label mask'} is not on the PET grid (shape"
                    f" {loaded[kind][0].shape} vs PET {pet_shape}, or different affine)",
                    patient=case, file=relative))
    if problems:
        raise ValidationFailed(problems, what=f"case {case}")
    del loaded["ct"]
    labels, lesions, n_dropped = lesion_components(loaded["mask"][0], pet_affine, min_volume_ml)
    if lesions.empty:
        problem = ("label mask is empty: no lesion" if n_dropped == 0 else
                   f"no lesion left: all {n_dropped} component(s) are below {min_volume_ml} mL")
        raise InputError(problem, patient=case, file=label_file)

    images = {"patient_id": case}
    for kind, relative in (("pet", pet_file), ("ct", ct_file)):
        target = f"images/{case}_{kind}.nii.gz"
        _place(source / relative, out / target, copy)
        images[kind] = target
    mask_dtype = np.uint8 if len(lesions) <= np.iinfo(np.uint8).max else np.int16
    mask_image = nib.Nifti1Image(labels.astype(mask_dtype), pet_affine)
    mask_image.set_qform(pet_affine, code=1)
    mask_image.set_sform(pet_affine, code=1)
    images["mask"] = f"images/{case}_mask.nii.gz"
    nib.save(mask_image, out / images["mask"])

    lesion_rows = [{
        "patient_id": case,
        "lesion_id": f"L{int(row.mask_label):03d}",
        "mask_label": int(row.mask_label),
        "center_x_mm": float(row.center_x_mm),
        "center_y_mm": float(row.center_y_mm),
        "center_z_mm": float(row.center_z_mm),
        "site": "",
    } for row in lesions.itertuples()]
    return images, lesion_rows, n_dropped


def _same_grid(image: tuple[np.ndarray, np.ndarray], shape: tuple, affine: np.ndarray) -> bool:
    data, other_affine = image
    return data.shape == shape and np.allclose(other_affine, affine, atol=_AFFINE_TOLERANCE_MM)


def _place(source: Path, target: Path, copy: bool) -> None:
    """Copy ``source`` to ``target``, or hard-link it (falling back to a copy) when not ``copy``."""
    if not copy:
        try:
            os.link(source, target)
            return
        except OSError:
            pass  # another file system or no hard-link support: copy instead
    shutil.copyfile(source, target)


def _cli_import(args: argparse.Namespace) -> int:
    manifest = import_nnunet(args.nnunet_dir, args.clinical, args.out, args.min_volume_ml,
                             copy=not args.link, exclude=args.exclude, name=args.name,
                             progress=True)
    from .manifest import load_manifest

    cohort = load_manifest(manifest)
    dropped = cohort.info["source"]["components_dropped_below_min_volume"]
    print(f"Imported {len(cohort.patients)} patients, {len(cohort.lesions)} lesions"
          f" ({dropped} component(s) below {args.min_volume_ml} mL dropped) -> {manifest}")
    return 0


def register_cli(subparsers) -> None:
    """Add ``psma-pfs import-nnunet DIR --clinical CSV --out DIR [--min-volume-ml V] [--link]``."""
    parser = subparsers.add_parser(
        "import-nnunet", help="make a cohort from an nnU-Net PSMA folder and a clinical CSV",
        description="Import imagesTr/<case>_0000 (CT on the PET grid), imagesTr/<case>_0001 (PET,"
                    " SUV) and labelsTr/<case> (lesion mask); lesions are 26-connected components"
                    " of the mask. The clinical CSV has patient_id (= case id) and the clinical and"
                    " outcome columns of data_manifest/README.md.")
    parser.add_argument("nnunet_dir", metavar="DIR", help="folder with imagesTr/ and labelsTr/")
    parser.add_argument("--clinical", required=True, metavar="CSV",
                        help="patient_id + clinical + outcome columns")
    parser.add_argument("--out", required=True, metavar="DIR", help="cohort folder to write")
    parser.add_argument("--min-volume-ml", type=float, default=0.0, metavar="V",
                        help="drop mask components smaller than V mL (default 0: keep all)")
    parser.add_argument("--link", action="store_true",
                        help="hard-link PET/CT into the cohort instead of copying (same file"
                             " system only; falls back to copying)")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="CASE",
                        help="case ids to leave out (images and clinical rows), e.g. empty masks")
    parser.add_argument("--name", help="cohort name in the manifest (default: DIR's name)")
    parser.set_defaults(func=_cli_import)
