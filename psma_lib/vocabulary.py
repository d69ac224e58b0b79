"""The study's shared vocabulary: every name that more than one stage must agree on, defined once.

Data: the clinical columns of ``patients.csv`` and the outcome, lesion sites. Models: the input
modalities, the kinds of model and the image backbones, the 2D views and the lesion-to-patient
aggregations, with the pipeline's defaults. Stages import these names; none defines its own copy.

>>> DEFAULT_AGGREGATION in LESION_AGGREGATIONS and DEFAULT_BACKBONE in BACKBONES
True
>>> model_kinds_for("clinical"), model_kinds_for("imaging")
(('mlp', 'coxph'), ('resnet', 'reader'))
"""

from __future__ import annotations

from .errors import InputError

# --------------------------------------------------------------------------- data

TREATMENT_COLUMNS = ("adt", "arpi", "docetaxel", "radiotherapy", "lu_psma")
#: The clinical inputs, in the order of ``patients.csv`` and of the models' clinical features.
CLINICAL_COLUMNS = ("age", "bmi", "ecog", "psa", "gleason", *TREATMENT_COLUMNS)
OUTCOME_COLUMNS = ("pfs_months", "event")

SITES = ("bone", "lymph_node", "prostate", "visceral")
#: How tables and figures label a lesion whose site the manifest leaves empty.
UNKNOWN_SITE = "unknown"


def site_labels(sites):
    """A lesion table's ``site`` column with missing or empty sites labelled :data:`UNKNOWN_SITE`.

    >>> import pandas as pd
    >>> site_labels(pd.Series(["bone", "", None])).tolist()
    ['bone', 'unknown', 'unknown']
    """
    return sites.fillna(UNKNOWN_SITE).replace("", UNKNOWN_SITE)


# --------------------------------------------------------------------------- models

MODALITIES = ("clinical", "imaging", "multimodal")

#: What a cross-validated run trains: ``resnet`` (a ResNet-Cox model on lesion crops, imaging or
#: multimodal), ``mlp`` (the ResNet-Cox pipeline's clinical branch alone), ``coxph`` (the
#: classical Cox proportional-hazards model of lifelines on the clinical columns) or ``reader``
#: (imaging, multimodal: a Cox model whose lesion log-hazards are linear in what a pretrained, fixed
#: lesion reader reads from the pixels -- ``psma-pfs pretrain``'s weights -- plus, multimodal, the
#: clinical columns; docs/METHOD.md, eleventh and twelfth rounds).
MODEL_KINDS = ("resnet", "mlp", "coxph", "reader")
_KINDS_BY_MODALITY = {"clinical": ("mlp", "coxph"), "imaging": ("resnet", "reader"), "multimodal": ("resnet", "reader")}

BACKBONES_2D = ("resnet18", "resnet34", "resnet50")
BACKBONES_3D = ("r3d_18",)
BACKBONES = BACKBONES_2D + BACKBONES_3D
#: The paper's best backbone: the one the single-model chapters show.
DEFAULT_BACKBONE = "resnet18"

VIEWS = ("axial", "orthogonal")
#: What a 2D backbone sees by default in cross-validation: the three orthogonal centre planes
#: (docs/METHOD.md: +0.020 fold-mean C over the axial plane on fresh count-free cohorts, 2.3x the cost).
DEFAULT_VIEW = "orthogonal"

#: What an image model may be given of each crop (its channels, in this order): the PET, the CT
#: and the lesion's own mask (crops directories of format version 3).
INPUT_CHANNELS = ("pet", "ct", "mask")
#: The channels every image model is given (and all that crops of format versions 1 and 2 hold).
PET_CT = INPUT_CHANNELS[:2]
#: docs/METHOD.md, "Fourth round": PET and CT only unless the pre-registered test says otherwise.
DEFAULT_INPUT_CHANNELS = "pet,ct"


