"""Realistic synthetic PSMA PET/CT cohort with a known proportional-hazards ground truth.

``psma-pfs generate --out DIR`` writes a cohort directory exactly as docs/ARCHITECTURE.md
("Cohort directory") describes: per patient a PET volume (SUV, float32, ~4x4x3 mm), a CT volume
(HU, int16) on its own finer grid with its own origin (and, for some patients, x/y axes stored
flipped, LPS-like), a lesion label map on the PET grid, the clinical/outcome tables, the manifest
and a ``truth/`` folder that models never read. Every default lives in
``data_manifest/synthetic_default.yaml`` (which cites the figures of ../shared/PAPER.md).

Two stages, so the statistics can be checked without rendering images:

1. :func:`sample_tables` draws, per patient, the clinical variables, the lesions' properties
   (site, diameter, SUVmax, necrosis) and the outcome. Fast: 2000 patients in well under a second.
2. :func:`render_patient` draws the anatomy and places the lesions drawn in stage 1 in it.

Ground-truth outcome model (proportional hazards, Weibull baseline)::

    imaging_part  = b_uptake   * (log max_lesion SUVmax_true       - c_uptake)
                  + b_burden   * (log total lesion volume [mL]      - c_burden)
                  + b_count    * (log number of lesions             - c_count)
                  + b_bone     * (fraction of lesions in bone       - c_bone)
                  + b_necrosis * (volume-weighted mean lesion necrosis - c_necrosis)
    clinical_part = b_psa * z(log PSA) + b_ecog * ECOG + b_gleason * [Gleason >= 8]
                  + b_age * (age - 70) / 10 + b_docetaxel * docetaxel + b_lu_psma * lu_psma
    linear_predictor = imaging_part + clinical_part        (signal "both")
                     = imaging_part | clinical_part | 0    (signal "imaging" | "clinical" | "none")
    log-hazard       = linear_predictor + frailty,   frailty ~ N(0, frailty_sd^2)  (0 for "none")
    T = scale[signal] * (E * exp(-log-hazard)) ** (1 / shape),   E ~ Exp(1)
    observed = min(T, administrative censoring ~ U(followup, followup + accrual), drop-out ~ Exp)

``necrosis`` (0..1) is the texture property that no table holds: a photopenic (PSMA-negative)
core in the PET and, on CT, a lytic instead of sclerotic bone lesion or a hypodense nodal core.
PSA is correlated with the imaging burden, as in real disease. ``truth/truth.csv`` holds
``linear_predictor`` WITHOUT frailty (the oracle risk), ``frailty`` and ``log_hazard`` (with it),
the imaging and clinical parts separately, the features above and the event/censoring times.
Calibration (2000 patients, signal "both"): Harrell C of ``linear_predictor`` ~0.80, of the
clinical part ~0.61, KM median PFS ~23 months, ~38-40 % censored.

``suvmax_true`` is the drawn SUVmax, log-normal per site with the published (measured) medians;
since published values are measured, the rendered peak activity is ``suvmax_true`` divided by
the expected recovery (:func:`recovery_coefficient`), so the measured SUVmax (``suvmax_pet`` in
``truth/lesion_truth.csv``) is close to it, while the smallest lesions still lose some.

Geometry: world RAS+ mm, z = 0 at the femoral heads, field of view z in [-60, 390] mm (proximal
femora to liver dome / lung bases). Anatomy and lesions are painted on a fine phantom grid
(2 x 2 x 1.5 mm); the PET is its point-spread-blurred activity averaged into 4 x 4 x 3 mm voxels
plus signal-dependent noise; the CT is its HU sampled on the CT's own grid plus noise.

>>> tables = sample_tables(200, seed=0)       # clinical, lesions and outcome, without images
>>> len(tables.patients), sorted(tables.lesions["site"].unique()) == sorted(SITES)
(200, True)
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import yaml
from scipy import ndimage

from .errors import InputError
from .io import atomic_dir
from .vocabulary import CLINICAL_COLUMNS, SITES
from .vocabulary import TREATMENT_COLUMNS as TREATMENTS

SIGNALS = ("both", "imaging", "clinical", "none")
DEFAULT_SPEC_PATH = Path(__file__).resolve().parent.parent / "data_manifest" / "synthetic_default.yaml"

# Independent random streams per patient (numpy SeedSequence spawn keys): results do not depend
# on the number of worker processes or on the order patients are rendered in.
_STREAM_COUNTS, _STREAM_TABLES, _STREAM_RENDER = 0, 1, 2


# ----------------------------------------------------------------------------------- spec
@dataclass
class SiteSpec:
    """Lesion site: share of lesions and log-normal SUVmax (median, log-sd, clipped range)."""

    fraction: float
    suvmax_median: float
    suvmax_log_sd: float
    suvmax_min: float
    suvmax_max: float


def _default_sites() -> dict[str, SiteSpec]:
    # PAPER.md: bone median 24 (IQR 14-38, range 4-127), nodes 16.7 (11-28, 2-138), prostate bed
    # ~10, visceral ~17.5. log-sd = ln(Q3/Q1) / 1.349.
    return {
        "bone": SiteSpec(0.55, 24.0, 0.74, 4.0, 127.0),
        "lymph_node": SiteSpec(0.30, 16.7, 0.69, 2.0, 138.0),
        "prostate": SiteSpec(0.10, 10.0, 0.60, 2.0, 60.0),
        "visceral": SiteSpec(0.05, 17.5, 0.60, 3.0, 80.0),
    }


@dataclass
class LesionSpec:
    """Lesions per patient, site mix and SUVmax, diameters (mm), necrosis (hidden property).

    ``per_patient_min = per_patient_max = per_patient_mean = n`` gives every patient exactly ``n``
    lesions: a **count-free** cohort, on which the number of lesions carries no information about
    the outcome (:func:`count_free`; ``psma-pfs generate --lesions-per-patient n``).
    """

    per_patient_mean: float = 4.0
    per_patient_min: int = 1
    per_patient_max: int = 10
    sites: dict[str, SiteSpec] = field(default_factory=_default_sites)
    diameter_median_mm: float = 14.0
    diameter_log_sd: float = 0.45
    diameter_min_mm: float = 5.0
    diameter_max_mm: float = 40.0
    necrosis_patient_sd: float = 1.5
    necrosis_lesion_sd: float = 0.7
    necrosis_offset: float = -0.8


@dataclass
class ClinicalSpec:
    """Clinical variables: distributions, treatment shares, missing-value rate."""

    age_mean: float = 70.0
    age_sd: float = 8.0
    bmi_median: float = 27.0
    bmi_log_sd: float = 0.15
    ecog_probs: list[float] = field(default_factory=lambda: [0.50, 0.38, 0.12])
    psa_median: float = 15.0
    psa_log_sd: float = 1.5
    psa_burden_correlation: float = 0.5
    gleason_probs: dict[int, float] = field(
        default_factory=lambda: {6: 0.05, 7: 0.35, 8: 0.25, 9: 0.30, 10: 0.05})
    treatment_probs: dict[str, float] = field(default_factory=lambda: {
        "adt": 0.92, "arpi": 0.60, "docetaxel": 0.35, "radiotherapy": 0.45, "lu_psma": 0.10})
    missing_fraction: float = 0.03
    missing_columns: list[str] = field(default_factory=lambda: ["age", "bmi", "ecog", "psa", "gleason"])


@dataclass
class OutcomeSpec:
    """Proportional-hazards ground truth (module docstring): coefficients, Weibull, censoring."""

    imaging_coefficients: dict[str, float] = field(default_factory=lambda: {
        "uptake": 0.80, "burden": 0.55, "count": 0.65, "bone": 1.10, "necrosis": 2.90})
    imaging_centres: dict[str, float] = field(default_factory=lambda: {
        "uptake": 3.6, "burden": 1.65, "count": 1.2, "bone": 0.55, "necrosis": 0.35})
    clinical_coefficients: dict[str, float] = field(default_factory=lambda: {
        "psa": 0.20, "ecog": 0.25, "gleason": 0.20, "age": 0.05, "docetaxel": 0.15, "lu_psma": 0.20})
    frailty_sd: float = 0.5
    weibull_shape: float = 1.4
    weibull_scale_months: dict[str, float] = field(default_factory=lambda: {
        "both": 46.0, "imaging": 36.0, "clinical": 38.0, "none": 30.0})
    accrual_months: float = 36.0
    min_followup_months: float = 24.0
    dropout_per_month: float = 0.005


@dataclass
class ImagingSpec:
    """Field of view, grids (mm), PET physics (PSF, noise), CT grid and noise, NIfTI output."""

    z_range_mm: list[float] = field(default_factory=lambda: [-60.0, 390.0])
    phantom_spacing_mm: list[float] = field(default_factory=lambda: [2.0, 2.0, 1.5])
    pet_spacing_mm: list[float] = field(default_factory=lambda: [4.0, 4.0, 3.0])
    ct_inplane_mm: list[float] = field(default_factory=lambda: [1.6, 2.0])
    ct_slice_mm: float = 3.0
    ct_flip_fraction: float = 0.4
    ct_origin_jitter_mm: float = 10.0
    ct_noise_hu: float = 12.0
    lesion_edge_margin_mm: float = 35.0
    psf_fwhm_mm: float = 6.0
    suvmax_is_measured: bool = True
    suvmax_recovery_factor: float = 0.76
    pet_noise_gain: float = 0.04
    pet_noise_correlation_vox: float = 0.7
    nifti_compresslevel: int = 1


@dataclass
class Spec:
    """Everything that shapes a synthetic cohort; defaults = data_manifest/synthetic_default.yaml."""

    lesions: LesionSpec = field(default_factory=LesionSpec)
    clinical: ClinicalSpec = field(default_factory=ClinicalSpec)
    outcome: OutcomeSpec = field(default_factory=OutcomeSpec)
    imaging: ImagingSpec = field(default_factory=ImagingSpec)


def count_free(spec: Spec, lesions_per_patient: int = 4) -> Spec:
    """A copy of ``spec`` in which every patient has exactly ``lesions_per_patient`` lesions.

    The count term of the outcome model is then the same constant for everyone, so a model can
    only rank patients by what their lesions look like (the control of a pixel-learning claim).

    >>> count_free(Spec(), 4).lesions.per_patient_max
    4
    """
    if lesions_per_patient < 1:
        raise InputError(f"lesions per patient must be >= 1, got {lesions_per_patient}")
    lesions = dataclasses.replace(spec.lesions, per_patient_mean=float(lesions_per_patient),
                                  per_patient_min=lesions_per_patient, per_patient_max=lesions_per_patient)
    return dataclasses.replace(spec, lesions=lesions)


def spec_to_dict(spec: Spec) -> dict:
    """Plain nested dict of a :class:`Spec` (what ``truth/spec.yaml`` holds)."""
    return dataclasses.asdict(spec)


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    if cls is SiteSpec:  # no defaults: every field is required
        missing = sorted(set(names) - set(data))
        if missing:
            raise InputError(f"{where}: missing key(s) {missing}")
        return SiteSpec(**{k: float(v) for k, v in data.items()})
    default = cls()
    kwargs = {}
    for name, value in data.items():
        current = getattr(default, name)
        if dataclasses.is_dataclass(current):
            kwargs[name] = _build(type(current), value, f"{where}.{name}")
        elif name == "sites":
            if not isinstance(value, dict) or set(value) != set(SITES):
                raise InputError(f"{where}.sites: need exactly the sites {list(SITES)}")
            kwargs[name] = {s: _build(SiteSpec, v, f"{where}.sites.{s}") for s, v in value.items()}
        else:
            kwargs[name] = value
    return cls(**kwargs)


def load_spec(path: str | os.PathLike | None = None) -> Spec:
    """Read a spec YAML (keys as in :class:`Spec`; missing keys keep their defaults).

    ``None`` returns the defaults. Unknown keys or a malformed file raise :class:`InputError`.

    >>> load_spec(None).lesions.per_patient_mean
    4.0
    """
    if path is None:
        return Spec()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read spec ({exc})", file=str(path)) from exc
    spec = _build(Spec, data or {}, str(path))
    fractions = sum(s.fraction for s in spec.lesions.sites.values())
    if abs(fractions - 1.0) > 1e-6:
        raise InputError(f"site fractions sum to {fractions:.4f}, not 1", file=str(path))
    return spec


# --------------------------------------------------------------------------- stage 1: tables
@dataclass
class CohortTables:
    """Everything drawn before rendering.

    ``patients``: patients.csv (clinical with missing values + ``pfs_months``, ``event``).
    ``lesions``: one row per lesion with its true properties (``lesion_truth.csv`` columns).
    ``truth``: one row per patient: parts of the log-hazard, frailty, event/censoring times.
    """

    patients: pd.DataFrame
    lesions: pd.DataFrame
    truth: pd.DataFrame


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def patient_ids(n_patients: int) -> list[str]:
    """``SYN001 ... SYN099`` (wider when there are more patients)."""
    width = max(3, len(str(n_patients)))
    return [f"SYN{i + 1:0{width}d}" for i in range(n_patients)]


def lesion_counts(n_patients: int, seed: int, spec: LesionSpec) -> np.ndarray:
    """Lesions per patient in [min, max], summing to exactly round(mean * n_patients)."""
    rng = _rng(seed, _STREAM_COUNTS)
    extra_mean = spec.per_patient_mean - spec.per_patient_min
    counts = spec.per_patient_min + rng.negative_binomial(2, 2 / (2 + extra_mean), n_patients)
    counts = np.clip(counts, spec.per_patient_min, spec.per_patient_max)
    target = int(round(spec.per_patient_mean * n_patients))
    lo, hi = spec.per_patient_min * n_patients, spec.per_patient_max * n_patients
    if not lo <= target <= hi:
        raise InputError(f"cannot place {target} lesions in {n_patients} patients with "
                         f"{spec.per_patient_min}-{spec.per_patient_max} each")
    while counts.sum() != target:  # nudge random patients until the total is exact
        step = 1 if counts.sum() < target else -1
        ok = np.flatnonzero((counts + step >= spec.per_patient_min) & (counts + step <= spec.per_patient_max))
        counts[rng.choice(ok)] += step
    return counts


def _imaging_features(les: pd.DataFrame) -> dict[str, float]:
    volume = float(les["volume_ml"].sum())
    return {
        "uptake": float(np.log(les["suvmax_true"].max())),
        "burden": float(np.log(volume)),
        "count": float(np.log(len(les))),
        "bone": float((les["site"] == "bone").mean()),
        "necrosis": float(np.average(les["necrosis"], weights=les["volume_ml"])),
    }


def _draw_patient(pid: str, n_lesions: int, rng: np.random.Generator, spec: Spec) -> tuple[dict, list[dict]]:
    ls, cs = spec.lesions, spec.clinical
    site_names = list(SITES)
    site_p = np.array([ls.sites[s].fraction for s in site_names])
    latent_necrosis = rng.normal(0.0, ls.necrosis_patient_sd)
    lesions = []
    for k in range(n_lesions):
        site = site_names[rng.choice(len(site_names), p=site_p)]
        ss = ls.sites[site]
        suvmax = float(np.clip(ss.suvmax_median * np.exp(ss.suvmax_log_sd * rng.standard_normal()),
                               ss.suvmax_min, ss.suvmax_max))
        diameter = float(np.clip(ls.diameter_median_mm * np.exp(ls.diameter_log_sd * rng.standard_normal()),
                                 ls.diameter_min_mm, ls.diameter_max_mm))
        aspect = rng.uniform(0.7, 1.0, 2)
        axes = diameter * np.array([1.0, *aspect])  # full axis lengths, mm
        necrosis = 1 / (1 + np.exp(-(ls.necrosis_offset + latent_necrosis
                                     + ls.necrosis_lesion_sd * rng.standard_normal())))
        lesions.append({
            "patient_id": pid, "lesion_id": f"{pid}_L{k + 1:02d}", "mask_label": k + 1, "site": site,
            "diameter_mm": round(diameter, 3), "axis2_mm": round(float(axes[1]), 3),
            "axis3_mm": round(float(axes[2]), 3),
            "volume_ml": float(np.pi / 6 * np.prod(axes) / 1000.0),
            "suvmax_true": round(suvmax, 3), "necrosis": round(float(necrosis), 4),
        })
    features = _imaging_features(pd.DataFrame(lesions))

    z_burden = (features["burden"] - spec.outcome.imaging_centres["burden"]) / 1.3
    rho = cs.psa_burden_correlation
    z_psa = rho * z_burden + np.sqrt(1 - rho**2) * rng.standard_normal()
    clinical = {
        "age": float(np.clip(round(rng.normal(cs.age_mean, cs.age_sd)), 45, 95)),
        "bmi": float(np.clip(round(cs.bmi_median * np.exp(cs.bmi_log_sd * rng.standard_normal()), 1), 17, 48)),
        "ecog": int(rng.choice(len(cs.ecog_probs), p=np.asarray(cs.ecog_probs) / sum(cs.ecog_probs))),
        "psa": round(float(cs.psa_median * np.exp(cs.psa_log_sd * z_psa)), 2),
        "gleason": int(rng.choice(list(cs.gleason_probs), p=np.asarray(list(cs.gleason_probs.values()))
                                  / sum(cs.gleason_probs.values()))),
    }
    for name in TREATMENTS:
        clinical[name] = int(rng.random() < cs.treatment_probs[name])
    clinical_terms = {
        "psa": (np.log(max(clinical["psa"], 1e-3)) - np.log(cs.psa_median)) / cs.psa_log_sd,
        "ecog": clinical["ecog"], "gleason": float(clinical["gleason"] >= 8),
        "age": (clinical["age"] - 70.0) / 10.0, "docetaxel": clinical["docetaxel"],
        "lu_psma": clinical["lu_psma"],
    }
    oc = spec.outcome
    imaging_part = sum(oc.imaging_coefficients[k] * (features[k] - oc.imaging_centres[k]) for k in features)
    clinical_part = sum(oc.clinical_coefficients[k] * v for k, v in clinical_terms.items())
    missing = {c: bool(rng.random() < cs.missing_fraction) for c in cs.missing_columns}
    draws = {"frailty_z": rng.standard_normal(), "exp": rng.exponential(), "accrual": rng.random(),
             "dropout": rng.exponential()}
    row = {"patient_id": pid, **clinical, "_missing": missing, "imaging_part": imaging_part,
           "clinical_part": clinical_part, "latent_necrosis": latent_necrosis,
           **{f"feature_{k}": v for k, v in features.items()}, **draws}
    return row, lesions


def sample_tables(n_patients: int = 99, seed: int = 0, signal: str = "both",
                  spec: Spec | None = None) -> CohortTables:
    """Draw clinical variables, lesion properties and outcomes for a cohort, without images.

    Patient ``i`` uses its own random stream (SeedSequence(seed, spawn_key=(1, i))); only the
    lesion counts are drawn cohort-wide (so that they sum exactly to mean * n_patients).

    >>> t = sample_tables(50, seed=1)
    >>> len(t.patients), len(t.lesions), bool(t.patients["pfs_months"].gt(0).all())
    (50, 200, True)
    """
    if signal not in SIGNALS:
        raise InputError(f"signal must be one of {list(SIGNALS)}, got {signal!r}")
    if n_patients < 1:
        raise InputError(f"need at least 1 patient, got {n_patients}")
    spec = spec or Spec()
    oc = spec.outcome
    ids = patient_ids(n_patients)
    counts = lesion_counts(n_patients, seed, spec.lesions)
    rows, lesions = [], []
    for i, (pid, n) in enumerate(zip(ids, counts, strict=True)):
        row, les = _draw_patient(pid, int(n), _rng(seed, _STREAM_TABLES, i), spec)
        rows.append(row)
        lesions.extend(les)
    df = pd.DataFrame(rows)
    use_imaging = signal in ("both", "imaging")
    use_clinical = signal in ("both", "clinical")
    lp = df["imaging_part"] * use_imaging + df["clinical_part"] * use_clinical
    frailty = df["frailty_z"] * (oc.frailty_sd if signal != "none" else 0.0)
    log_hazard = lp + frailty
    scale = oc.weibull_scale_months[signal]
    event_time = scale * (df["exp"] * np.exp(-log_hazard)) ** (1.0 / oc.weibull_shape)
    admin = oc.min_followup_months + oc.accrual_months * df["accrual"]
    dropout = df["dropout"] / oc.dropout_per_month
    censor_time = np.minimum(admin, dropout)
    pfs = np.minimum(event_time, censor_time)
    patients = df[["patient_id", *CLINICAL_COLUMNS]].copy()
    for col in ("age", "ecog", "gleason"):
        patients[col] = patients[col].astype("Int64")
    for i, miss in enumerate(df["_missing"]):
        for col, is_missing in miss.items():
            if is_missing:
                patients.loc[i, col] = pd.NA
    patients["pfs_months"] = np.round(np.maximum(pfs, 0.01), 3)
    patients["event"] = (event_time <= censor_time).astype(int)
    truth = pd.DataFrame({
        "patient_id": df["patient_id"], "linear_predictor": lp, "imaging_part": df["imaging_part"],
        "clinical_part": df["clinical_part"], "frailty": frailty, "log_hazard": log_hazard,
        "event_time_months": event_time, "censor_time_months": censor_time,
        "latent_necrosis": df["latent_necrosis"],
        **{c: df[c] for c in df.columns if c.startswith("feature_")},
        "n_lesions": counts, "bmi_true": df["bmi"], "signal": signal,
    })
    return CohortTables(patients=patients, lesions=pd.DataFrame(lesions), truth=truth)


# ------------------------------------------------------------------------ stage 2: images
# Tissue classes of the fine phantom grid: (name, HU mean, SUV mean, HU texture sd).
_TISSUES = (
    ("air", -1000.0, 0.0, 0.0), ("fat", -105.0, 0.25, 6.0), ("soft", 40.0, 0.7, 8.0),
    ("visceral_fat", -95.0, 0.3, 10.0), ("bowel", 30.0, 3.0, 10.0), ("gas", -950.0, 0.05, 20.0),
    ("liver", 58.0, 5.0, 5.0), ("spleen", 48.0, 4.0, 5.0), ("kidney_cortex", 34.0, 24.0, 5.0),
    ("kidney_pelvis", 15.0, 10.0, 5.0), ("bladder", 8.0, 40.0, 4.0), ("prostate", 38.0, 2.5, 6.0),
    ("blood", 42.0, 1.5, 4.0), ("lung", -860.0, 0.2, 40.0), ("bone", 350.0, 1.0, 45.0),
    ("cortex", 1100.0, 0.4, 150.0), ("muscle", 50.0, 0.8, 6.0), ("csf", 12.0, 0.3, 4.0),
)
_T = {name: i for i, (name, *_rest) in enumerate(_TISSUES)}
_SOFT_LESION_HOSTS = {
    "lymph_node": {"soft", "fat", "visceral_fat", "muscle", "blood", "bowel"},
    "prostate": {"prostate", "soft", "bladder", "fat", "muscle"},
    "visceral": {"liver", "lung"},
}


class _Phantom:
    """Fine world-aligned grid (RAS mm; axis 0 = x, 1 = y, 2 = z) with a tissue label volume."""

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray):
        self.x, self.y, self.z = x, y, z
        self.label = np.zeros((len(x), len(y), len(z)), np.uint8)
        self._voxels: dict[str, np.ndarray] = {}

    def voxels_of(self, tissue: str) -> np.ndarray:
        """Flat indices of the voxels of one tissue (cached: call after the anatomy is painted)."""
        if tissue not in self._voxels:
            self._voxels[tissue] = np.flatnonzero(self.label == _T[tissue])
        return self._voxels[tissue]

    def tissue_at(self, point) -> str:
        """Name of the tissue at a world point (nearest voxel, clamped to the grid)."""
        idx = tuple(int(np.clip(np.searchsorted(c, v), 0, len(c) - 1))
                    for c, v in zip((self.x, self.y, self.z), point, strict=True))
        return _TISSUES[self.label[idx]][0]

    def box(self, lo, hi):
        """Slices of the voxels with lo <= coordinate <= hi, and the local coordinate grids."""
        sl = []
        for axis, coords in enumerate((self.x, self.y, self.z)):
            i0 = int(np.searchsorted(coords, lo[axis]))
            i1 = int(np.searchsorted(coords, hi[axis], side="right"))
            sl.append(slice(i0, max(i0, i1)))
        sl = tuple(sl)
        return sl, (self.x[sl[0], None, None], self.y[None, sl[1], None], self.z[None, None, sl[2]])

    def ellipsoid(self, centre, radii, tissue, cortex_mm=0.0, rotation_deg=0.0, deform=None):
        """Paint an ellipsoid (optionally rotated about z, deformed, with a cortical shell)."""
        # Rotation is about z only; deformation may stretch the outline by up to ~25 %.
        reach = np.array([max(radii[0], radii[1]), max(radii[0], radii[1]), radii[2]]) * 1.25
        sl, (x, y, z) = self.box(np.subtract(centre, reach), np.add(centre, reach))
        if min(s.stop - s.start for s in sl) == 0:
            return
        c, s = np.cos(np.radians(rotation_deg)), np.sin(np.radians(rotation_deg))
        dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
        u, v = c * dx + s * dy, -s * dx + c * dy
        r = np.sqrt((u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (dz / radii[2]) ** 2)
        if deform is not None:
            r = r * (1 + deform[sl])
        self._paint(sl, r, tissue, cortex_mm / min(radii))

    def cylinder(self, p0, p1, radius, tissue, cortex_mm=0.0):
        """Paint a capsule of ``radius`` mm from point p0 to p1."""
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        sl, (x, y, z) = self.box(np.minimum(p0, p1) - radius, np.maximum(p0, p1) + radius)
        if min(s.stop - s.start for s in sl) == 0:
            return
        d = p1 - p0
        t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / d.dot(d), 0, 1)
        dist = np.sqrt((x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2)
        self._paint(sl, dist / radius, tissue, cortex_mm / radius)

    def _paint(self, sl, r, tissue, cortex_fraction):
        view = self.label[sl]
        inside = r < 1
        view[inside] = tissue
        if cortex_fraction > 0:
            view[inside & (r > 1 - cortex_fraction)] = _T["cortex"]


def _smooth_field(shape, corr_vox, rng) -> np.ndarray:
    """Gaussian random field (unit sd) correlated over ~corr_vox voxels, by linear up-sampling."""
    coarse_shape = [int(np.ceil(n / c)) + 2 for n, c in zip(shape, corr_vox, strict=True)]
    out = rng.standard_normal(coarse_shape).astype(np.float32)
    for axis, (n, c) in enumerate(zip(shape, corr_vox, strict=True)):
        out = _interp_axis(out, axis, np.arange(n) / c + 0.5)
    return out / 0.75  # linear interpolation of white noise lowers the sd to ~0.75


def _interp_axis(vol: np.ndarray, axis: int, coords: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``vol`` along one axis at fractional indices (edge-clamped)."""
    coords = np.clip(coords, 0, vol.shape[axis] - 1)
    i0 = np.minimum(np.floor(coords).astype(int), vol.shape[axis] - 2) if vol.shape[axis] > 1 else np.zeros(len(coords), int)
    w = (coords - i0).astype(np.float32)
    shape = [1] * vol.ndim
    shape[axis] = len(coords)
    w = w.reshape(shape)
    a = np.take(vol, i0, axis=axis)
    if vol.shape[axis] == 1:
        return a
    return a * (1 - w) + np.take(vol, i0 + 1, axis=axis) * w


