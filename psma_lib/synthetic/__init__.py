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

Modules: :mod:`.spec` (the :class:`Spec` dataclasses, :func:`load_spec`), :mod:`.outcome`
(stage 1), :mod:`.phantom` (anatomy and lesions on the fine grid), :mod:`.scanner` (PET and CT
physics, :func:`render_patient`), :mod:`.cohort` (the cohort directory), :mod:`.cli`
(``psma-pfs generate``). Everything public is importable from ``psma_lib.synthetic``.

>>> tables = sample_tables(200, seed=0)
>>> len(tables.patients), int(tables.truth["n_lesions"].sum())
(200, 800)
"""

from ..vocabulary import CLINICAL_COLUMNS, SITES
from ..vocabulary import TREATMENT_COLUMNS as TREATMENTS
from .cli import register_cli
from .cohort import generate_cohort, load_lesion_truth, load_truth
from .outcome import CohortTables, lesion_counts, patient_ids, sample_tables
from .scanner import recovery_coefficient, render_patient
from .spec import (
    DEFAULT_SPEC_PATH,
    SIGNALS,
    ClinicalSpec,
    ImagingSpec,
    LesionSpec,
    OutcomeSpec,
    SiteSpec,
    Spec,
    count_free,
    load_spec,
    spec_to_dict,
)

__all__ = [
    "CLINICAL_COLUMNS", "DEFAULT_SPEC_PATH", "SIGNALS", "SITES", "TREATMENTS",
    "ClinicalSpec", "CohortTables", "ImagingSpec", "LesionSpec", "OutcomeSpec", "SiteSpec", "Spec",
    "count_free", "generate_cohort", "lesion_counts", "load_lesion_truth", "load_spec", "load_truth", "patient_ids",
    "recovery_coefficient", "register_cli", "render_patient", "sample_tables", "spec_to_dict",
]