def input_channels(text: str) -> tuple[str, ...]:
    """The image channels named in ``text``: ``pet,ct`` or ``pet,ct,mask``
    (:data:`~psma_lib.vocabulary.INPUT_CHANNELS`; PET and CT are always given, in that order).

    >>> input_channels("pet, ct, mask")
    ('pet', 'ct', 'mask')
    """
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if names not in (PET_CT, INPUT_CHANNELS):
        raise InputError(f"channels must be {','.join(PET_CT)} or {','.join(INPUT_CHANNELS)}; "
                         f"got {text!r}")
    return names


#: Auxiliary lesion targets an image model may regress (a regulariser; all measured from the crop
#: stage's lesion table, never the synthetic truth): log SUVmax, log volume (mL), the heterogeneity
#: log(SUVmean / SUVmax) of the lesion's mask, the annotated site being bone (0/1), and the mean CT
#: density (HU) of the lesion's mask.
AUX_TARGETS = ("log_suvmax", "log_volume", "log_suvmean_ratio", "bone", "hu_mean")
DEFAULT_AUX_TARGETS = "log_suvmax,log_volume,log_suvmean_ratio,bone"

#: How an image model turns a lesion into a log-hazard: ``mlp`` (a small MLP on the image embedding,
#: with the clinical features beside it) or ``concepts`` (a concept bottleneck: linear in the
#: auxiliary head's predictions of the lesion's measured quantities; docs/METHOD.md, fifth round).
RISK_HEADS = ("mlp", "concepts")
DEFAULT_RISK_HEAD = "mlp"

#: How a multimodal reader run (``--model reader``) or a Cox baseline with clinical columns penalises
#: the clinical columns' weights: ``fixed`` (the Cox baselines' light ridge penalty, 0.01) or
#: ``inner`` (chosen per outer fold from a grid by
#: the cross-validated partial likelihood of inner folds of the training patients;
#: docs/METHOD.md, thirteenth round).
CLINICAL_PENALTIES = ("fixed", "inner")

#: The 2D ResNet's stem: ``standard`` (torchvision's stride-2 convolution and stride-2 max-pool, so
#: the first residual stage sees a quarter of the input resolution: 6 x 6 for 24 x 24 planes) or
#: ``no-maxpool`` (the max-pool removed: half the resolution, 12 x 12, about the PET's own 4 mm
#: voxels over a 48 mm crop; about 2.4x the compute per plane; docs/METHOD.md, sixth round).
STEMS = ("standard", "no-maxpool")
#: The 2D ResNets' stem in cross-validation (docs/METHOD.md, eighth round: +0.014 fold-mean C on
#: four fresh count-free cohorts). r3d_18's stem has no max-pool; the ``ci`` and ``quick`` book
#: profiles keep ``standard`` for their time budget on 2 CPU cores.
DEFAULT_STEM = "no-maxpool"


def default_stem(backbone: str | None) -> str:
    """The stem a run gets when it names none: :data:`DEFAULT_STEM` for a 2D ResNet, ``standard``
    for r3d_18 and for models without an image backbone (``None``).

    >>> default_stem("resnet18"), default_stem("r3d_18"), default_stem(None)
    ('no-maxpool', 'standard', 'standard')
    """
    return DEFAULT_STEM if backbone in BACKBONES_2D else "standard"

#: Lesion log-hazards -> patient risk (``sum`` = log of the summed hazards, ``geometric`` = log of
#: the count plus the mean log-hazard; see psma_lib.models).
LESION_AGGREGATIONS = ("mean", "max", "sum", "geometric")
#: ... plus ``attention``: a patient-level model pooling lesion embeddings with learned weights.
AGGREGATIONS = (*LESION_AGGREGATIONS, "attention")
DEFAULT_AGGREGATION = "sum"


def model_kinds_for(modality: str) -> tuple[str, ...]:
    """The model kinds a modality can train; the first is its default."""
    return _KINDS_BY_MODALITY[modality]