def _anatomy(ph: _Phantom, rng: np.random.Generator, bmi: float, deform: np.ndarray, texture: np.ndarray) -> dict:
    """Paint body, organs, vessels and skeleton; return the landmarks lesion placement needs."""
    size = math.sqrt(bmi / 27.0)  # Python floats keep the float32 grids in float32
    ax, ay = 150 * size * rng.uniform(0.93, 1.07), 105 * size * rng.uniform(0.93, 1.07)
    fat = float(np.clip(8 + 2.2 * (bmi - 20), 6, 45)) * rng.uniform(0.8, 1.2)
    X, Y, Z = ph.x[:, None, None], ph.y[None, :, None], ph.z[None, None, :]
    ax_z = ax * (0.9 + 0.12 * np.exp(-(((Z - 40) / 90) ** 2)))
    ay_z = ay * (0.9 + 0.12 * np.exp(-(((Z - 220) / 120) ** 2)))
    body_r = np.sqrt((X / ax_z) ** 2 + (Y / ay_z) ** 2) * (1 + 0.04 * deform)
    ph.label[body_r < 1] = _T["fat"]
    inner_r = np.sqrt((X / (ax_z - fat)) ** 2 + (Y / (ay_z - fat)) ** 2) * (1 + 0.04 * deform)
    ph.label[inner_r < 1] = _T["soft"]
    axi, ayi = ax * 0.95 - fat, ay * 0.95 - fat  # inner (sub-fascial) half-axes, mm
    y_spine = -ayi + 48  # vertebral body centre, posterior
    # Abdominal cavity: visceral fat with bowel loops (moderate PSMA uptake) and gas pockets.
    sl, (x, y, z) = ph.box((-axi, -ayi, 20), (axi, ayi, 330))
    cav = ((x / (axi - 20)) ** 2 + ((y - 15) / (ayi - 15)) ** 2) < 1
    cav = cav & (z > 20) & (z < 330)
    tex = texture[sl]
    view = ph.label[sl]
    view[cav] = _T["visceral_fat"]
    view[cav & (tex > -0.1)] = _T["bowel"]
    view[cav & (tex > 1.6)] = _T["gas"]
    # Liver and spleen before the back muscles, which then bound them posteriorly.
    # RAS: +x is the patient's right, so the liver is at +x.
    ph.ellipsoid((0.35 * axi, 0.05 * ayi, 345), (0.62 * axi, 0.8 * ayi, 100), _T["liver"], deform=0.06 * deform)
    ph.ellipsoid((-0.62 * axi, -0.35 * ayi, 330), (32, 50, 55), _T["spleen"], deform=0.06 * deform)
    # Muscles: psoas, paraspinal, gluteal.
    for s in (-1, 1):
        ph.cylinder((s * 28, y_spine + 5, 300), (s * 55, y_spine + 25, 60), 20, _T["muscle"])
        ph.ellipsoid((s * 38, y_spine - 48, 260), (24, 20, 160), _T["muscle"], deform=0.05 * deform)
        ph.ellipsoid((s * (axi - 45), -ayi + 40, 40), (55, 45, 80), _T["muscle"], deform=0.05 * deform)
    for s, dz in ((1, -15), (-1, 0)):
        centre = (s * 68, y_spine + 8, 260 + dz)
        ph.ellipsoid(centre, (30, 26, 55), _T["kidney_cortex"], rotation_deg=s * 25, deform=0.04 * deform)
        ph.ellipsoid((centre[0] - s * 6, centre[1] + 4, centre[2]), (14, 12, 30), _T["kidney_pelvis"])
    bladder = (0.0, 0.42 * ayi, 45.0)
    ph.ellipsoid(bladder, np.array([45, 36, 34]) * rng.uniform(0.7, 1.2), _T["bladder"], deform=0.05 * deform)
    prostate = (0.0, 0.42 * ayi - 12, -8.0)
    ph.ellipsoid(prostate, (20, 16, 17), _T["prostate"])
    ph.cylinder((0, y_spine - 8, 95), (0, 0.1 * ayi - 10, -30), 15, _T["bowel"])  # rectum
    # Vessels: aorta, IVC, common + external iliac arteries.
    aorta_y = y_spine + 32
    ph.cylinder((-8, aorta_y, 150), (-8, aorta_y, 400), 11, _T["blood"])
    ph.cylinder((22, aorta_y - 2, 140), (22, aorta_y - 2, 400), 12, _T["blood"])
    iliac_chain = []
    for s in (-1, 1):
        # Along the pelvic brim, anterior to the acetabulum, to the groin.
        mid, low = (s * 45, aorta_y, 80), (s * 75, 0.45 * ayi + 10, -25)
        ph.cylinder((-8, aorta_y, 150), mid, 7, _T["blood"])
        ph.cylinder(mid, low, 7, _T["blood"])
        iliac_chain += [((-8, aorta_y, 150), mid), (mid, low)]
    para_aortic = [((-8, aorta_y, 150), (-8, aorta_y, 330))]
    # Lung bases: above the diaphragm domes, posterior-lateral.
    sl, (x, y, z) = ph.box((-axi, -ayi, 300), (axi, ayi, 500))
    dome = 420 - 70 * ((np.abs(x) - 0.5 * axi) / (0.5 * axi)) ** 2 - 60 * ((y - 0.4 * ayi) / ayi) ** 2
    thorax = ((x / (axi - 8)) ** 2 + (y / (ayi - 8)) ** 2 < 1) & (np.abs(x) > 35) & (z > dome)
    ph.label[sl][thorax] = _T["lung"]
    # Skeleton: vertebrae (body, arch, processes), sacrum, ilia, acetabula, femora, pubis, ischia, ribs.
    vertebrae = []
    for level, zc in enumerate(np.arange(140, 420, 34)):
        w = 22 + level * 0.5
        ph.ellipsoid((0, y_spine, zc), (w, 17, 15), _T["bone"], cortex_mm=2.0)
        ph.ellipsoid((0, y_spine - 30, zc), (17, 13, 12), _T["bone"], cortex_mm=2.0)
        ph.ellipsoid((0, y_spine - 52, zc - 4), (5, 16, 10), _T["bone"], cortex_mm=1.5)
        for s in (-1, 1):
            ph.ellipsoid((s * 34, y_spine - 26, zc), (17, 6, 7), _T["bone"], cortex_mm=1.5)
        ph.ellipsoid((0, y_spine - 30, zc), (9, 8, 20), _T["csf"])
        vertebrae.append((0.0, y_spine, float(zc)))
    for zc in np.arange(50, 135, 12):  # sacrum, narrowing downwards, curving posteriorly
        w = 16 + 34 * (zc - 40) / 85
        ph.ellipsoid((0, y_spine - 12 - (130 - zc) * 0.25, zc), (w, 16, 9), _T["bone"], cortex_mm=1.5)
    for s in (-1, 1):
        ph.ellipsoid((s * 88, y_spine + 10, 150), (72, 9, 55), _T["bone"], cortex_mm=2.0,
                     rotation_deg=s * 35, deform=0.05 * deform)  # iliac wing
        ph.ellipsoid((s * 78, -5, 55), (22, 30, 45), _T["bone"], cortex_mm=2.5)  # iliac body
        head = (s * 88, 8, 5)
        # Acetabulum: a bony cup over the head, superior and medial only.
        ph.ellipsoid((s * 80, 5, 15), (22, 26, 24), _T["bone"], cortex_mm=3.0)
        ph.ellipsoid(head, (25, 25, 25), _T["soft"])  # joint space
        ph.ellipsoid(head, (23, 23, 23), _T["bone"], cortex_mm=2.0)  # femoral head
        ph.cylinder(head, (s * 125, 0, -20), 15, _T["bone"], cortex_mm=2.5)  # neck
        ph.ellipsoid((s * 128, -3, -20), (17, 22, 22), _T["bone"], cortex_mm=2.5)  # trochanter
        ph.cylinder((s * 122, 5, -25), (s * 115, 10, -200), 15, _T["bone"], cortex_mm=5.0)  # shaft
        ph.ellipsoid((s * 22, 0.4 * ayi, -12), (20, 9, 12), _T["bone"], cortex_mm=2.0)  # pubis
        ph.ellipsoid((s * 58, -30, -40), (14, 20, 30), _T["bone"], cortex_mm=2.5)  # ischium
    for z_rib in (330.0, 360.0, 390.0, 420.0):  # lower ribs: descend anteriorly, open in front
        sl, (x, y, z) = ph.box((-axi, -ayi, z_rib - 70), (axi, 0.3 * ayi, z_rib + 8))
        a, b = axi - 6, ayi - 6
        radial = (np.sqrt((x / a) ** 2 + (y / b) ** 2) - 1) * (a + b) / 2
        dz = z - (z_rib - 0.3 * (y + ayi))
        r = np.sqrt((radial / 5) ** 2 + (dz / 7) ** 2)
        ph._paint(sl, r, _T["bone"], 0.5)
    return {"vertebrae": vertebrae, "iliac_chain": iliac_chain, "para_aortic": para_aortic,
            "prostate": prostate, "bladder": bladder}


