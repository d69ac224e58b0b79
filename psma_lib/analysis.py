"""The book's domain analyses beyond cross-validation: clinical hazard ratios, the oracle
C-index of a synthetic cohort, and the layer table of a survival network.

Each function takes data (tables, a truth table, a model configuration), not book settings, and
returns numbers; :mod:`psma_lib.report` formats them.

>>> network_input_shape({"shape": [396, 3, 32, 32, 32]}, "resnet18")
(2, 32, 32)
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .evaluation import OOF_COLUMNS, cox_hazard_ratios, summarize_cv
from .vocabulary import BACKBONES_3D, CLINICAL_COLUMNS, DEFAULT_INPUT_CHANNELS, input_channels

# Clinical Cox design: units chosen so every hazard ratio reads clinically.
CLINICAL_COX_TERMS = {
    "age_per_10y": "Age (per 10 years)",
    "bmi_per_5": "BMI (per 5 kg/m²)",
    "ecog": "ECOG (per point)",
    "log2_psa": "PSA (per doubling)",
    "gleason": "Gleason (per point)",
    "adt": "ADT received",
    "arpi": "ARPI received",
    "docetaxel": "Docetaxel received",
    "radiotherapy": "Radiotherapy received",
    "lu_psma": "¹⁷⁷Lu-PSMA received",
}


def clinical_design(patients: pd.DataFrame) -> pd.DataFrame:
    """Clinical covariates in hazard-ratio units (columns = :data:`CLINICAL_COX_TERMS`), NaN kept.

    PSA is log2 (floored at 0.1 ng/mL) so its HR is per doubling.

    >>> from psma_lib.testing import tiny_patients
    >>> clinical_design(tiny_patients())[["age_per_10y", "log2_psa"]].iloc[0].tolist()
    [6.0, 0.0]
    """
    return pd.DataFrame({
        "age_per_10y": patients["age"] / 10.0,
        "bmi_per_5": patients["bmi"] / 5.0,
        "ecog": patients["ecog"],
        "log2_psa": np.log2(patients["psa"].clip(lower=0.1)),
        "gleason": patients["gleason"],
        "adt": patients["adt"],
        "arpi": patients["arpi"],
        "docetaxel": patients["docetaxel"],
        "radiotherapy": patients["radiotherapy"],
        "lu_psma": patients["lu_psma"],
    }, index=patients.index).astype(float)


def clinical_hazard_ratios(patients: pd.DataFrame) -> pd.DataFrame:
    """Descriptive whole-cohort clinical Cox fit for the forest plot (one row per term).

    Covariates in :data:`CLINICAL_COX_TERMS` units, constant ones left out; columns
    ``label, hr, hr_lo, hr_hi, p, …`` (:func:`psma_lib.evaluation.cox_hazard_ratios`). Missing
    values are imputed with the cohort median: fine for a description, never for prediction (the
    cross-validated baseline imputes inside each training fold). lifelines' fit warnings (e.g.
    near-separation in a small cohort) are kept in ``hr.attrs["warnings"]`` for the page to show.
    """
    design = clinical_design(patients)
    terms = [c for c in design.columns if design[c].nunique() > 1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hr = cox_hazard_ratios(design[terms].assign(pfs_months=patients["pfs_months"],
                                                    event=patients["event"]), terms)
    hr.insert(0, "label", [CLINICAL_COX_TERMS[t] for t in hr.index])
    hr.attrs["warnings"] = list(dict.fromkeys(str(w.message).split(". ")[0] for w in caught))
    return hr


#: The parts of a synthetic cohort's true log-hazard (``truth.csv`` columns) an oracle can rank by.
ORACLE_PARTS = {"linear_predictor": "imaging and clinical parts (the oracle)",
                "imaging_part": "imaging part alone (lesions' true properties)",
                "clinical_part": "clinical part alone"}


def oracle_c_index(truth: pd.DataFrame, patients: pd.DataFrame, folds: pd.DataFrame | None = None,
                   n_boot: int = 1000, seed: int = 0, part: str = "linear_predictor") -> dict:
    """C-index of a synthetic cohort's true linear predictor: the ceiling a model can reach.

    ``truth``: ``psma_lib.synthetic.load_truth``; ``patients``: ``patient_id, pfs_months, event``.
    Returns :func:`psma_lib.evaluation.summarize_cv`'s summary: pooled over patients with its
    bootstrap CI (``pooled, pooled_lo, pooled_hi``) and, when ``folds`` (``patient_id, fold``) is
    given, each fold's C (``fold_c_index``) and their range on the same folds as the models.
    ``part`` (:data:`ORACLE_PARTS`): rank by the imaging or the clinical part of it alone instead,
    the ceiling of a model that sees only that side of the generator.
    """
    if part not in ORACLE_PARTS:
        raise ValueError(f"unknown part {part!r}; choose one of {list(ORACLE_PARTS)}")
    df = patients.merge(truth[["patient_id", part]].astype({"patient_id": str}), on="patient_id")
    if folds is None:
        folds = pd.DataFrame({"patient_id": df["patient_id"], "fold": 0})
    df = df.merge(folds, on="patient_id").rename(columns={part: "risk"})
    return summarize_cv(df[list(OOF_COLUMNS)], n_boot=n_boot, seed=seed)


def network_input_shape(crops_meta: dict, backbone: str, channels: str = DEFAULT_INPUT_CHANNELS
                        ) -> tuple[int, ...]:
    """One lesion's network input from ``crops.json``'s shape ``[n, C, D, H, W]`` and the model's
    input ``channels`` (``C'`` of them): ``(C', D, H, W)`` for a 3D backbone, the axial plane
    ``(C', H, W)`` for a 2D one."""
    _, _, depth, height, width = crops_meta["shape"]
    n = len(input_channels(channels))
    return (n, depth, height, width) if backbone in BACKBONES_3D else (n, height, width)


def architecture_summary(modality: str, backbone: str, image_shape: Sequence[int]) -> pd.DataFrame:
    """Compact layer table of :class:`psma_lib.models.SurvivalModel`: block, output shape, params.

    ``image_shape``: one lesion's network input, e.g. ``(2, 32, 32)`` (2D) or ``(2, 16, 32, 32)``
    (its first entry, 2 or 3, is the number of input channels).
    Lists the backbone's top-level blocks then the risk head; shapes are for a batch of one.

    >>> table = architecture_summary("multimodal", "resnet18", (2, 16, 16)).set_index("Block")
    >>> table.loc["layer4", "Output shape"], table.loc["total", "Parameters"]
    ('1 × 512 × 1 × 1', '11,190,145')
    """
    import torch

    from .models import SurvivalModel

    model = SurvivalModel(modality, backbone, n_clinical=len(CLINICAL_COLUMNS), in_channels=image_shape[0]).eval()
    blocks = list(model.encoder.net.named_children()) if model.encoder is not None else []
    blocks += [(f"head.{name}", m) for name, m in model.head.named_children()]
    shapes: dict[str, tuple] = {}
    hooks = [m.register_forward_hook(
        lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
        for name, m in blocks]
    images = torch.zeros(1, *image_shape) if model.encoder is not None else None
    clinical = torch.zeros(1, len(CLINICAL_COLUMNS)) if modality != "imaging" else None
    with torch.no_grad():
        model(images, clinical)
    for h in hooks:
        h.remove()
    rows = [{"Block": name, "Type": type(m).__name__,
             "Output shape": " × ".join(map(str, shapes.get(name, ()))) or "—",
             "Parameters": sum(p.numel() for p in m.parameters())} for name, m in blocks]
    total = sum(p.numel() for p in model.parameters())
    rows.append({"Block": "total", "Type": "", "Output shape": "1 (log-hazard)", "Parameters": total})
    table = pd.DataFrame(rows)
    table["Parameters"] = table["Parameters"].map("{:,}".format)
    return table
