"""Conventional PSMA PET biomarkers per lesion and per patient, from the lesion masks.

The crop stage (:mod:`psma_lib.crop`) measures each lesion from the native PET voxels under its
mask label: ``volume_ml`` (label voxel count x mask voxel volume), ``suvmax`` and ``suvmean``
(maximum and mean SUV of those voxels). This module turns these columns of the crops'
``lesions.csv`` into the whole-body quantities reported in the PSMA PET literature, for a
biomarker Cox baseline beside the image model.

Definitions here, side by side with the published ones:

================  ==========================================  ===================================
quantity          this module                                 published
================  ==========================================  ===================================
lesion count      rows of a patient in ``lesions.csv``        number of delineated lesions; the
                  (``lesion_count``)                          PSMA PET progression criteria (PPP,
                                                              Fanti et al., J Nucl Med 2020; PPP2,
                                                              their revision) judge progression
                                                              by new lesions and tumour volume
PSMA-TV           Σ lesion ``volume_ml`` (``psma_tv_ml``)     PSMA ligand-positive tumour volume,
                                                              sum over all lesions (Gafita et
                                                              al., J Nucl Med 2019, "qPSMA";
                                                              Seifert et al., Eur J Nucl Med Mol
                                                              Imaging 2021)
TL-PSMA           Σ ``volume_ml x suvmean``, mL x SUV         PSMA-TV x whole-body SUVmean:
                  (lesion ``tl_psma``, patient                "PSMA-TL" in qPSMA, "PSMA-TLU" in
                  ``tl_psma_ml``)                             Seifert et al. 2021; the same sum
SUVmax            highest lesion ``suvmax`` (``suvmax``)      highest voxel SUV of all lesions
SUVmean           TL-PSMA / PSMA-TV (``suvmean``)             mean SUV of all tumour voxels
                                                              (qPSMA "PSMA SUVmean")
bone fraction     lesions with ``site == "bone"`` / count     (descriptive; bone involvement is
                  (``n_bone``, ``bone_fraction``)             a known prognostic factor)
================  ==========================================  ===================================

The whole-body SUVmean is volume-weighted, Σ v_i m_i / Σ v_i: it is the mean SUV over all
tumour voxels pooled (on one voxel grid), not the average of the lesions' SUVmeans.

**What differs from the published pipelines: the segmentation.** qPSMA segments bone lesions
as voxels with SUV >= 3 inside a CT-derived bone mask and soft-tissue lesions with a
liver-background-based SUV threshold, excluding organs with physiological uptake; Seifert et
al. delineate lesions semi-automatically with a previously published approach. **This project does no
thresholding of its own**: it uses the lesion masks it is given (manual, nnU-Net or synthetic;
:mod:`psma_lib.nnunet`, :mod:`psma_lib.synthetic`) exactly as they are. Volumes and SUVmeans
therefore depend on how those masks were drawn and are comparable with published values only as
far as the masks follow the same segmentation rule; SUVmax, the hottest voxel, depends least on
it. Lesion count is the count of mask labels (connected components for an nnU-Net import).

Units: volume in mL (= cm³), SUV dimensionless (g/mL), TL-PSMA in mL x SUV (often written
"mL" in the literature, hence ``tl_psma_ml``).

>>> lesions = pd.DataFrame({"patient_id": ["P1", "P1", "P2"], "lesion_id": ["a", "b", "a"],
...                         "site": ["bone", "lymph_node", "bone"], "volume_ml": [2.0, 1.0, 0.5],
...                         "suvmax": [20.0, 9.0, 6.0], "suvmean": [10.0, 4.0, 3.0]})
>>> table = patient_biomarkers(lesions, patients=["P1", "P2", "P3"])
>>> table[["patient_id", "lesion_count", "psma_tv_ml", "tl_psma_ml", "suvmean"]]
  patient_id  lesion_count  psma_tv_ml  tl_psma_ml  suvmean
0         P1             2         3.0        24.0      8.0
1         P2             1         0.5         1.5      3.0
2         P3             0         0.0         0.0      0.0
>>> biomarker_features(table).round(3).columns.tolist()
['patient_id', 'log_lesion_count', 'log_psma_tv', 'log_suvmax', 'suvmean', 'bone_fraction']
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pandas as pd

from .errors import InputError

#: Columns :func:`lesion_biomarkers` needs (the crops' ``lesions.csv`` has them all).
LESION_INPUT_COLUMNS = ("patient_id", "lesion_id", "site", "volume_ml", "suvmax", "suvmean")
#: Columns of :func:`lesion_biomarkers`' result, in order.
LESION_BIOMARKER_COLUMNS = (
    "patient_id", "lesion_id", "site", "volume_ml", "suvmax", "suvmean", "tl_psma", "is_bone",
)
#: Columns of :func:`patient_biomarkers`' result, in order.
PATIENT_BIOMARKER_COLUMNS = (
    "patient_id", "lesion_count", "psma_tv_ml", "suvmax", "suvmean", "tl_psma_ml", "n_bone",
    "bone_fraction",
)
#: Model features of :func:`biomarker_features`, in order (after ``patient_id``).
FEATURE_COLUMNS = ("log_lesion_count", "log_psma_tv", "log_suvmax", "suvmean", "bone_fraction")
#: Floors applied before a log, ``log(max(x, floor))``: each lies below the smallest positive
#: value a lesion can have (1 lesion; one voxel of a clinical PET grid, >= ~0.05 mL; a
#: PSMA-avid lesion's SUVmax, well above 1), so it changes only the zeros of patients with no
#: lesion, which it places one step (log 2 for the count) below the smallest real value.
FEATURE_FLOORS = {"lesion_count": 0.5, "psma_tv_ml": 0.01, "suvmax": 0.1}


def lesion_biomarkers(lesions: pd.DataFrame) -> pd.DataFrame:
    """Per-lesion biomarkers: volume, SUVmax, SUVmean, TL-PSMA and bone site.

    Args:
        lesions: one row per lesion with ``LESION_INPUT_COLUMNS`` (e.g. ``load_crops(d).lesions``;
            other columns are ignored). ``site`` may be empty/NaN (unknown: not bone).

    Returns:
        A new DataFrame, one row per input row in the same order (index reset), with
        ``LESION_BIOMARKER_COLUMNS``: ``patient_id``, ``lesion_id`` (str), ``site`` (str, ``""``
        if unknown), ``volume_ml``, ``suvmax``, ``suvmean`` (float, as given),
        ``tl_psma = volume_ml * suvmean`` (mL x SUV) and ``is_bone`` (bool, ``site == "bone"``).

    Raises:
        InputError: a required column is missing; or, naming the patient and the lesion, a
            duplicate lesion id within a patient, a volume / SUV that is missing, non-finite or
            negative, a zero volume (a mask label has at least one voxel), or ``suvmean`` above
            ``suvmax``. A lesion given only by a world centre (no mask label) has no measured
            volume or SUV and is refused here: biomarkers need every lesion's mask.

    >>> table = lesion_biomarkers(pd.DataFrame({
    ...     "patient_id": ["P1", "P1"], "lesion_id": ["L1", "L2"], "site": ["bone", ""],
    ...     "volume_ml": [2.0, 0.5], "suvmax": [12.0, 6.0], "suvmean": [5.0, 4.0]}))
    >>> table[["lesion_id", "tl_psma", "is_bone"]]
      lesion_id  tl_psma  is_bone
    0        L1     10.0     True
    1        L2      2.0    False
    """
    _require_columns(lesions, LESION_INPUT_COLUMNS, "lesions table")
    out = pd.DataFrame({
        "patient_id": lesions["patient_id"].astype(str).to_numpy(),
        "lesion_id": lesions["lesion_id"].astype(str).to_numpy(),
        "site": lesions["site"].fillna("").astype(str).str.strip().to_numpy(),
    })
    repeated = out[out.duplicated(["patient_id", "lesion_id"])]
    if len(repeated):
        pid, lid = repeated.iloc[0]["patient_id"], repeated.iloc[0]["lesion_id"]
        raise InputError(f"lesion {lid!r} appears more than once", patient=pid)
    for column in ("volume_ml", "suvmax", "suvmean"):
        out[column] = _numeric(lesions[column], column, out, positive=column == "volume_ml")
    above = out["suvmean"] > out["suvmax"] + 1e-9
    if above.any():
        row = out[above].iloc[0]
        raise InputError(f"lesion {row['lesion_id']!r}: suvmean {row['suvmean']:g} is above "
                         f"suvmax {row['suvmax']:g}", patient=row["patient_id"])
    out["tl_psma"] = out["volume_ml"] * out["suvmean"]
    out["is_bone"] = out["site"] == "bone"
    return out[list(LESION_BIOMARKER_COLUMNS)]


def mean_ct_density(lesions: pd.DataFrame, patient_ids: Iterable[str]) -> pd.Series:
    """Each patient's mean lesion CT density (HU): the mean of the crop stage's ``hu_mean`` over the
    patient's lesions (sclerotic bone lesions are dense, lytic ones are not). Not a conventional
    PSMA PET biomarker; the ``biomarkers+ct`` Cox baseline of :mod:`psma_lib.cv` adds it.

    Returns a float Series indexed by ``patient_ids`` (NaN for a patient without a measured lesion).

    Raises:
        InputError: no lesion has a measured ``hu_mean`` (crops written before it was measured).

    >>> lesions = pd.DataFrame({"patient_id": ["P1", "P1", "P2"], "hu_mean": [900.0, 300.0, 40.0]})
    >>> mean_ct_density(lesions, ["P2", "P1", "P3"]).to_dict()
    {'P2': 40.0, 'P1': 600.0, 'P3': nan}
    """
    if "hu_mean" not in lesions or lesions["hu_mean"].isna().all():
        raise InputError("no lesion has a measured CT density (hu_mean): crop again with this psma_lib")
    return lesions.groupby("patient_id")["hu_mean"].mean().reindex(list(patient_ids))


def patient_biomarkers(
    lesions: pd.DataFrame, patients: pd.DataFrame | Iterable[str] | None = None
) -> pd.DataFrame:
    """Whole-body biomarkers, one row per patient (module docstring for the definitions).

    Args:
        lesions: one row per lesion, as for :func:`lesion_biomarkers`.
        patients: the patients to report, in this order: a table with a ``patient_id`` column
            (e.g. ``load_crops(d).patients``) or an iterable of ids. A patient given here with
            no lesion gets ``lesion_count = 0``, ``psma_tv_ml = tl_psma_ml = 0``, ``n_bone = 0``
            and, by convention (no tumour voxel, so no tumour uptake and no bone involvement),
            ``suvmax = suvmean = bone_fraction = 0``; select ``lesion_count > 0`` to leave such
            patients out. ``None``: the patients with lesions, in order of first appearance.

    Returns:
        DataFrame with ``PATIENT_BIOMARKER_COLUMNS``, one row per patient (index reset):
        ``patient_id`` (str); ``lesion_count`` (int); ``psma_tv_ml`` = Σ volume_ml (mL);
        ``suvmax`` = max lesion SUVmax; ``suvmean`` = tl_psma_ml / psma_tv_ml (volume-weighted,
        the mean over all tumour voxels); ``tl_psma_ml`` = Σ volume_ml x suvmean (mL x SUV);
        ``n_bone`` (int) lesions with site ``"bone"``; ``bone_fraction`` = n_bone / lesion_count.

    Raises:
        InputError: as :func:`lesion_biomarkers`; a duplicate id in ``patients``; or lesions of
            a patient absent from ``patients`` (naming the first such patient).

    >>> lesions = pd.DataFrame({"patient_id": ["P1", "P1"], "lesion_id": ["a", "b"],
    ...                         "site": ["bone", "prostate"], "volume_ml": [3.0, 1.0],
    ...                         "suvmax": [30.0, 8.0], "suvmean": [12.0, 4.0]})
    >>> patient_biomarkers(lesions).iloc[0].to_dict()   # doctest: +NORMALIZE_WHITESPACE
    {'patient_id': 'P1', 'lesion_count': 2, 'psma_tv_ml': 4.0, 'suvmax': 30.0, 'suvmean': 10.0,
     'tl_psma_ml': 40.0, 'n_bone': 1, 'bone_fraction': 0.5}
    """
    table = lesion_biomarkers(lesions)
    grouped = table.groupby("patient_id", sort=False)
    per_patient = pd.DataFrame({
        "lesion_count": grouped.size(),
        "psma_tv_ml": grouped["volume_ml"].sum(),
        "suvmax": grouped["suvmax"].max(),
        "tl_psma_ml": grouped["tl_psma"].sum(),
        "n_bone": grouped["is_bone"].sum(),
    })
    if patients is None:
        order = list(per_patient.index)
    else:
        order = _patient_ids(patients)
        unknown = [pid for pid in per_patient.index if pid not in set(order)]
        if unknown:
            raise InputError(f"has lesions but is not among the {len(order)} patients given"
                             + (f" ({len(unknown) - 1} more such patient(s))" if len(unknown) > 1
                                else ""), patient=unknown[0])
    out = per_patient.reindex(order)
    out.index.name = "patient_id"
    out = out.reset_index()
    for column in ("lesion_count", "psma_tv_ml", "suvmax", "tl_psma_ml", "n_bone"):
        out[column] = out[column].fillna(0)
    out["lesion_count"] = out["lesion_count"].astype(int)
    out["n_bone"] = out["n_bone"].astype(int)
    has = out["lesion_count"] > 0
    # Volumes are > 0 (lesion_biomarkers), so psma_tv_ml > 0 wherever there is a lesion.
    out["suvmean"] = np.where(has, out["tl_psma_ml"] / out["psma_tv_ml"].where(has, 1.0), 0.0)
    out["bone_fraction"] = np.where(has, out["n_bone"] / out["lesion_count"].clip(lower=1), 0.0)
    return out[list(PATIENT_BIOMARKER_COLUMNS)]


def biomarker_features(table: pd.DataFrame) -> pd.DataFrame:
    """Model features of the biomarker Cox baseline, from :func:`patient_biomarkers`' table.

    The three burden/uptake quantities are right-skewed over orders of magnitude, so they enter
    on a log scale (natural log; Seifert et al. used log2, which only rescales a Cox coefficient);
    the whole-body SUVmean and the bone fraction enter as they are:

    * ``log_lesion_count`` = log(max(lesion_count, 0.5))
    * ``log_psma_tv``      = log(max(psma_tv_ml, 0.01))   (mL)
    * ``log_suvmax``       = log(max(suvmax, 0.1))
    * ``suvmean``          = whole-body SUVmean (TL-PSMA / PSMA-TV; 0 without lesions)
    * ``bone_fraction``    = n_bone / lesion_count (0 without lesions)

    The floors (:data:`FEATURE_FLOORS`) only matter for a patient with no lesion, whose zeros
    would otherwise have no logarithm. TL-PSMA is not a feature: log TL-PSMA = log PSMA-TV + log
    SUVmean, nearly collinear with the two.

    Args:
        table: one row per patient with ``patient_id``, ``lesion_count``, ``psma_tv_ml``,
            ``suvmax``, ``suvmean``, ``bone_fraction`` (other columns are ignored).

    Returns:
        DataFrame with ``patient_id`` and ``FEATURE_COLUMNS`` (float), rows in the input's order
        (index reset); no standardisation (that belongs to the model's training folds).

    Raises:
        InputError: a missing column, or a value that is missing, non-finite or negative, or a
            bone fraction above 1 (naming the patient).

    >>> table = pd.DataFrame({"patient_id": ["P1", "P2"], "lesion_count": [4, 0],
    ...                       "psma_tv_ml": [np.e, 0.0], "suvmax": [np.e ** 2, 0.0],
    ...                       "suvmean": [6.5, 0.0], "bone_fraction": [0.25, 0.0]})
    >>> biomarker_features(table).round(3)
      patient_id  log_lesion_count  log_psma_tv  log_suvmax  suvmean  bone_fraction
    0         P1             1.386        1.000       2.000      6.5           0.25
    1         P2            -0.693       -4.605      -2.303      0.0           0.00
    """
    needed = ("patient_id", "lesion_count", "psma_tv_ml", "suvmax", "suvmean", "bone_fraction")
    _require_columns(table, needed, "patient biomarker table")
    ids = table["patient_id"].astype(str).to_numpy()
    values = {}
    for column in needed[1:]:
        values[column] = _numeric(table[column], column, pd.DataFrame({"patient_id": ids}))
    too_high = values["bone_fraction"] > 1.0 + 1e-9
    if too_high.any():
        where = int(np.flatnonzero(too_high.to_numpy())[0])
        raise InputError(f"bone_fraction {values['bone_fraction'].iloc[where]:g} is above 1",
                         patient=ids[where])
    out = pd.DataFrame({"patient_id": ids})
    for name, column in (("log_lesion_count", "lesion_count"), ("log_psma_tv", "psma_tv_ml"),
                         ("log_suvmax", "suvmax")):
        out[name] = np.log(np.maximum(values[column].to_numpy(float), FEATURE_FLOORS[column]))
    out["suvmean"] = values["suvmean"].to_numpy(float)
    out["bone_fraction"] = values["bone_fraction"].to_numpy(float)
    return out[["patient_id", *FEATURE_COLUMNS]]


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def _require_columns(table: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    if not isinstance(table, pd.DataFrame):
        raise InputError(f"{what}: expected a pandas DataFrame, got {type(table).__name__}")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(f"{what}: missing column(s) {', '.join(missing)} (has: "
                         f"{', '.join(map(str, table.columns)) or 'none'})")


def _numeric(values: pd.Series, column: str, ids: pd.DataFrame, positive: bool = False
             ) -> pd.Series:
    """``values`` as float (index reset); an InputError naming the first bad row's patient (and
    lesion, when ``ids`` has ``lesion_id``) if one is missing, non-finite, negative, or (with
    ``positive``) zero."""
    numbers = pd.to_numeric(values.reset_index(drop=True), errors="coerce").astype(float)
    raw = values.reset_index(drop=True)
    bad = ~np.isfinite(numbers.to_numpy()) | (numbers.to_numpy() < 0)
    if positive:
        bad |= numbers.to_numpy() == 0
    if not bad.any():
        return numbers
    where = int(np.flatnonzero(bad)[0])
    value = numbers.iloc[where]
    if pd.isna(raw.iloc[where]):
        problem = "is missing"
        if column in ("volume_ml", "suvmax", "suvmean") and "lesion_id" in ids:
            problem += " (a lesion without a mask label has no measured volume or SUV)"
    elif math.isnan(value):
        problem = f"= {raw.iloc[where]!r} is not a number"
    elif not math.isfinite(value):
        problem = f"= {value} is not finite"
    elif value < 0:
        problem = f"= {value:g} is negative"
    else:
        problem = "= 0: a lesion mask label has at least one voxel"
    if "lesion_id" in ids:
        problem = f"lesion {ids['lesion_id'].iloc[where]!r}: {column} {problem}"
    else:
        problem = f"{column} {problem}"
    n_bad = int(bad.sum())
    if n_bad > 1:
        problem += f" ({n_bad - 1} more row(s) with a bad {column})"
    raise InputError(problem, patient=str(ids["patient_id"].iloc[where]))


def _patient_ids(patients: pd.DataFrame | Iterable[str]) -> list[str]:
    if isinstance(patients, pd.DataFrame):
        _require_columns(patients, ("patient_id",), "patients table")
        ids = patients["patient_id"].astype(str).tolist()
    elif isinstance(patients, str):
        raise InputError("patients: expected a table or a list of patient ids, got one string")
    else:
        ids = [str(pid) for pid in patients]
    seen = set()
    for pid in ids:
        if pid in seen:
            raise InputError("appears more than once in the patients given", patient=pid)
        seen.add(pid)
    return ids