def _place_lesion(site: str, radius: float, ph: _Phantom, marks: dict, placed: list, rng,
                  edge_mm: float) -> np.ndarray:
    """A world centre (mm) for a lesion of ``site``, away from lesions already placed."""
    best = None
    for _attempt in range(40):
        if site == "bone":
            i, j, k = np.unravel_index(rng.choice(ph.voxels_of("bone")), ph.label.shape)
            centre = np.array([ph.x[i], ph.y[j], ph.z[k]])
        elif site == "lymph_node":
            chains = marks["iliac_chain"] + marks["para_aortic"]
            p0, p1 = (np.asarray(p) for p in chains[rng.integers(len(chains))])
            angle = rng.uniform(0, 2 * np.pi)
            offset = (radius + rng.uniform(9, 14)) * np.array([np.cos(angle), np.sin(angle), 0.0])
            centre = p0 + rng.random() * (p1 - p0) + offset
        elif site == "prostate":
            centre = np.asarray(marks["prostate"]) + rng.uniform(-7, 7, 3)
        else:  # visceral: liver, or a lung base when the dice say so and lung is in view
            organ = "lung" if rng.random() < 0.3 and len(ph.voxels_of("lung")) else "liver"
            i, j, k = np.unravel_index(rng.choice(ph.voxels_of(organ)), ph.label.shape)
            centre = np.array([ph.x[i], ph.y[j], min(ph.z[k], ph.z[-1] - radius - 6)])
        gap = min((np.linalg.norm(centre - c) - radius - r for c, r in placed), default=np.inf)
        # Soft-tissue lesions must not sit in bone, air or an unrelated organ; no lesion sits
        # closer than ``edge_mm`` to the top/bottom of the field of view (a whole-body scan's
        # lesions are not cut by it).
        fits = (site == "bone" or ph.tissue_at(centre) in _SOFT_LESION_HOSTS[site]) and (
            ph.z[0] + edge_mm <= centre[2] <= ph.z[-1] - edge_mm)
        score = (fits, gap > 2.0, gap)
        if score[:2] == (True, True):
            return centre
        if best is None or score > best[0]:
            best = (score, centre)
    return best[1]


