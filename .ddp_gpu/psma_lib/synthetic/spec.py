"""What shapes a synthetic cohort: the spec dataclasses, their YAML reader and writer.

Every default equals ``data_manifest/synthetic_default.yaml`` (:data:`DEFAULT_SPEC_PATH`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import InputError
from ..vocabulary import SITES

SIGNALS = ("both", "imaging", "clinical", "none")
# psma_lib/synthetic/spec.py -> repository root -> data_manifest/
DEFAULT_SPEC_PATH = (Path(__file__).resolve().parent.parent.parent
                     / "data_manifest" / "synthetic_default.yaml")


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
    """Proportional-hazards ground truth (package docstring): coefficients, Weibull, censoring."""

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
    """Plain nested dict of a :class:`Spec` (what ``truth/spec.yaml`` holds).

    >>> spec_to_dict(Spec())["imaging"]["pet_spacing_mm"]
    [4.0, 4.0, 3.0]
    """
    return dataclasses.asdict(spec)


def build_spec(cls, data, where: str):
    """An instance of the spec dataclass ``cls`` from a (nested) mapping such as :func:`spec_to_dict`'s.

    Missing keys keep their defaults (except in a :class:`SiteSpec`, which has none); unknown
    keys raise :class:`InputError` naming ``where`` (the file and key path, for messages).

    >>> build_spec(ImagingSpec, {"psf_fwhm_mm": 5.0}, "imaging").psf_fwhm_mm
    5.0
    """
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
            kwargs[name] = build_spec(type(current), value, f"{where}.{name}")
        elif name == "sites":
            if not isinstance(value, dict) or set(value) != set(SITES):
                raise InputError(f"{where}.sites: need exactly the sites {list(SITES)}")
            kwargs[name] = {s: build_spec(SiteSpec, v, f"{where}.sites.{s}") for s, v in value.items()}
        else:
            kwargs[name] = value
    return cls(**kwargs)


def load_spec(path: str | os.PathLike | None = None) -> Spec:
    """Read a spec YAML (keys as in :class:`Spec`; missing keys keep their defaults).

    ``None`` returns the defaults. Unknown keys or a malformed file raise :class:`InputError`.

    >>> load_spec(None).lesions.per_patient_mean
    4.0
    >>> load_spec(DEFAULT_SPEC_PATH) == Spec()
    True
    """
    if path is None:
        return Spec()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read spec ({exc})", file=str(path)) from exc
    spec = build_spec(Spec, data or {}, str(path))
    fractions = sum(s.fraction for s in spec.lesions.sites.values())
    if abs(fractions - 1.0) > 1e-6:
        raise InputError(f"site fractions sum to {fractions:.4f}, not 1", file=str(path))
    return spec
