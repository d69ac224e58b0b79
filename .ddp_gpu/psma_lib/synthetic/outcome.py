"""Stage 1: clinical variables, lesion properties and the proportional-hazards outcome.

Everything a cohort's tables hold is drawn here, without images (the package docstring states
the outcome model). Patient ``i`` draws from its own random stream, so the tables do not depend
on how many patients are rendered at once or in which order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import InputError
from ..vocabulary import CLINICAL_COLUMNS, SITES
from ..vocabulary import TREATMENT_COLUMNS as TREATMENTS
from .spec import (
    SIGNALS,
    ClinicalSpec,
    LesionSpec,
    OutcomeSpec,
    Spec,
)

# Independent random streams per patient (numpy SeedSequence spawn keys): results do not depend
# on the number of worker processes or on the order patients are rendered in.
STREAM_COUNTS, STREAM_TABLES, STREAM_RENDER = 0, 1, 2


def stream_rng(seed: int, *key: int) -> np.random.Generator:
    """The random stream ``SeedSequence(seed, spawn_key=key)`` (keys: ``STREAM_*``, patient index)."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


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


def patient_ids(n_patients: int) -> list[str]:
    """``SYN001 ... SYN099`` (wider when there are more patients).

    >>> patient_ids(2), patient_ids(1000)[-1]
    (['SYN001', 'SYN002'], 'SYN1000')
    """
    width = max(3, len(str(n_patients)))
    return [f"SYN{i + 1:0{width}d}" for i in range(n_patients)]


def lesion_counts(n_patients: int, seed: int, spec: LesionSpec) -> np.ndarray:
    """Lesions per patient in [min, max], summing to exactly round(mean * n_patients).

    >>> counts = lesion_counts(10, 0, LesionSpec())
    >>> int(counts.sum()), bool(counts.min() >= 1 and counts.max() <= 10)
    (40, True)
    """
    rng = stream_rng(seed, STREAM_COUNTS)
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
    """The five imaging features of the outcome model (logs and fractions, before centring)."""
    volume = float(les["volume_ml"].sum())
    return {
        "uptake": float(np.log(les["suvmax_true"].max())),
        "burden": float(np.log(volume)),
        "count": float(np.log(len(les))),
        "bone": float((les["site"] == "bone").mean()),
        "necrosis": float(np.average(les["necrosis"], weights=les["volume_ml"])),
    }


def _draw_lesions(pid: str, n_lesions: int, latent_necrosis: float, rng: np.random.Generator,
                  ls: LesionSpec) -> list[dict]:
    """One patient's lesions: site, SUVmax, axes (mm), volume (mL) and necrosis."""
    site_names = list(SITES)
    site_p = np.array([ls.sites[s].fraction for s in site_names])
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
    return lesions


def _draw_clinical(z_burden: float, rng: np.random.Generator, cs: ClinicalSpec) -> dict:
    """Age, BMI, ECOG, PSA (correlated with the imaging burden ``z_burden``), Gleason, treatments."""
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
    return clinical


def _log_hazard_parts(features: dict[str, float], clinical: dict, spec: Spec) -> tuple[float, float]:
    """The imaging and clinical parts of the linear predictor (package docstring)."""
    cs, oc = spec.clinical, spec.outcome
    clinical_terms = {
        "psa": (np.log(max(clinical["psa"], 1e-3)) - np.log(cs.psa_median)) / cs.psa_log_sd,
        "ecog": clinical["ecog"], "gleason": float(clinical["gleason"] >= 8),
        "age": (clinical["age"] - 70.0) / 10.0, "docetaxel": clinical["docetaxel"],
        "lu_psma": clinical["lu_psma"],
    }
    imaging_part = sum(oc.imaging_coefficients[k] * (features[k] - oc.imaging_centres[k]) for k in features)
    clinical_part = sum(oc.clinical_coefficients[k] * v for k, v in clinical_terms.items())
    return imaging_part, clinical_part


def _draw_patient(pid: str, n_lesions: int, rng: np.random.Generator, spec: Spec) -> tuple[dict, list[dict]]:
    """One patient's table row (clinical, log-hazard parts, outcome draws) and lesion rows."""
    cs = spec.clinical
    latent_necrosis = rng.normal(0.0, spec.lesions.necrosis_patient_sd)
    lesions = _draw_lesions(pid, n_lesions, latent_necrosis, rng, spec.lesions)
    features = _imaging_features(pd.DataFrame(lesions))
    z_burden = (features["burden"] - spec.outcome.imaging_centres["burden"]) / 1.3
    clinical = _draw_clinical(z_burden, rng, cs)
    imaging_part, clinical_part = _log_hazard_parts(features, clinical, spec)
    missing = {c: bool(rng.random() < cs.missing_fraction) for c in cs.missing_columns}
    draws = {"frailty_z": rng.standard_normal(), "exp": rng.exponential(), "accrual": rng.random(),
             "dropout": rng.exponential()}
    row = {"patient_id": pid, **clinical, "_missing": missing, "imaging_part": imaging_part,
           "clinical_part": clinical_part, "latent_necrosis": latent_necrosis,
           **{f"feature_{k}": v for k, v in features.items()}, **draws}
    return row, lesions


def _outcome(df: pd.DataFrame, signal: str, oc: OutcomeSpec) -> dict[str, pd.Series]:
    """Linear predictor, frailty, log-hazard, event and censoring times of every patient."""
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
    return {"linear_predictor": lp, "frailty": frailty, "log_hazard": log_hazard,
            "event_time_months": event_time, "censor_time_months": censor_time}


def _patients_table(df: pd.DataFrame, outcome: dict[str, pd.Series]) -> pd.DataFrame:
    """patients.csv: the clinical columns with the drawn missing values, PFS and event."""
    event_time, censor_time = outcome["event_time_months"], outcome["censor_time_months"]
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
    return patients


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
    ids = patient_ids(n_patients)
    counts = lesion_counts(n_patients, seed, spec.lesions)
    rows, lesions = [], []
    for i, (pid, n) in enumerate(zip(ids, counts, strict=True)):
        row, les = _draw_patient(pid, int(n), stream_rng(seed, STREAM_TABLES, i), spec)
        rows.append(row)
        lesions.extend(les)
    df = pd.DataFrame(rows)
    outcome = _outcome(df, signal, spec.outcome)
    truth = pd.DataFrame({
        "patient_id": df["patient_id"], "linear_predictor": outcome["linear_predictor"],
        "imaging_part": df["imaging_part"], "clinical_part": df["clinical_part"],
        "frailty": outcome["frailty"], "log_hazard": outcome["log_hazard"],
        "event_time_months": outcome["event_time_months"],
        "censor_time_months": outcome["censor_time_months"],
        "latent_necrosis": df["latent_necrosis"],
        **{c: df[c] for c in df.columns if c.startswith("feature_")},
        "n_lesions": counts, "bmi_true": df["bmi"], "signal": signal,
    })
    return CohortTables(patients=_patients_table(df, outcome), lesions=pd.DataFrame(lesions), truth=truth)