def _random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _paint_lesion(ph: _Phantom, hu, act, lesion_lab, centre, les: dict, host: str,
                  texture: np.ndarray, rng) -> tuple:
    """Write one lesion into the HU, activity and lesion-label volumes; return its bounding box."""
    semi = np.array([les["diameter_mm"], les["axis2_mm"], les["axis3_mm"]]) / 2
    reach = semi.max() * 1.3 + 2
    sl, (x, y, z) = ph.box(centre - reach, centre + reach)
    rot = _random_rotation(rng)
    d = [x - centre[0], y - centre[1], z - centre[2]]
    u = [rot[0, a] * d[0] + rot[1, a] * d[1] + rot[2, a] * d[2] for a in range(3)]
    r_ell = np.sqrt(sum((u[a] / semi[a]) ** 2 for a in range(3)))
    norm = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2) + 1e-6
    lobulation = np.ones_like(r_ell)
    amplitude = rng.uniform(0.05, 0.18)
    for _ in range(3):  # irregular, lobulated outline
        v = rng.standard_normal(3)
        v /= np.linalg.norm(v)
        cosang = (d[0] * v[0] + d[1] * v[1] + d[2] * v[2]) / norm
        lobulation = lobulation + amplitude / 3 * np.cos(rng.integers(2, 5) * np.pi * cosang + rng.uniform(0, 2 * np.pi))
    r = r_ell / lobulation
    inside = r < 1
    nec = les["necrosis"]
    core = np.exp(-((r / 0.65) ** 2))  # 1 at the centre, ~0.1 at the rim
    heterogeneity = np.clip(0.85 + 0.15 * texture[sl], 0.4, 1.0)
    edge = np.clip((1 - r) / 0.15, 0, 1)
    uptake = les["peak_activity"] * heterogeneity * (1 - nec * core)
    act[sl] = np.where(inside, np.maximum(uptake * edge, act[sl] * (1 - edge)), act[sl])
    site = les["site"]
    if site == "bone":  # sclerotic (necrosis ~0) ... lytic (necrosis ~1)
        lesion_hu = 220 + 800 * (1 - nec) * (0.8 + 0.2 * heterogeneity) + 120 * (1 - core) * (1 - nec)
        # Bone-forming only inside bone; an extra-osseous component is soft tissue.
        in_bone = (ph.label[sl] == _T["bone"]) | (ph.label[sl] == _T["cortex"])
        lesion_hu = np.where(in_bone, lesion_hu, 45 - 30 * nec * core)
    elif site == "visceral" and host == "liver":
        lesion_hu = 38 - 25 * nec * core
    else:  # nodes, prostate bed, lung nodules: soft tissue with a hypodense necrotic core
        lesion_hu = 42 - 32 * nec * core
    hu[sl] = np.where(inside, lesion_hu, hu[sl])
    lesion_lab[sl][inside] = les["mask_label"]
    return sl


def recovery_coefficient(diameter_mm: float, fwhm_mm: float, voxel_mm) -> float:
    """Expected measured/true SUVmax of a uniform sphere (Gaussian PSF + voxel averaging).

    Centre value of a sphere of radius r blurred by a Gaussian of sd s:
    erf(a / sqrt 2) - sqrt(2 / pi) * a * exp(-a^2 / 2), a = r / s, with s^2 = (FWHM / 2.355)^2
    + mean(voxel^2) / 12. Floored at 0.2 so that 5 mm lesions do not get absurd peaks.

    >>> round(recovery_coefficient(30.0, 6.0, (4, 4, 3)), 2)
    1.0
    >>> round(recovery_coefficient(8.0, 6.0, (4, 4, 3)), 2)
    0.45
    """
    sd = np.sqrt((fwhm_mm / (2 * np.sqrt(2 * np.log(2)))) ** 2 + np.mean(np.square(voxel_mm)) / 12)
    a = diameter_mm / 2 / sd
    rc = math.erf(a / np.sqrt(2)) - np.sqrt(2 / np.pi) * a * np.exp(-(a**2) / 2)
    return float(max(rc, 0.2))


def _block_mean(vol: np.ndarray, factor: tuple[int, int, int]) -> np.ndarray:
    n = [s // f for s, f in zip(vol.shape, factor, strict=True)]
    v = vol[: n[0] * factor[0], : n[1] * factor[1], : n[2] * factor[2]]
    return v.reshape(n[0], factor[0], n[1], factor[1], n[2], factor[2]).mean(axis=(1, 3, 5))


def render_patient(pid: str, bmi: float, lesions: list[dict], rng: np.random.Generator,
                   spec: ImagingSpec) -> dict:
    """Draw one patient's anatomy, place and paint the lesions, simulate PET and CT.

    Args:
        pid: patient id (error messages only).
        bmi: body-mass index (kg/m^2); sets body size and subcutaneous fat.
        lesions: rows of :func:`sample_tables` ``.lesions`` for this patient.
        rng: the patient's own random stream.
        spec: imaging spec.

    Returns:
        dict with ``pet`` float32 (I, J, K) SUV and ``pet_affine``; ``ct`` int16 and ``ct_affine``
        (its own grid); ``mask`` uint8 on the PET grid; ``centres`` (n_lesions, 3) world mm;
        ``hosts`` (tissue at each centre); ``suvmax_pet`` (measured in the mask, after blur,
        partial volume and noise).
    """
    ph_sp = np.asarray(spec.phantom_spacing_mm, float)
    factor = tuple(int(round(p / f)) for p, f in zip(spec.pet_spacing_mm, ph_sp, strict=True))
    size = np.sqrt(bmi / 27.0)
    half = (np.array([150 * size * 1.07 * 1.02, 105 * size * 1.07 * 1.02]) + 15)
    z0, z1 = spec.z_range_mm
    shape = [int(np.ceil(2 * half[0] / ph_sp[0])), int(np.ceil(2 * half[1] / ph_sp[1])),
             int(np.ceil((z1 - z0) / ph_sp[2]))]
    shape = [n + (-n) % f for n, f in zip(shape, factor, strict=True)]  # whole PET voxels
    x = (-half[0] + ph_sp[0] * (np.arange(shape[0]) + 0.5)).astype(np.float32)
    y = (-half[1] + ph_sp[1] * (np.arange(shape[1]) + 0.5)).astype(np.float32)
    z = (z0 + ph_sp[2] * (np.arange(shape[2]) + 0.5)).astype(np.float32)
    ph = _Phantom(x, y, z)
    deform = _smooth_field(shape, (20, 20, 27), rng)
    # Smoothed once more so that thresholds (bowel loops vs fat) have no piecewise-linear kinks.
    texture = ndimage.gaussian_filter(_smooth_field(shape, (5, 5, 7), rng), 1.5)
    texture /= texture.std()
    marks = _anatomy(ph, rng, bmi, deform, texture)

    hu_mean = np.array([t[1] for t in _TISSUES], np.float32)
    hu_sd = np.array([t[3] for t in _TISSUES], np.float32)
    suv = np.array([t[2] for t in _TISSUES], np.float32) * np.exp(rng.normal(0, 0.2, len(_TISSUES))).astype(np.float32)
    suv[_T["bladder"]] *= np.float32(np.exp(rng.normal(0, 0.4)))
    hu = hu_mean[ph.label] + hu_sd[ph.label] * texture
    act = suv[ph.label] * (1 + 0.1 * texture)
    lesion_lab = np.zeros(shape, np.uint8)
    centres, placed, boxes, hosts = [], [], [], []
    voxel = np.asarray(spec.pet_spacing_mm, float)
    for les in lesions:
        radius = les["diameter_mm"] / 2
        les = dict(les, peak_activity=les["suvmax_true"])
        if spec.suvmax_is_measured:  # published SUVmax are measured: undo the expected PV loss
            d_eq = float(np.cbrt(les["diameter_mm"] * les["axis2_mm"] * les["axis3_mm"]))
            les["peak_activity"] /= spec.suvmax_recovery_factor * recovery_coefficient(
                d_eq, spec.psf_fwhm_mm, voxel)
        centre = _place_lesion(les["site"], radius, ph, marks, placed, rng, spec.lesion_edge_margin_mm)
        hosts.append(ph.tissue_at(centre))
        boxes.append(_paint_lesion(ph, hu, act, lesion_lab, centre, les, hosts[-1], texture, rng))
        placed.append((centre, radius))
        centres.append(centre)

    # PET: point-spread blur on the fine grid, average into PET voxels (partial volume), noise.
    sigma = spec.psf_fwhm_mm / (2 * np.sqrt(2 * np.log(2))) / ph_sp
    clean = _block_mean(ndimage.gaussian_filter(act, sigma, mode="constant"), factor)
    cs = spec.pet_noise_correlation_vox
    noise = ndimage.gaussian_filter(rng.standard_normal(clean.shape).astype(np.float32), cs)
    noise /= np.float32((1 / (2 * np.sqrt(np.pi) * cs)) ** 1.5)
    pet = np.maximum(clean + np.sqrt(spec.pet_noise_gain * np.maximum(clean, 0)) * noise, 0).astype(np.float32)
    pet_sp = ph_sp * factor
    pet_affine = np.diag([*pet_sp, 1.0])
    pet_affine[:3, 3] = [x[0] - ph_sp[0] / 2 + pet_sp[0] / 2, y[0] - ph_sp[1] / 2 + pet_sp[1] / 2,
                         z[0] - ph_sp[2] / 2 + pet_sp[2] / 2]

    # Lesion mask on the PET grid: a PET voxel belongs to lesion k when >= half of it does.
    mask = np.zeros(pet.shape, np.uint8)
    for les, sl in zip(lesions, boxes, strict=True):
        k = les["mask_label"]
        lo = [s.start // f * f for s, f in zip(sl, factor, strict=True)]
        hi = [min(-(-s.stop // f) * f, n) for s, f, n in zip(sl, factor, shape, strict=True)]
        part = lesion_lab[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] == k
        frac = _block_mean(part.astype(np.float32), factor)
        view = mask[lo[0] // factor[0]:hi[0] // factor[0], lo[1] // factor[1]:hi[1] // factor[1],
                    lo[2] // factor[2]:hi[2] // factor[2]]
        if frac.max() < 0.5:  # tiny lesion: keep its most-covered voxel so it stays in the mask
            view[np.unravel_index(np.argmax(frac), frac.shape)] = k
        view[frac >= 0.5] = k
    missing = {les["mask_label"] for les in lesions} - set(np.unique(mask).tolist())
    for les, centre in zip(lesions, centres, strict=True):  # covered by a later, overlapping lesion
        if les["mask_label"] in missing:
            ijk = np.round(np.linalg.solve(pet_affine, [*centre, 1])[:3]).astype(int)
            mask[tuple(np.clip(ijk, 0, np.array(mask.shape) - 1))] = les["mask_label"]

    # CT: slice-profile/partial-volume blur, then sampled on the CT's own grid (finer in-plane,
    # 3 mm slices, own origin, x/y possibly stored flipped), plus quantum noise inside the body.
    ct_in = rng.uniform(*spec.ct_inplane_mm)
    ct_sp = np.array([ct_in, ct_in, spec.ct_slice_mm])
    jitter = rng.uniform(-spec.ct_origin_jitter_mm, spec.ct_origin_jitter_mm, 3)
    lo_w = np.array([x[0], y[0], z[0]]) - ph_sp / 2 + jitter * [1, 1, 0.3]
    hi_w = np.array([x[-1], y[-1], z[-1]]) + ph_sp / 2 + jitter * [1, 1, 0.3]
    n_ct = np.floor((hi_w - lo_w) / ct_sp).astype(int)
    flip = rng.random() < spec.ct_flip_fraction
    ct_affine = np.diag([*ct_sp, 1.0])
    ct_affine[:3, 3] = lo_w + ct_sp / 2
    if flip:  # LPS-like storage: index i runs towards -x, j towards -y
        for a in (0, 1):
            ct_affine[a, a] = -ct_sp[a]
            ct_affine[a, 3] = lo_w[a] + ct_sp[a] * (n_ct[a] - 0.5)
    smooth = ndimage.gaussian_filter(hu, (0.4, 0.4, spec.ct_slice_mm / 2.355 / ph_sp[2]))
    ct = smooth
    for a, coords in enumerate((x, y, z)):
        world = ct_affine[a, a] * np.arange(n_ct[a]) + ct_affine[a, 3]
        ct = _interp_axis(ct, a, (world - coords[0]) / ph_sp[a])
    # The phantom has a 15 mm air margin, so edge-clamped samples beyond it are air.
    body = ct > -900
    ct = ct + body * rng.normal(0, spec.ct_noise_hu, ct.shape).astype(np.float32)
    ct = np.clip(np.round(ct), -1024, 3071).astype(np.int16)
    suvmax_pet = [float(pet[mask == les["mask_label"]].max()) for les in lesions]
    return {"pet": pet, "pet_affine": pet_affine, "ct": ct, "ct_affine": ct_affine, "mask": mask,
            "centres": np.array(centres), "hosts": hosts, "suvmax_pet": suvmax_pet}


def _write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, level: int) -> None:
    """gzip NIfTI with mtime 0, so the same array gives the same file bytes (and SHA-256)."""
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=level, mtime=0))


def _render_job(job: dict) -> dict:
    """Worker: render one patient into ``job['root']/images``; return its lesion centres."""
    spec = _build(ImagingSpec, job["imaging"], "imaging")
    out = render_patient(job["pid"], job["bmi"], job["lesions"],
                         _rng(job["seed"], _STREAM_RENDER, job["index"]), spec)
    root, pid = Path(job["root"]), job["pid"]
    paths = {kind: f"images/{pid}_{kind}.nii.gz" for kind in ("pet", "ct", "mask")}
    for kind, path in paths.items():
        _write_nifti(root / path, out[kind], out[f"{kind}_affine" if kind != "mask" else "pet_affine"],
                     spec.nifti_compresslevel)
    return {"pid": pid, "paths": paths, "centres": out["centres"].tolist(), "hosts": out["hosts"],
            "suvmax_pet": out["suvmax_pet"]}


def generate_cohort(out_dir: str | os.PathLike, n_patients: int = 99, seed: int = 0,
                    signal: str = "both", spec: Spec | None = None, workers: int = 2,
                    progress: bool = True) -> Path:
    """Write a synthetic cohort directory (docs/ARCHITECTURE.md) and return its manifest path.

    The whole directory is built in a temporary folder and renamed at the end, so a failure
    leaves nothing behind. Results do not depend on ``workers``.

    >>> import tempfile
    >>> coarse = Spec(imaging=ImagingSpec(phantom_spacing_mm=[4.0, 4.0, 3.0], ct_inplane_mm=[3.0, 3.0]))
    >>> manifest = generate_cohort(Path(tempfile.mkdtemp()) / "tiny", n_patients=1, spec=coarse,
    ...                            workers=1, progress=False)
    >>> manifest.name, sorted(p.name for p in (manifest.parent / "images").iterdir())
    ('manifest.yaml', ['SYN001_ct.nii.gz', 'SYN001_mask.nii.gz', 'SYN001_pet.nii.gz'])
    """
    from tqdm.auto import tqdm

    from .manifest import write_manifest

    spec = spec or Spec()
    tables = sample_tables(n_patients, seed, signal, spec)
    out_dir = Path(out_dir)
    bmi_true = dict(zip(tables.truth["patient_id"], tables.truth["bmi_true"], strict=True))
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        (tmp / "truth").mkdir()
        jobs = [{"pid": pid, "index": i, "seed": seed, "bmi": float(bmi_true[pid]), "root": str(tmp),
                 "imaging": dataclasses.asdict(spec.imaging),
                 "lesions": tables.lesions[tables.lesions["patient_id"] == pid].to_dict("records")}
                for i, pid in enumerate(tables.patients["patient_id"])]
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
        lesion_truth = tables.lesions.copy()
        centres = np.concatenate([np.asarray(r["centres"]).reshape(-1, 3) for r in results])
        lesion_truth[["center_x_mm", "center_y_mm", "center_z_mm"]] = np.round(centres, 2)
        lesion_truth["host_tissue"] = [h for r in results for h in r["hosts"]]
        lesion_truth["suvmax_pet"] = np.round([v for r in results for v in r["suvmax_pet"]], 3)
        lesion_truth["bone_ct_pattern"] = np.where(
            lesion_truth["site"] != "bone", "",
            np.select([lesion_truth["necrosis"] < 1 / 3, lesion_truth["necrosis"] < 2 / 3],
                      ["sclerotic", "mixed"], "lytic"))
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
    """
    path = Path(cohort_dir) / "truth" / "truth.csv"
    if not path.is_file():
        raise InputError("no truth/truth.csv: not a synthetic cohort (or truth was removed)", file=str(path))
    return pd.read_csv(path, dtype={"patient_id": str})


def _cli_generate(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    if args.lesions_per_patient is not None:
        spec = count_free(spec, args.lesions_per_patient)
    manifest = generate_cohort(args.out, n_patients=args.patients, seed=args.seed, signal=args.signal,
                               spec=spec, workers=args.workers,
                               progress=not args.no_progress)
    print(manifest)
    return 0


def register_cli(subparsers) -> None:
    """Add ``psma-pfs generate``."""
    p = subparsers.add_parser("generate", help="write a synthetic PSMA PET/CT cohort (NIfTI + tables)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="cohort directory to create (replaced if it exists)")
    p.add_argument("--patients", type=int, default=99, help="number of patients (default 99)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--signal", choices=SIGNALS, default="both",
                   help="what drives the outcome: both (default), imaging, clinical, none")
    p.add_argument("--spec", default=None, help="spec YAML (default: built-in = data_manifest/synthetic_default.yaml)")
    p.add_argument("--lesions-per-patient", type=int, default=None, metavar="N",
                   help="every patient gets exactly N lesions: a count-free control cohort")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli_generate)
