"""Patient-grouped, event-stratified K-fold cross-validation of the survival models (``psma-pfs cv``).

Leakage rules: folds are made on **patients** (every lesion of a patient is in the same fold; a
patient in two folds raises); the clinical preprocessing is fitted on the training fold only; the
epoch is selected on an inner validation split of the training fold (``val_fraction`` of its
patients, stratified by event); the test fold is only ever predicted. Every C-index is
patient-level; ``c_index_lesion`` (each lesion scored against its patient's outcome) is reported
beside it, labelled, because it flatters: one patient's lesions are counted as many
correlated "patients" and pairs within a patient are never compared.

Resume and independent folds: each fold's seed depends only on ``(seed, fold)``; a fold is done
when its directory ``folds/fold<k>/`` exists (written atomically after its checkpoint), so a
killed run restarts at the first unfinished fold and ends with the same out-of-fold results, and
the folds of one run can be trained by separate processes (:func:`run_fold`, ``psma-pfs cv
--fold K``) and combined afterwards (:func:`collect`, ``psma-pfs cv --collect``) into exactly the
files of one sequential :func:`run_cv`.

``model="coxph"``: the classical baselines, lifelines' CoxPHFitter (Efron ties, ridge penalizer
0.01 to keep the fit stable with ~80 training patients) on the same folds, with ``covariates``:
``clinical`` (the median-imputed, standardised clinical columns without the missing indicators),
``count`` (log lesion count alone), ``biomarkers`` (the conventional PSMA PET biomarkers of
:func:`psma_lib.biomarkers.biomarker_features`: log count, log PSMA-TV, log SUVmax, SUVmean,
bone fraction), ``clinical+biomarkers``, or ``biomarkers+ct`` (the biomarkers and the patient's
mean lesion CT density, :func:`psma_lib.biomarkers.mean_ct_density`: the strongest baseline here that
reads nothing of the images beyond the masks' measurements; a patient without a measured density
gets the training fold's mean); biomarkers are standardised with the training fold's mean and sd.
With ``clinical_penalty="inner"`` (``clinical`` and ``clinical+biomarkers``; the sceptic's
baseline for the multimodal reader, whose clinical penalty is chosen the same way) the clinical
columns' ridge penalty is chosen on inner folds of the training patients
(:func:`select_coxph_clinical_penalizer`; ``coxph.clinical_penalizer``), the other columns keep 0.01.

``model="reader"`` (imaging, multimodal): a pretrained lesion reader kept fixed (``weights``: a
file of ``psma-pfs pretrain``, :func:`psma_lib.pretrain.read_lesions`) reads each lesion's
measured quantities from its pixels; in each fold a Cox model whose lesion log-hazards are linear
in those readings, standardised on the training fold's lesions, is fitted on the training patients
through the run's aggregation (:func:`fit_lesion_cox`); multimodal adds the patient's clinical
columns (as the ``coxph`` baseline sees them: imputed and standardised on the training fold) to
every lesion's log-hazard, fitted jointly, with their ridge penalty chosen on inner folds of the
training patients (``clinical_penalty`` ``inner``, the default; :func:`select_covariate_penalizer`)
or the baselines' fixed one. Nothing is trained by stochastic gradient; the scaling and weights are
the fold's checkpoint (``reader.mean``, ``reader.sd``, ``reader.weight``: the readings' weights,
then the clinical columns'; ``reader.clinical_penalizer``). docs/METHOD.md, eleventh to thirteenth
rounds.

Each run's summary (fold range, mean +- sd and the pooled out-of-fold C-index with its bootstrap
CI) is computed once, by :func:`psma_lib.evaluation.summarize_cv`, and stored in
``results.json``; :func:`load_result` reads a finished run back.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from sklearn.model_selection import StratifiedKFold, train_test_split
from tqdm.auto import tqdm

from . import distributed
from .cox import neg_partial_log_likelihood
from .errors import InputError
from .evaluation import concordance_index, summarize_cv
from .io import atomic_dir, atomic_path, json_text, sha256_file, write_csv, write_json, write_once
from .models import ClinicalPreprocessor, SurvivalModel, aggregate_lesion_risks, load_pretrained
from .repro import provenance, set_seed
from .train import (
    HISTORY_COLUMNS,
    SELECTIONS,
    TRAINING_UNITS,
    SurvivalData,
    TrainConfig,
    fit,
    fit_lesion_linear,
    predict,
    resolve_device,
)
from .vocabulary import (
    AGGREGATIONS,
    AUX_TARGETS,
    BACKBONES,
    BACKBONES_3D,
    CLINICAL_COLUMNS,
    CLINICAL_PENALTIES,
    DEFAULT_AGGREGATION,
    DEFAULT_AUX_TARGETS,
    DEFAULT_BACKBONE,
    DEFAULT_INPUT_CHANNELS,
    DEFAULT_RISK_HEAD,
    DEFAULT_STEM,
    DEFAULT_VIEW,
    MODALITIES,
    MODEL_KINDS,
    PET_CT,
    RISK_HEADS,
    STEMS,
    VIEWS,
    default_stem,
    input_channels,
    model_kinds_for,
)

if TYPE_CHECKING:  # pretrain imports cv
    from .pretrain import PretrainConfig

COXPH_PENALIZER = 0.01
#: The clinical columns' ridge penalties an ``inner`` run (the multimodal reader, a Cox baseline
#: with clinical columns) chooses from (the
#: objective's scale: negative log partial likelihood per patient; 0.01 is :data:`COXPH_PENALIZER`,
#: 10 shrinks ten standardised columns to nearly nothing), and its number of inner folds.
CLINICAL_PENALIZER_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
INNER_FOLDS = 5
COXPH_COVARIATES = ("clinical", "count", "biomarkers", "clinical+biomarkers", "biomarkers+ct")
#: The Cox baselines fitted on the clinical columns (first in their design, :func:`coxph_design`).
COXPH_CLINICAL_COVARIATES = ("clinical", "clinical+biomarkers")
FOLD_RESULT_COLUMNS = ("fold", "n_train_patients", "n_val_patients", "n_test_patients", "n_test_events",
                       "c_index", "c_index_lesion", "best_epoch", "seed", "notes")


COXPH_AS_BACKBONE = ("'coxph' is a kind of model, not an image backbone: use model='coxph' "
                     "with modality='clinical' (psma-pfs cv --modality clinical --model coxph)")


@dataclass
class CVConfig:
    """Everything that defines a cross-validation run (stored in ``config.json``).

    ``model`` is what is trained (:data:`psma_lib.vocabulary.MODEL_KINDS`); None takes the
    modality's default (``resnet`` for imaging and multimodal, ``mlp`` for clinical).
    ``backbone`` is the ResNet's (None: the default backbone) and stays None for the clinical
    models. Training settings default to :class:`psma_lib.train.TrainConfig`'s. ``n_bootstrap``
    resamples give the pooled C-index's CI in ``results.json``.

    >>> CVConfig(modality="clinical").name, CVConfig(modality="imaging").name
    ('clinical-mlp', 'imaging-resnet18')
    >>> CVConfig(modality="multimodal", model="reader", weights="r.safetensors").clinical_penalty
    'inner'
    """

    modality: str = "multimodal"
    model: str | None = None
    backbone: str | None = None
    epochs: int = TrainConfig.epochs
    folds: int = 5
    seed: int = 0
    device: str = "auto"
    batch_size: int = TrainConfig.batch_size
    lr: float = TrainConfig.lr
    weight_decay: float = TrainConfig.weight_decay
    aggregation: str = DEFAULT_AGGREGATION
    unit: str = TrainConfig.unit
    aux_weight: float = TrainConfig.aux_weight
    aux_targets: str = DEFAULT_AUX_TARGETS  # comma-separated names of vocabulary.AUX_TARGETS
    lesion_inputs: str = ""  # measured lesion quantities (vocabulary.AUX_TARGETS) added linearly to the log-hazard
    selection: str = TrainConfig.selection
    covariates: str = "clinical"  # coxph only: clinical | count | biomarkers | clinical+biomarkers | biomarkers+ct
    view: str = DEFAULT_VIEW
    channels: str = DEFAULT_INPUT_CHANNELS  # comma-separated vocabulary.INPUT_CHANNELS, in that order
    head: str = DEFAULT_RISK_HEAD  # vocabulary.RISK_HEADS: mlp on the embedding, or concepts
    stem: str | None = None  # vocabulary.STEMS; None: vocabulary.default_stem of the backbone
    val_fraction: float = 0.2
    patience: int = TrainConfig.patience
    weights: str | None = None
    freeze_encoder: bool = False  # train the heads only, on the encoder loaded from weights
    clinical_penalty: str | None = None  # vocabulary.CLINICAL_PENALTIES; None: inner for the multimodal reader
    num_threads: int | None = None
    augment: bool = TrainConfig.augment
    cuda_graph: bool = TrainConfig.cuda_graph
    compile: bool = TrainConfig.compile
    channels_last: bool | None = TrainConfig.channels_last
    n_bootstrap: int = 1000
    progress: bool = True

    def __post_init__(self) -> None:
        if self.modality in MODALITIES and self.model is None:
            self.model = model_kinds_for(self.modality)[0]
        if self.model == "resnet" and self.backbone is None:
            self.backbone = DEFAULT_BACKBONE
        if self.stem is None:
            self.stem = default_stem(self.backbone if self.model == "resnet" else None)
        if self.clinical_penalty is None:
            self.clinical_penalty = "inner" if (self.model, self.modality) == ("reader", "multimodal") else "fixed"

    @property
    def name(self) -> str:
        """``modality-backbone`` for a ResNet, ``modality-model`` for the clinical models, with the
        covariates of a Cox baseline that is not fitted on the clinical columns."""
        name = f"{self.modality}-{self.backbone if self.model == 'resnet' else self.model}"
        return name if self.covariates == "clinical" else f"{name}-{self.covariates.replace('+', '-')}"

    @property
    def fits_clinical_weights(self) -> bool:
        """Whether the run fits ridge-penalised clinical weights whose penalty ``clinical_penalty`` sets:
        the multimodal reader and the Cox baselines with clinical columns."""
        return ((self.model, self.modality) == ("reader", "multimodal")
                or (self.model == "coxph" and self.covariates in COXPH_CLINICAL_COVARIATES))

    def validate(self) -> None:
        if self.modality not in MODALITIES:
            raise InputError(f"unknown modality {self.modality!r}; choose one of {MODALITIES}")
        if self.backbone == "coxph":
            raise InputError(COXPH_AS_BACKBONE)
        if self.model not in MODEL_KINDS:
            raise InputError(f"unknown model {self.model!r}; choose one of {MODEL_KINDS}")
        if self.model not in model_kinds_for(self.modality):
            raise InputError(f"modality {self.modality} trains model {' or '.join(model_kinds_for(self.modality))}, "
                             f"not {self.model}")
        if self.model == "resnet" and self.backbone not in BACKBONES:
            raise InputError(f"unknown backbone {self.backbone!r}; choose one of {BACKBONES}")
        if self.model != "resnet" and self.backbone is not None:
            raise InputError(f"the {self.model} model has no image backbone; leave backbone unset")
        if self.n_bootstrap < 1:
            raise InputError(f"n_bootstrap must be >= 1, got {self.n_bootstrap}")
        if self.covariates not in COXPH_COVARIATES:
            raise InputError(f"unknown covariates {self.covariates!r}; choose one of {COXPH_COVARIATES}")
        if self.covariates != "clinical" and self.model != "coxph":
            raise InputError(f"covariates {self.covariates!r} are for the coxph baselines only")
        if self.aggregation not in AGGREGATIONS:
            raise InputError(f"unknown aggregation {self.aggregation!r}; choose one of {AGGREGATIONS}")
        if self.unit not in TRAINING_UNITS:
            raise InputError(f"unknown training unit {self.unit!r}; choose one of {TRAINING_UNITS}")
        if self.selection not in SELECTIONS:
            raise InputError(f"unknown selection {self.selection!r}; choose one of {SELECTIONS}")
        aux_target_names(self.aux_targets)
        if self.lesion_inputs:
            aux_target_names(self.lesion_inputs, "lesion_inputs")
            if self.model != "resnet" or self.aggregation == "attention":
                raise InputError("lesion_inputs are added to each lesion's log-hazard: they need a resnet model "
                                 "that scores lesions (not attention pooling)")
        if self.view not in VIEWS:
            raise InputError(f"unknown view {self.view!r}; choose one of {VIEWS}")
        input_channels(self.channels)
        if self.head not in RISK_HEADS:
            raise InputError(f"unknown risk head {self.head!r}; choose one of {RISK_HEADS}")
        if self.stem not in STEMS:
            raise InputError(f"unknown stem {self.stem!r}; choose one of {STEMS}")
        if self.stem != "standard" and (self.model != "resnet" or self.backbone in BACKBONES_3D):
            raise InputError(f"stem {self.stem!r} is for the 2D ResNets, not {self.backbone or self.model}")
        if self.head == "concepts" and (self.model != "resnet" or self.aux_weight <= 0):
            raise InputError("head 'concepts' scores a lesion from its predicted auxiliary targets: it needs a "
                             "resnet model with aux_weight > 0")
        if self.model == "reader" and (not self.weights or self.aggregation == "attention"):
            raise InputError("the reader model scores lesions with the fixed reader in a weights file of psma-pfs "
                             "pretrain: give weights, and a lesion aggregation (not attention)")
        if self.clinical_penalty not in CLINICAL_PENALTIES:
            raise InputError(f"unknown clinical_penalty {self.clinical_penalty!r}; choose one of {CLINICAL_PENALTIES}")
        if self.clinical_penalty != "fixed" and not self.fits_clinical_weights:
            raise InputError(f"clinical_penalty {self.clinical_penalty!r} is for the multimodal reader model (model "
                             "reader, modality multimodal) and the Cox baselines with clinical columns (model coxph, "
                             "covariates clinical or clinical+biomarkers): the other models fit no separate "
                             "penalised clinical weights")
        if self.freeze_encoder and (self.model != "resnet" or not self.weights):
            raise InputError("freeze_encoder keeps a pretrained image encoder fixed: it needs a resnet model and "
                             "weights (e.g. from psma-pfs pretrain)")
        if self.folds < 2 or self.epochs < 1 or self.batch_size < 2 or not 0 < self.val_fraction < 1:
            raise InputError("need folds >= 2, epochs >= 1, batch_size >= 2 and 0 < val_fraction < 1")

    def run_defining(self) -> dict:
        """The fields that change results (resume refuses a different run in the same folder).

        ``channels``, ``head``, ``stem``, ``lesion_inputs``, ``freeze_encoder`` and ``clinical_penalty``
        are left out at PET and CT, ``mlp``, ``standard``, none, False and ``fixed``, what every run made
        before they existed had, so those runs' records and
        cached folders stay the same run. Pretrained ``weights`` add their file's SHA-256
        (``weights_sha256``): the same path with other weights is another run."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "progress"}
        if input_channels(self.channels) == PET_CT:
            del fields["channels"]
        if self.head == "mlp":
            del fields["head"]
        if self.stem == "standard":
            del fields["stem"]
        if not self.lesion_inputs:
            del fields["lesion_inputs"]
        if not self.freeze_encoder:
            del fields["freeze_encoder"]
        if self.clinical_penalty == "fixed":
            del fields["clinical_penalty"]
        if self.weights and Path(self.weights).is_file():  # the weights' content, not their path, defines the run
            fields["weights_sha256"] = sha256_file(self.weights)
        return fields


@dataclass
class CVResult:
    """A finished run: its folder, configuration, out-of-fold predictions and stored results.

    ``summary`` is ``results.json``'s: :func:`psma_lib.evaluation.summarize_cv` of ``oof``
    (``fold_min, fold_max, fold_mean, fold_sd, pooled, pooled_lo, pooled_hi, n_patients, ...``).
    The other tables of the folder are read on access.
    """

    out_dir: Path
    config: CVConfig
    oof: pd.DataFrame                 # patient_id, fold, risk, pfs_months, event
    fold_results: pd.DataFrame        # FOLD_RESULT_COLUMNS, one row per fold
    summary: dict

    @property
    def c_index_pooled(self) -> float:
        return self.summary["pooled"]

    @property
    def folds(self) -> pd.DataFrame:
        """``patient_id, fold``."""
        return _read_table(self.out_dir / "folds.csv")

    @property
    def train_predictions(self) -> pd.DataFrame:
        """``fold, patient_id, risk``: each fold's model scoring its own training patients."""
        return _read_table(self.out_dir / "train_predictions.csv")

    @property
    def history(self) -> pd.DataFrame:
        """``fold, epoch, train_loss, ...``: the learning curves."""
        return _read_table(self.out_dir / "history.csv")

    @property
    def oof_lesions(self) -> pd.DataFrame:
        """``patient_id, lesion_id, fold, log_hazard``: image models' out-of-fold lesion log-hazards;
        with lesion inputs also ``input_term``, the part of ``log_hazard`` that is the linear term
        in the lesion's measured quantities (the rest is the network's)."""
        return _read_table(self.out_dir / "oof_lesion_predictions.csv")


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise InputError("cross-validation output is missing", file=str(path))
    return pd.read_csv(path, dtype={"patient_id": str, "lesion_id": str})


def fold_seed(seed: int, fold: int) -> int:
    """A fold's seed from (seed, fold) only, so a resumed fold trains exactly as before."""
    return int(np.random.SeedSequence([seed, fold]).generate_state(1)[0])


def make_folds(patients: pd.DataFrame, n_folds: int, seed: int) -> pd.DataFrame:
    """``patient_id, fold``: StratifiedKFold on ``event`` over patients (so grouped by patient)."""
    n_events = int(patients["event"].sum())
    if len(patients) < 2 * n_folds or min(n_events, len(patients) - n_events) < n_folds:
        raise InputError(f"{len(patients)} patients with {n_events} events are too few for {n_folds} "
                         "event-stratified folds")
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed % 2**32)
    fold = np.empty(len(patients), dtype=int)
    for k, (_, test) in enumerate(skf.split(np.zeros(len(patients)), patients["event"].to_numpy())):
        fold[test] = k
    folds = pd.DataFrame({"patient_id": patients["patient_id"].to_numpy(), "fold": fold})
    check_folds(folds, lesions=None)
    return folds


def check_folds(folds: pd.DataFrame, lesions: pd.DataFrame | None) -> None:
    """Raise if a patient (or, given ``lesions``, a patient's lesions) is in more than one fold."""
    dup = folds["patient_id"][folds["patient_id"].duplicated()]
    if len(dup):
        raise AssertionError(f"patients in more than one fold: {sorted(set(dup))[:5]}")
    if lesions is not None:
        merged = lesions[["patient_id"]].merge(folds, on="patient_id", how="left")
        if merged["fold"].isna().any() or (merged.groupby("patient_id")["fold"].nunique() > 1).any():
            raise AssertionError("a patient's lesions are split across folds or unassigned")


def read_crops(crops_dir: Path):
    """:func:`psma_lib.crop.load_crops`, with a folder it cannot read reported as one
    :class:`~psma_lib.errors.InputError` naming the folder."""
    from .crop import load_crops

    try:
        return load_crops(crops_dir)
    except InputError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"cannot read crops directory: {exc}", file=str(crops_dir)) from exc


def _check_inputs(crops, modality: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    patients = crops.patients.copy()
    patients["patient_id"] = patients["patient_id"].astype(str)
    lesions = crops.lesions.copy()
    lesions["patient_id"] = lesions["patient_id"].astype(str)
    lesions["lesion_id"] = lesions["lesion_id"].astype(str)
    for col in ("pfs_months", "event"):
        if col not in patients.columns:
            raise InputError(f"patients table has no {col!r} column", file="patients.csv")
    for _, row in patients.iterrows():
        t, e = pd.to_numeric(row["pfs_months"], errors="coerce"), pd.to_numeric(row["event"], errors="coerce")
        if not (np.isfinite(t) and t > 0):
            raise InputError(f"pfs_months must be a positive number, got {row['pfs_months']!r}",
                             patient=row["patient_id"], file="patients.csv")
        if e not in (0, 1):
            raise InputError(f"event must be 0 or 1, got {row['event']!r}", patient=row["patient_id"], file="patients.csv")
    patients["pfs_months"] = patients["pfs_months"].astype(float)
    patients["event"] = patients["event"].astype(int)
    if patients["patient_id"].duplicated().any():
        raise InputError(f"duplicate patient ids: {sorted(set(patients['patient_id'][patients['patient_id'].duplicated()]))[:5]}",
                         file="patients.csv")
    unknown = sorted(set(lesions["patient_id"]) - set(patients["patient_id"]))
    if unknown:
        raise InputError("lesions of a patient missing from patients.csv", patient=unknown[0], file="lesions.csv")
    if modality != "clinical":
        without = sorted(set(patients["patient_id"]) - set(lesions["patient_id"]))
        if without:
            raise InputError("patient has no lesion crops; an imaging model cannot score them",
                             patient=without[0], file="lesions.csv")
    return patients, lesions


def image_inputs(crops, lesions: pd.DataFrame, backbone: str, view: str,
                 channels: str = DEFAULT_INPUT_CHANNELS) -> torch.Tensor:
    """Per-lesion model input as a float32 tensor with ``C = len(channels)`` channels: the volumes
    ``[L, C, D, H, W]`` (3D backbones), the axial plane ``[L, C, H, W]`` or the three orthogonal
    planes ``[L, 3, C, S, S]`` (2D, read from the plane files a version 2 or 3 crops directory
    holds, no volume read). What a checkpoint of a run with this ``backbone``, ``view`` and
    ``channels`` scores.

    Raises:
        InputError: the lesion mask asked of crops that have no mask channel (format version < 3),
            or a crop with non-finite values (naming the patient and lesion).
    """
    where = str(crops.root) if crops.root is not None else "crops"
    n_channels = len(input_channels(channels))
    if n_channels > len(PET_CT) and not crops.has_mask_channel:
        raise InputError("the lesion-mask channel was asked for (channels pet,ct,mask) but these crops have "
                         "none (cropped before format version 3): crop again with psma-pfs crop", file=where)
    if backbone in BACKBONES_3D:
        arr = np.asarray(crops.images[:, :n_channels], dtype=np.float32)
    elif view == "axial":
        arr = np.asarray(crops.planes("axial")[:, :n_channels], dtype=np.float32)
    else:
        planes = [np.asarray(crops.planes(v)[:, :n_channels], dtype=np.float32)
                  for v in ("axial", "coronal", "sagittal")]
        if len({p.shape for p in planes}) != 1:
            raise InputError("orthogonal view needs cubic crops (D = H = W)", file=where)
        arr = np.stack(planes, axis=1)
    finite = np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
    if not finite.all():
        i = int(np.flatnonzero(~finite)[0])
        raise InputError(f"crop of lesion {lesions['lesion_id'].iloc[i]} has non-finite values",
                         patient=lesions["patient_id"].iloc[i], file=where)
    return torch.from_numpy(np.array(arr, dtype=np.float32))  # writable copy of the memmap


def aux_target_names(text: str, what: str = "aux_targets") -> tuple[str, ...]:
    """The auxiliary targets named in ``text`` (comma-separated :data:`~psma_lib.vocabulary.AUX_TARGETS`).

    >>> aux_target_names("log_suvmax, bone")
    ('log_suvmax', 'bone')
    """
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in AUX_TARGETS]
    if unknown or not names or len(set(names)) != len(names):
        raise InputError(f"{what} must name distinct quantities from {', '.join(AUX_TARGETS)}; got {text!r}")
    return names


def lesion_target_values(lesions: pd.DataFrame, names: Sequence[str]) -> np.ndarray:
    """``[L, len(names)]`` auxiliary target values of each lesion as measured; NaN where unknown.

    ``log_suvmax``/``log_volume``: logs of the crop stage's ``suvmax``/``volume_ml`` (unknown if not
    positive); ``log_suvmean_ratio``: log(``suvmean`` / ``suvmax``), <= 0, lower for a lesion whose
    uptake is uneven (a cold core); ``bone``: 1 where the lesion table's ``site`` is bone;
    ``hu_mean``: the mean CT HU of the lesion's mask as measured by the crop stage.
    """
    def measured(column: str) -> np.ndarray:
        return pd.to_numeric(lesions[column], errors="coerce").to_numpy(float) if column in lesions \
            else np.full(len(lesions), np.nan)

    def positive_log(column: str) -> np.ndarray:
        values = measured(column)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(values > 0, np.log(values), np.nan)

    columns = {
        "log_suvmax": lambda: positive_log("suvmax"),
        "log_volume": lambda: positive_log("volume_ml"),
        "log_suvmean_ratio": lambda: positive_log("suvmean") - positive_log("suvmax"),
        "bone": lambda: (lesions["site"].astype(str) == "bone").to_numpy(float) if "site" in lesions
        else np.full(len(lesions), np.nan),
        "hu_mean": lambda: measured("hu_mean"),
    }
    return np.column_stack([columns[n]() for n in names]) if len(names) else np.zeros((len(lesions), 0))


def lesion_scaling(values: np.ndarray, train_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, sd) of each column of ``values`` ``[L, T]`` over the training lesions ``train_rows``
    (fitted inside the fold; NaN ignored; 0 and 1 where a column is unknown or constant there)."""
    train = values[train_rows]
    known = np.isfinite(train).any(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: handled below
        mean, sd = np.nanmean(train, axis=0), np.nanstd(train, axis=0)
    mean = np.where(known, np.nan_to_num(mean), 0.0)
    sd = np.where(known & (np.nan_to_num(sd) > 1e-8), sd, 1.0)
    return mean, sd


def standardise_targets(values: np.ndarray, train_rows: np.ndarray) -> torch.Tensor:
    """Targets standardised by the training lesions' mean and sd (fitted inside the fold)."""
    mean, sd = lesion_scaling(values, train_rows)
    return torch.tensor((values - mean) / sd, dtype=torch.float32)


def standardise_inputs(values: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> torch.Tensor:
    """Measured lesion inputs standardised with a training fold's (mean, sd); an unknown value
    becomes 0, the training lesions' mean (an input, unlike a target, cannot be left out).

    >>> standardise_inputs(np.array([[3.0, np.nan]]), np.array([1.0, 5.0]), np.array([2.0, 1.0])).tolist()
    [[1.0, 0.0]]
    """
    return torch.tensor(np.nan_to_num((values - mean) / sd, nan=0.0), dtype=torch.float32)


def _subset(patients: pd.DataFrame, lesions: pd.DataFrame, images: torch.Tensor | None,
            clinical: torch.Tensor | None, pids: list[str],
            targets: torch.Tensor | None = None, inputs: torch.Tensor | None = None
            ) -> tuple[SurvivalData, pd.DataFrame]:
    """SurvivalData for patients ``pids`` (in that order) and their lesion rows (``targets`` and
    ``inputs``: per lesion of ``lesions``, subset alike)."""
    p = patients.set_index("patient_id").loc[pids]
    row_of = {pid: i for i, pid in enumerate(pids)}
    mask = lesions["patient_id"].isin(row_of).to_numpy()
    sub_lesions = lesions[mask].reset_index(drop=True)
    rows = torch.from_numpy(np.flatnonzero(mask))
    data = SurvivalData(
        time=torch.tensor(p["pfs_months"].to_numpy(), dtype=torch.float32),
        event=torch.tensor(p["event"].to_numpy(), dtype=torch.int64),
        clinical=clinical,
        images=None if images is None else images[rows],
        lesion_patient=torch.tensor(sub_lesions["patient_id"].map(row_of).to_numpy(), dtype=torch.int64),
        lesion_targets=None if targets is None else targets[rows],
        lesion_inputs=None if inputs is None else inputs[rows],
    )
    return data, sub_lesions


def _inner_split(pids: np.ndarray, events: np.ndarray, fraction: float, seed: int) -> tuple[list, list]:
    stratify = events if np.bincount(events, minlength=2).min() >= 2 else None
    train, val = train_test_split(pids, test_size=fraction, stratify=stratify, random_state=seed % 2**32)
    return sorted(train), sorted(val)


def clinical_cox_features(pre: ClinicalPreprocessor, frame: pd.DataFrame) -> np.ndarray:
    """Imputed, standardised clinical columns without the missing indicators (a few-percent
    missingness makes them near-constant, which breaks Newton-Raphson convergence)."""
    return pre.transform(frame)[:, :len(pre.columns)].double().numpy()


def coxph_design(covariates: str, patients: pd.DataFrame, lesions: pd.DataFrame,
                 train_ids: list[str]) -> Callable[[list[str]], np.ndarray]:
    """``ids -> [n, k]`` design matrix of a Cox baseline, every scaling fitted on ``train_ids``."""
    from .biomarkers import biomarker_features, mean_ct_density, patient_biomarkers

    by_id = patients.set_index("patient_id")
    parts = []
    if covariates in COXPH_CLINICAL_COVARIATES:
        pre = ClinicalPreprocessor(CLINICAL_COLUMNS).fit(by_id.loc[train_ids].reset_index())
        parts.append(lambda ids: clinical_cox_features(pre, by_id.loc[ids].reset_index()))
    if covariates != "clinical":
        table = biomarker_features(patient_biomarkers(lesions, patients["patient_id"])).set_index("patient_id")
        if covariates == "count":
            table = table[["log_lesion_count"]]
        if covariates == "biomarkers+ct":
            table = table.assign(ct_density=mean_ct_density(lesions, table.index))
            table["ct_density"] = table["ct_density"].fillna(table.loc[train_ids, "ct_density"].mean())
        mean, sd = table.loc[train_ids].mean(), table.loc[train_ids].std(ddof=0).replace(0.0, 1.0)
        parts.append(lambda ids: ((table.loc[ids] - mean) / sd).to_numpy(float))
    return lambda ids: np.column_stack([part(ids) for part in parts])


def fit_coxph(x: np.ndarray, train: pd.DataFrame, penalizer: float | np.ndarray = COXPH_PENALIZER) -> np.ndarray:
    """Cox coefficients (lifelines, ridge ``penalizer``: one value, or ``[k]`` one per column) for
    design ``x`` ``[n, k]`` of the training patients ``train`` (``pfs_months``, ``event``); 0 for a
    column constant there."""
    from lifelines import CoxPHFitter

    keep = x.std(axis=0) > 1e-8  # e.g. a treatment nobody in this fold received
    names = [f"x{j}" for j in np.flatnonzero(keep)]
    frame = pd.DataFrame(x[:, keep], columns=names)
    frame["T"], frame["E"] = train["pfs_months"].to_numpy(), train["event"].to_numpy()
    penalizer = penalizer if np.ndim(penalizer) == 0 else np.asarray(penalizer, dtype=float)[keep]
    cph = CoxPHFitter(penalizer=penalizer).fit(frame, "T", "E")
    coef = np.zeros(x.shape[1])
    coef[keep] = cph.params_[names].to_numpy()
    return coef


def fit_lesion_cox(values: np.ndarray, lesions: pd.DataFrame, patients: pd.DataFrame, train_ids: Sequence[str],
                   aggregation: str = DEFAULT_AGGREGATION, covariates: np.ndarray | None = None,
                   covariate_penalizer: float | None = None) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """(mean, sd, weights) of a Cox model whose lesion log-hazards are linear in ``values``
    ``[L, K]`` (rows of ``lesions``), fitted on the patients ``train_ids`` alone: the values are
    standardised on their lesions (:func:`lesion_scaling`, unknown -> 0) and the weights fitted
    through ``aggregation`` (:func:`psma_lib.train.fit_lesion_linear`, :data:`COXPH_PENALIZER`).
    A lesion's log-hazard is then ``standardise_inputs(values, mean, sd) @ weights``.
    ``covariates`` ``[len(train_ids), J]``: the training patients' own standardised covariates
    (rows in ``train_ids``' order) beside them; their ``J`` weights follow the ``K`` in ``weights``
    and have the ridge penalty ``covariate_penalizer`` (None: :data:`COXPH_PENALIZER`).

    >>> lesions = pd.DataFrame({"patient_id": list("aabbcc")})
    >>> patients = pd.DataFrame({"patient_id": list("abc"), "pfs_months": [1.0, 2.0, 3.0], "event": [1, 1, 0]})
    >>> mean, sd, w = fit_lesion_cox(np.array([[3.0], [2], [1], [1], [0], [0.5]]), lesions, patients, ["a", "b", "c"])
    >>> mean.round(3).tolist(), bool(w[0] > 0)  # more of the quantity, earlier progression
    ([1.25], True)
    """
    train_ids = list(train_ids)
    by_id = patients.set_index("patient_id")
    train = lesions["patient_id"].isin(train_ids).to_numpy()
    mean, sd = lesion_scaling(values, train)
    row = {pid: i for i, pid in enumerate(train_ids)}
    weight = fit_lesion_linear(standardise_inputs(values[train], mean, sd),
                               torch.tensor(lesions.loc[train, "patient_id"].map(row).to_numpy()),
                               torch.tensor(by_id.loc[train_ids, "pfs_months"].to_numpy(float)),
                               torch.tensor(by_id.loc[train_ids, "event"].to_numpy(int)), aggregation, COXPH_PENALIZER,
                               None if covariates is None else torch.as_tensor(covariates, dtype=torch.float64),
                               covariate_penalizer)
    return mean, sd, weight


def lesion_cox_log_hazards(values: np.ndarray, lesions: pd.DataFrame, fit: tuple,
                           covariates: pd.DataFrame | None = None) -> np.ndarray:
    """``[L]`` log-hazards of the rows of ``lesions`` under a :func:`fit_lesion_cox` result ``fit`` =
    (mean, sd, weights): each lesion's linear term in its ``values`` plus, with ``covariates`` (rows
    indexed by patient id), its patient's covariate term -- so any aggregation adds it once.

    >>> lesions = pd.DataFrame({"patient_id": list("aab")})
    >>> fit = (np.zeros(1), np.ones(1), torch.tensor([1.0, 2.0], dtype=torch.float64))
    >>> lesion_cox_log_hazards(np.array([[0.0], [0.0], [1.0]]), lesions, fit,
    ...                        pd.DataFrame({"x": [1.0, 0.0]}, index=["a", "b"])).tolist()
    [2.0, 2.0, 1.0]
    """
    mean, sd, weight = fit
    n_read = values.shape[1]
    log_hazard = (standardise_inputs(values, mean, sd).double() @ weight[:n_read]).numpy()
    if covariates is not None:
        log_hazard = log_hazard + lesions["patient_id"].map(covariates @ weight[n_read:].numpy()).to_numpy()
    return log_hazard


def lesion_cox_patient_risks(values: np.ndarray, lesions: pd.DataFrame, fit: tuple, ids: Sequence[str],
                             aggregation: str = DEFAULT_AGGREGATION, covariates: pd.DataFrame | None = None
                             ) -> pd.Series:
    """Log-risks of the patients ``ids``: their lesions' :func:`lesion_cox_log_hazards` combined with
    ``aggregation``.

    >>> lesions = pd.DataFrame({"patient_id": list("aab")})
    >>> fit = (np.zeros(1), np.ones(1), torch.tensor([1.0, 2.0], dtype=torch.float64))
    >>> lesion_cox_patient_risks(np.array([[0.0], [0.0], [1.0]]), lesions, fit, ["a", "b"], "sum",
    ...                          pd.DataFrame({"x": [1.0, 0.0]}, index=["a", "b"])).round(3).tolist()
    [2.693, 1.0]
    """
    ids = list(ids)
    rows = lesions["patient_id"].isin(ids).to_numpy()
    mine = lesions.loc[rows, ["patient_id"]]
    scores = mine.assign(log_hazard=lesion_cox_log_hazards(values[rows], mine, fit, covariates))
    return aggregate_lesion_risks(scores, aggregation).loc[ids]


def select_covariate_penalizer(values: np.ndarray, lesions: pd.DataFrame, patients: pd.DataFrame,
                               train_ids: Sequence[str], covariates: np.ndarray,
                               aggregation: str = DEFAULT_AGGREGATION, seed: int = 0,
                               grid: Sequence[float] = CLINICAL_PENALIZER_GRID, n_folds: int = INNER_FOLDS
                               ) -> pd.Series:
    """The cross-validated partial log-likelihood of a :func:`fit_lesion_cox` with ``covariates``
    for each ridge penalty of theirs in ``grid`` (index), from ``n_folds`` event-stratified inner
    folds of the patients ``train_ids`` alone: Verweij & van Houwelingen's (1993) sum over the
    inner folds of log PL(all ``train_ids``) - log PL(the fold's training patients), both at the
    weights fitted without that fold. The best penalty is ``.idxmax()``. Training patients with
    fewer than ``n_folds`` events or censored patients (a small real cohort) get as many inner
    folds as they allow, at least two.

    Args:
        values: ``[L, K]`` the lesions' inputs (rows of ``lesions``), as for :func:`fit_lesion_cox`.
        covariates: ``[len(train_ids), J]`` the training patients' standardised covariates.
        seed: the inner folds' seed (e.g. the outer fold's).
    """
    train_ids = list(train_ids)
    by_id = patients.set_index("patient_id")
    cov = pd.DataFrame(np.asarray(covariates, dtype=float), index=train_ids)
    train = by_id.loc[train_ids].reset_index()
    n_events = int(train["event"].sum())
    n_folds = max(2, min(n_folds, n_events, len(train) - n_events, len(train) // 2))
    try:
        inner = make_folds(train, n_folds, seed)
    except InputError as err:
        raise InputError(f"choosing the clinical penalty on inner folds of the training patients: {err}") from err

    def log_pl(fit: tuple, ids: list[str]) -> float:
        risk = torch.as_tensor(lesion_cox_patient_risks(values, lesions, fit, ids, aggregation, cov).to_numpy())
        return -float(neg_partial_log_likelihood(risk, torch.as_tensor(by_id.loc[ids, "pfs_months"].to_numpy(float)),
                                                 torch.as_tensor(by_id.loc[ids, "event"].to_numpy(int)),
                                                 reduction="sum"))

    cvpl = {}
    for penalizer in grid:
        total = 0.0
        for k in range(n_folds):
            fit_ids = sorted(inner.loc[inner["fold"] != k, "patient_id"])
            fit = fit_lesion_cox(values, lesions, patients, fit_ids, aggregation, cov.loc[fit_ids].to_numpy(), penalizer)
            total += log_pl(fit, train_ids) - log_pl(fit, fit_ids)
        cvpl[float(penalizer)] = total
    return pd.Series(cvpl, name="cv_partial_log_likelihood").rename_axis("penalizer")


def select_coxph_clinical_penalizer(x: np.ndarray, train: pd.DataFrame, n_clinical: int, seed: int = 0) -> pd.Series:
    """:func:`select_covariate_penalizer` for a Cox baseline: the cross-validated partial
    log-likelihood of each clinical penalty in :data:`CLINICAL_PENALIZER_GRID` (index), from inner
    folds of the training patients alone.

    Each patient is a bag of one "lesion" that holds the design's other columns (a sum over one
    lesion is that lesion), so the objective is lifelines' with the grid value on the clinical
    columns and :data:`COXPH_PENALIZER` on the rest (tests/test_cv.py compares it with lifelines).

    Args:
        x: ``[n, J + K]`` the training patients' design (:func:`coxph_design`), the ``J = n_clinical``
            clinical columns first.
        train: the ``n`` training patients (``patient_id``, ``pfs_months``, ``event``), rows in ``x``'s order.
        seed: the inner folds' seed (e.g. the outer fold's).
    """
    ids = train["patient_id"].astype(str).tolist()
    patients = train.assign(patient_id=ids)
    bags = pd.DataFrame({"patient_id": ids})
    return select_covariate_penalizer(x[:, n_clinical:], bags, patients, ids, x[:, :n_clinical], "sum", seed)


def _chosen_penalizer(cvpl: pd.Series, key: str, tensors: dict, notes: list) -> float:
    """The inner-CV choice of a :func:`select_covariate_penalizer` result, stored in the fold's
    checkpoint under ``key`` and in its notes."""
    chosen = float(cvpl.idxmax())
    tensors[key] = torch.tensor(chosen, dtype=torch.float64)
    notes.append(f"clinical penalizer {chosen:g} (inner CV)")
    return chosen


def make_model(config: CVConfig, n_clinical: int) -> SurvivalModel:
    """The untrained model a run of ``config`` trains (and its checkpoints hold)."""
    image_model = config.model == "resnet"
    return SurvivalModel(config.modality, config.backbone if image_model else "resnet18",
                         n_clinical=n_clinical, view=config.view,
                         in_channels=len(input_channels(config.channels)), head=config.head,
                         stem=config.stem,
                         attention=config.aggregation == "attention" and image_model,
                         n_aux=len(aux_target_names(config.aux_targets)) if config.aux_weight > 0 and image_model else 0,
                         n_lesion_inputs=len(aux_target_names(config.lesion_inputs)) if config.lesion_inputs else 0)


def _run_fold(k: int, config: CVConfig, patients, lesions, folds, images, device, out_dir: Path,
              progress_desc: str) -> None:
    seed = fold_seed(config.seed, k)
    set_seed(seed)
    test_ids = sorted(folds.loc[folds["fold"] == k, "patient_id"])
    train_ids = sorted(folds.loc[folds["fold"] != k, "patient_id"])
    if set(test_ids) & set(train_ids):
        raise AssertionError(f"fold {k}: patients in both training and test fold")
    by_id = patients.set_index("patient_id")
    pre = ClinicalPreprocessor(CLINICAL_COLUMNS).fit(by_id.loc[train_ids].reset_index())
    clin = lambda ids: pre.transform(by_id.loc[ids].reset_index())  # noqa: E731
    tensors: dict[str, torch.Tensor] = dict(pre.state_dict())
    history = pd.DataFrame(columns=list(HISTORY_COLUMNS))
    best_epoch, notes, n_val = -1, [], 0
    input_term = None  # each test lesion's linear term in its measured inputs, where the model has one
    if config.model == "coxph":
        design = coxph_design(config.covariates, patients, lesions, train_ids)
        x_train, train = design(train_ids), by_id.loc[train_ids].reset_index()
        penalizer = COXPH_PENALIZER
        if config.clinical_penalty == "inner":  # the clinical columns' penalty, chosen on inner folds
            n_clin = len(CLINICAL_COLUMNS)
            chosen = _chosen_penalizer(select_coxph_clinical_penalizer(x_train, train, n_clin, seed),
                                       "coxph.clinical_penalizer", tensors, notes)
            penalizer = np.r_[np.full(n_clin, chosen), np.full(x_train.shape[1] - n_clin, COXPH_PENALIZER)]
        coef = fit_coxph(x_train, train, penalizer)
        tensors["coxph.coef"] = torch.tensor(coef)
        score = lambda ids: design(ids) @ coef  # noqa: E731
        test_risk, train_risk = score(test_ids), score(train_ids)
        test_les = lesions[lesions["patient_id"].isin(test_ids)].reset_index(drop=True)
        test_lh = test_les["patient_id"].map(dict(zip(test_ids, test_risk, strict=True))).to_numpy()
    elif config.model == "reader":  # `images` holds each lesion's readings by the fixed, pretrained reader
        readings = images.numpy()
        covariates = None  # multimodal: the clinical columns as a Cox baseline sees them, beside the readings
        if config.modality == "multimodal":
            covariates = clinical_cox_features(pre, by_id.reset_index()).astype(float)
            covariates = pd.DataFrame(covariates, index=by_id.index)
        train_covariates = None if covariates is None else covariates.loc[train_ids].to_numpy()
        penalizer = None
        if config.clinical_penalty == "inner":  # chosen on inner folds of the training patients alone
            penalizer = _chosen_penalizer(select_covariate_penalizer(readings, lesions, patients, train_ids,
                                                                     train_covariates, config.aggregation, seed),
                                          "reader.clinical_penalizer", tensors, notes)
        mean, sd, weight = fit_lesion_cox(readings, lesions, patients, train_ids, config.aggregation,
                                          train_covariates, penalizer)
        tensors.update({"reader.mean": torch.tensor(mean), "reader.sd": torch.tensor(sd), "reader.weight": weight})
        scores = lesions.assign(log_hazard=lesion_cox_log_hazards(readings, lesions, (mean, sd, weight), covariates))
        risk = aggregate_lesion_risks(scores, config.aggregation)
        test_risk, train_risk = risk.loc[test_ids].to_numpy(), risk.loc[train_ids].to_numpy()
        test_les = scores[scores["patient_id"].isin(test_ids)].reset_index(drop=True)
        test_lh = test_les["log_hazard"].to_numpy()
    else:
        if config.selection == "last":  # fixed schedule: every training patient
            inner_train, inner_val = train_ids, []
        else:
            inner_train, inner_val = _inner_split(np.array(train_ids), by_id.loc[train_ids, "event"].to_numpy(),
                                                  config.val_fraction, seed)
        n_val = len(inner_val)
        use_clin = config.modality != "imaging"
        use_aux = config.aux_weight > 0 and config.modality != "clinical"
        targets = inputs = None
        inner_rows = lesions["patient_id"].isin(inner_train).to_numpy()
        if use_aux:
            values = lesion_target_values(lesions, aux_target_names(config.aux_targets))
            targets = standardise_targets(values, inner_rows)
        if config.lesion_inputs:
            values = lesion_target_values(lesions, aux_target_names(config.lesion_inputs))
            mean, sd = lesion_scaling(values, inner_rows)
            inputs = standardise_inputs(values, mean, sd)
            tensors.update({"lesion_inputs.mean": torch.tensor(mean), "lesion_inputs.sd": torch.tensor(sd)})
        data = {}
        for name, ids in (("train", inner_train), ("val", inner_val), ("test", test_ids), ("fold_train", train_ids)):
            if ids:
                data[name] = _subset(patients, lesions, images, clin(ids) if use_clin else None, ids,
                                     targets if name == "train" else None, inputs)
        model = make_model(config, pre.n_features)
        if config.weights and model.encoder is not None:
            load_pretrained(model, config.weights)
        aggregation = "mean" if config.aggregation == "attention" else config.aggregation
        if model.lesion_linear is not None:  # the table's reading, fitted on the training patients and kept
            train_set = data["train"][0]
            weight = fit_lesion_linear(train_set.lesion_inputs, train_set.lesion_patient, train_set.time,
                                       train_set.event, aggregation, COXPH_PENALIZER)
            with torch.no_grad():
                model.lesion_linear.weight.copy_(weight.unsqueeze(0))
            model.lesion_linear.weight.requires_grad_(False)
        model.to(device)
        train_cfg = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                                weight_decay=config.weight_decay, aggregation=aggregation,
                                unit=config.unit, aux_weight=config.aux_weight if use_aux else 0.0,
                                selection=config.selection,
                                patience=config.patience, augment=config.augment,
                                freeze_encoder=config.freeze_encoder,
                                cuda_graph=config.cuda_graph, compile=config.compile,
                                channels_last=config.channels_last, progress=config.progress)
        val_data = data["val"][0] if "val" in data else None
        result = fit(model, data["train"][0], val_data, train_cfg, seed, desc=f"{progress_desc} fold {k}")
        history, best_epoch, notes = result.history, result.best_epoch, result.notes
        tensors.update({f"model.{n}": t.contiguous() for n, t in result.state_dict.items()})
        scoring = dict(bf16=train_cfg.bf16)
        test_risk, test_lh = predict(model, data["test"][0].to(device), aggregation, **scoring)
        train_risk, _ = predict(model, data["fold_train"][0].to(device), aggregation, **scoring)
        test_les = data["test"][1]
        if model.lesion_linear is not None:
            weight = model.lesion_linear.weight.detach().double().cpu()[0]
            input_term = (data["test"][0].lesion_inputs.double() @ weight).numpy()
        if test_lh is None:  # clinical model: each lesion carries its patient's log-hazard
            test_lh = test_les["patient_id"].map(dict(zip(test_ids, test_risk, strict=True))).to_numpy()
    test_p = by_id.loc[test_ids]
    oof = pd.DataFrame({"patient_id": test_ids, "fold": k, "risk": test_risk,
                        "pfs_months": test_p["pfs_months"].to_numpy(), "event": test_p["event"].to_numpy()})
    oof_les = pd.DataFrame({"patient_id": test_les["patient_id"], "lesion_id": test_les["lesion_id"],
                            "fold": k, "log_hazard": test_lh})
    if input_term is not None:
        oof_les["input_term"] = input_term
    les_outcome = test_les["patient_id"].map(by_id["pfs_months"]), test_les["patient_id"].map(by_id["event"])
    fold_result = {
        "fold": k, "seed": seed, "n_train_patients": len(train_ids), "n_val_patients": n_val,
        "n_test_patients": len(test_ids), "n_test_events": int(oof["event"].sum()),
        "c_index": concordance_index(oof["pfs_months"], oof["risk"], oof["event"]),
        "c_index_lesion": concordance_index(les_outcome[0], test_lh, les_outcome[1]) if len(test_les) else float("nan"),
        "best_epoch": best_epoch, "notes": "; ".join(notes),
    }
    if not distributed.is_main():  # under DDP rank 0 alone writes
        return
    ckpt = out_dir / "checkpoints" / f"fold{k}.safetensors"
    metadata = {"fold": str(k), "clinical_columns": json.dumps(list(pre.columns)),
                "config": json.dumps(config.run_defining(), sort_keys=True)}
    with atomic_path(ckpt) as tmp:
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp), metadata=metadata)
    with atomic_dir(out_dir / "folds" / f"fold{k}") as tmp:
        write_csv(tmp / "oof.csv", oof)
        write_csv(tmp / "oof_lesion.csv", oof_les)
        write_csv(tmp / "train_predictions.csv",
                  pd.DataFrame({"fold": k, "patient_id": train_ids, "risk": train_risk}))
        write_csv(tmp / "history.csv", history.assign(fold=k)[["fold", *history.columns]])
        write_json(tmp / "result.json", fold_result)


def fold_done(out_dir: str | Path, k: int) -> bool:
    """Whether fold ``k`` of the run in ``out_dir`` is finished (its folder and checkpoint exist)."""
    out_dir = Path(out_dir)
    return (out_dir / "folds" / f"fold{k}" / "result.json").is_file() and \
        (out_dir / "checkpoints" / f"fold{k}.safetensors").is_file()


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], ClinicalPreprocessor, dict]:
    """(model state dict, fitted clinical preprocessor, run config) from ``checkpoints/fold<k>.safetensors``."""
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    pre = ClinicalPreprocessor.from_state_dict(tensors, json.loads(meta["clinical_columns"]))
    state = {n.removeprefix("model."): t for n, t in tensors.items() if n.startswith("model.")}
    return state, pre, json.loads(meta["config"])


def cpu_threads() -> int:
    """Torch threads of a run whose ``num_threads`` is None: ``$OMP_NUM_THREADS`` if set, else the
    cores this process may run on (a SLURM task's or a grid slot's share, not the whole node's).

    >>> cpu_threads() >= 1
    True
    """
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class _RunInputs:
    """What every fold of a run reads, prepared once per process."""

    patients: pd.DataFrame
    lesions: pd.DataFrame
    folds: pd.DataFrame
    images: torch.Tensor | None
    device: torch.device


def _prepare(crops_dir: Path, out_dir: Path, config: CVConfig) -> _RunInputs:
    """Check the inputs, then claim ``out_dir`` for ``config``: ``config.json`` and ``folds.csv``
    are created once (:func:`psma_lib.io.write_once`), so fold processes starting together on one
    folder agree on them, and a run with another configuration or data is refused."""
    config.validate()
    crops = read_crops(crops_dir)
    patients, lesions = _check_inputs(crops, config.modality)
    checksum = str(crops.meta.get("data_checksum", ""))
    device = resolve_device(config.device)
    folds = make_folds(patients, config.folds, config.seed)
    check_folds(folds, lesions)
    images = None
    if config.model == "reader":  # its input is what the reader reads: a fixed function of each lesion's pixels
        from .pretrain import read_lesions  # pretrain imports cv

        images = torch.tensor(read_lesions(config.weights, crops, lesions).to_numpy())
    elif config.modality != "clinical":
        images = image_inputs(crops, lesions, config.backbone, config.view, config.channels)
        if config.weights:  # a bad weights file fails here, before anything is written
            load_pretrained(make_model(config, n_clinical=len(CLINICAL_COLUMNS)), config.weights)
    header = {"config": config.run_defining(), "data_checksum": checksum}
    record = {**header, "crops_dir": str(crops_dir), "crops_meta": dict(crops.meta),
              "device_resolved": str(device), "world_size": distributed.world_size(),
              "provenance": provenance(**dataclasses.asdict(config))}
    problem = None
    if distributed.is_main():  # under torchrun rank 0 claims the folder; every rank hears the verdict
        try:
            if not write_once(out_dir / "config.json", json_text(record)):
                _check_header(out_dir, header)
            if not write_once(out_dir / "folds.csv", folds.to_csv(index=False)) and \
                    (out_dir / "folds.csv").read_text() != folds.to_csv(index=False):
                raise InputError("folds.csv differs from this run's folds; use a new --out folder",
                                 file=str(out_dir / "folds.csv"))
        except InputError as exc:
            problem = exc
    if distributed.broadcast_values([problem is not None])[0]:
        raise problem or InputError("output folder holds a run with a different configuration or data; "
                                    "use a new --out folder", file=str(out_dir / "config.json"))
    return _RunInputs(patients, lesions, folds, images, device)


def _read_header(out_dir: Path) -> dict:
    path = out_dir / "config.json"
    if not path.is_file():
        raise InputError("not a cross-validation folder (no config.json)", file=str(path))
    return json.loads(path.read_text())


def _check_header(out_dir: Path, header: dict) -> None:
    previous = _read_header(out_dir)
    if {k: previous.get(k) for k in header} != json.loads(json.dumps(header)):
        raise InputError("output folder holds a run with a different configuration or data; "
                         "use a new --out folder", file=str(out_dir / "config.json"))


@contextlib.contextmanager
def torch_settings(config: CVConfig | PretrainConfig, device: torch.device):
    """The run's thread count (under torchrun: the node's share per rank) and, on CPU,
    deterministic kernels; restored afterwards."""
    previous_threads = torch.get_num_threads()
    previous_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(config.num_threads or max(1, cpu_threads() // distributed.local_world_size()))
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_det)


def _folds_left(out_dir: Path, folds: Sequence[int]) -> list[int]:
    """The folds not yet finished, as rank 0 sees them (every rank gets the same list)."""
    done = distributed.broadcast_values([fold_done(out_dir, k) for k in folds])
    return [k for k, finished in zip(folds, done, strict=True) if not finished]


def run_fold(crops_dir: str | Path, out_dir: str | Path, config: CVConfig, k: int) -> Path:
    """Train and score fold ``k`` of ``config`` only, into the run folder ``out_dir``; its folder.

    One independent unit of a run: the folds of one run may be trained by separate processes
    or machines at the same time, in any order, into the same folder (each fold's outputs are
    written atomically; a finished fold is skipped). Its seed depends only on ``(seed, k)``, so
    :func:`collect` afterwards gives exactly :func:`run_cv`'s files.

    >>> import tempfile; from psma_lib.testing import write_tiny_crops
    >>> tmp = Path(tempfile.mkdtemp())
    >>> crops = write_tiny_crops(tmp / "crops", n_patients=12, size=8)
    >>> config = CVConfig(modality="clinical", model="coxph", folds=2, n_bootstrap=50, progress=False)
    >>> run_fold(crops, tmp / "cv", config, 1).name, fold_done(tmp / "cv", 0)
    ('fold1', False)
    """
    crops_dir, out_dir = Path(crops_dir), Path(out_dir)
    if not 0 <= k < config.folds:
        raise InputError(f"fold {k} does not exist: the run has folds 0-{config.folds - 1}")
    inputs = _prepare(crops_dir, out_dir, config)
    if _folds_left(out_dir, [k]):
        with torch_settings(config, inputs.device):
            _run_fold(k, config, inputs.patients, inputs.lesions, inputs.folds, inputs.images,
                      inputs.device, out_dir, config.name)
        distributed.barrier()
    return out_dir / "folds" / f"fold{k}"


def run_cv(crops_dir: str | Path, out_dir: str | Path, config: CVConfig,
           on_fold_done: Callable[[int], None] | None = None) -> CVResult | None:
    """Cross-validate ``config`` on a crops directory; write the contract's CV directory to ``out_dir``.

    Every fold (:func:`run_fold`'s work, in one process), then :func:`collect`. Re-running into
    the same ``out_dir`` with the same config and data resumes after the last finished fold.
    ``on_fold_done(k)`` is called after fold ``k`` is written (tests use it to simulate a kill).
    Under ``torchrun`` (:mod:`psma_lib.distributed`) every rank calls this and trains each fold's
    model together; rank 0 writes every output and returns the result, the other ranks None.

    >>> import tempfile; from psma_lib.testing import write_tiny_crops
    >>> tmp = Path(tempfile.mkdtemp())
    >>> crops = write_tiny_crops(tmp / "crops", n_patients=12, size=8)
    >>> config = CVConfig(modality="clinical", model="coxph", folds=2, progress=False)
    >>> res = run_cv(crops, tmp / "cv", config)
    >>> sorted(res.oof.columns), 0 <= res.c_index_pooled <= 1
    (['event', 'fold', 'patient_id', 'pfs_months', 'risk'], True)
    """
    crops_dir, out_dir = Path(crops_dir), Path(out_dir)
    inputs = _prepare(crops_dir, out_dir, config)
    with torch_settings(config, inputs.device):
        desc = config.name
        todo = _folds_left(out_dir, range(config.folds))
        for k in tqdm(todo, desc=f"{desc} folds", disable=not (config.progress and distributed.is_main())):
            _run_fold(k, config, inputs.patients, inputs.lesions, inputs.folds, inputs.images,
                      inputs.device, out_dir, desc)
            distributed.barrier()
            if on_fold_done is not None:
                on_fold_done(k)
    return collect(out_dir, config) if distributed.is_main() else None


def config_from_record(record: dict) -> CVConfig:
    """The :class:`CVConfig` stored in a run's ``config.json`` or ``results.json`` (or a plain
    dict of its fields). ``progress`` is not run-defining: ``config.json`` keeps it in its
    provenance only.

    >>> c = config_from_record({"config": {"modality": "clinical"}, "provenance": {"parameters": {"progress": False}}})
    >>> c.name, c.progress
    ('clinical-mlp', False)
    """
    fields = record.get("config", record)
    progress = record.get("provenance", {}).get("parameters", {}).get("progress", True)
    return CVConfig(**{"progress": progress, **_stored_fields(fields)})


def _stored_fields(fields: dict) -> dict:
    """A stored configuration's fields, with the stem and clinical penalty it was run with where it
    names none: a record leaves ``stem`` out at ``standard`` and ``clinical_penalty`` at ``fixed``
    (:meth:`CVConfig.run_defining`), as every run made before they could be chosen did, so a missing
    one is that, not today's default.

    >>> fields = _stored_fields({"modality": "multimodal", "model": "reader"})
    >>> fields["stem"], fields["clinical_penalty"]
    ('standard', 'fixed')
    """
    return {"stem": "standard", "clinical_penalty": "fixed",
            **{k: v for k, v in fields.items() if k != "weights_sha256"}}


def collect(out_dir: str | Path, config: CVConfig | None = None) -> CVResult:
    """Combine the finished folds of ``out_dir`` into the run's tables and ``results.json``.

    ``config`` None: the folder's own (``config.json``); given, it must be the folder's. Nothing
    is trained; a fold that is not finished raises an :class:`InputError` naming it (and nothing
    is written).

    >>> import tempfile; from psma_lib.testing import write_tiny_crops
    >>> tmp = Path(tempfile.mkdtemp())
    >>> crops = write_tiny_crops(tmp / "crops", n_patients=12, size=8)
    >>> config = CVConfig(modality="clinical", model="coxph", folds=2, n_bootstrap=50, progress=False)
    >>> for k in (1, 0):
    ...     _ = run_fold(crops, tmp / "cv", config, k)
    >>> collect(tmp / "cv", config).summary == run_cv(crops, tmp / "seq", config).summary
    True
    """
    out_dir = Path(out_dir)
    stored = _read_header(out_dir)
    if config is None:
        try:
            config = config_from_record(stored)
        except TypeError as exc:
            raise InputError(f"config.json was written by another version of psma_lib ({exc})",
                             file=str(out_dir / "config.json")) from exc
    else:
        _check_header(out_dir, {"config": config.run_defining(), "data_checksum": stored["data_checksum"]})
    missing = [k for k in range(config.folds) if not fold_done(out_dir, k)]
    if missing:
        raise InputError(f"cannot collect {config.name}: fold(s) {', '.join(map(str, missing))} of "
                         f"{config.folds} not finished (train them with psma-pfs cv ... --fold K)",
                         file=str(out_dir))
    checksum = stored["data_checksum"]
    read = lambda k, name: _read_table(out_dir / "folds" / f"fold{k}" / name)  # noqa: E731
    ks = range(config.folds)
    oof = pd.concat([read(k, "oof.csv") for k in ks], ignore_index=True)
    fold_results = pd.DataFrame([json.loads((out_dir / "folds" / f"fold{k}" / "result.json").read_text()) for k in ks])
    fold_results = fold_results[list(FOLD_RESULT_COLUMNS)]
    write_csv(out_dir / "oof_predictions.csv", oof)
    write_csv(out_dir / "oof_lesion_predictions.csv", pd.concat([read(k, "oof_lesion.csv") for k in ks], ignore_index=True))
    write_csv(out_dir / "train_predictions.csv", pd.concat([read(k, "train_predictions.csv") for k in ks], ignore_index=True))
    write_csv(out_dir / "history.csv", pd.concat([read(k, "history.csv") for k in ks], ignore_index=True))
    write_csv(out_dir / "fold_results.csv", fold_results)
    summary = summarize_cv(oof, n_boot=config.n_bootstrap, seed=config.seed)
    del summary["fold_c_index"]  # the per-fold C-indices are fold_results' c_index
    summary["c_index_lesion_fold_mean"] = float(fold_results["c_index_lesion"].mean())
    summary["note"] = ("every C-index is patient-level except c_index_lesion, which scores each lesion "
                       "against its patient's outcome and flatters (correlated lesions counted as "
                       "separate subjects)")
    write_json(out_dir / "results.json", {"summary": summary, "folds": fold_results.to_dict("records"),
                                          "config": dataclasses.asdict(config), "data_checksum": checksum,
                                          "provenance": provenance(**dataclasses.asdict(config))})
    return CVResult(out_dir, config, oof, fold_results, summary)


def load_result(out_dir: str | Path) -> CVResult:
    """The :class:`CVResult` of a finished run folder, read from ``results.json`` and the CSVs."""
    out_dir = Path(out_dir)
    path = out_dir / "results.json"
    if not path.is_file():
        raise InputError("not a finished cross-validation folder (no results.json)", file=str(path))
    stored = json.loads(path.read_text())
    try:
        config = CVConfig(**_stored_fields(stored["config"]))
    except TypeError as exc:
        raise InputError(f"results.json was written by another version of psma_lib ({exc}); "
                         "rerun the cross-validation into a new folder", file=str(path)) from exc
    fold_results = pd.DataFrame(stored["folds"], columns=list(FOLD_RESULT_COLUMNS))
    return CVResult(out_dir, config, _read_table(out_dir / "oof_predictions.csv"), fold_results,
                    stored["summary"])


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("cv", help="patient-grouped K-fold cross-validation of a survival model",
                              description=__doc__.split("\n\n")[0])
    d = CVConfig()
    p.add_argument("--crops", type=Path, help="crops directory (psma-pfs crop); not needed by --collect")
    p.add_argument("--out", required=True, type=Path, help="output CV directory (resumes if it exists)")
    unit = p.add_mutually_exclusive_group()
    unit.add_argument("--fold", type=int, default=None, metavar="K",
                      help="train fold K only (several processes may train one run's folds at once)")
    unit.add_argument("--collect", action="store_true",
                      help="train nothing: combine the finished folds into the run's tables and results.json")
    p.add_argument("--config", type=Path, default=None, metavar="JSON",
                   help="the whole configuration from a JSON file (CVConfig fields, or a run's "
                        "config.json / results.json) instead of the options below")
    p.add_argument("--modality", choices=MODALITIES, default=d.modality)
    p.add_argument("--model", choices=MODEL_KINDS, default=None,
                   help="resnet (imaging, multimodal), mlp (clinical, default), coxph (clinical: lifelines) or "
                        "reader (imaging, multimodal: a Cox model on what the fixed reader in --weights, from "
                        "psma-pfs pretrain, reads of each lesion; multimodal adds the clinical columns)")
    p.add_argument("--backbone", type=_backbone_arg, default=None, metavar="{" + ",".join(BACKBONES) + "}",
                   help=f"the ResNet's backbone (default {DEFAULT_BACKBONE})")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--folds", type=int, default=d.folds)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--aggregation", choices=AGGREGATIONS, default=d.aggregation)
    p.add_argument("--unit", choices=TRAINING_UNITS, default=d.unit,
                   help="training unit: patient = bags of lesions, Cox loss on the aggregated risk (default)")
    p.add_argument("--aux-weight", type=float, default=d.aux_weight,
                   help="weight of the auxiliary lesion regression (0: none)")
    p.add_argument("--aux-targets", default=d.aux_targets,
                   help=f"comma-separated auxiliary lesion targets from {', '.join(AUX_TARGETS)} "
                        f"(default {d.aux_targets})")
    p.add_argument("--lesion-inputs", default=d.lesion_inputs,
                   help=f"comma-separated measured lesion quantities from {', '.join(AUX_TARGETS)} added "
                        "linearly to each lesion's log-hazard beside the image (default: none; docs/METHOD.md, "
                        "ninth round)")
    p.add_argument("--selection", choices=SELECTIONS, default=d.selection,
                   help="last = fixed schedule on the whole training fold (default); val_* = inner split")
    p.add_argument("--covariates", choices=COXPH_COVARIATES, default=d.covariates,
                   help="what the coxph baseline is fitted on (default clinical)")
    p.add_argument("--view", choices=VIEWS, default=d.view)
    p.add_argument("--head", choices=RISK_HEADS, default=d.head,
                   help="lesion log-hazard from the image embedding (mlp) or linearly from the predicted "
                        "auxiliary targets (concepts, a concept bottleneck)")
    p.add_argument("--stem", choices=STEMS, default=None,
                   help="2D ResNet stem: standard (torchvision's, with its max-pool) or no-maxpool (twice the "
                        f"resolution in the residual stages, about 2.4x the compute; default {DEFAULT_STEM} for "
                        "the 2D ResNets)")
    p.add_argument("--channels", default=d.channels,
                   help=f"image channels: pet,ct or pet,ct,mask (the lesion's own mask; crops of format "
                        f"version 3) (default {d.channels})")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--weights", default=None, help="local pretrained backbone weights (.safetensors or .pt)")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="keep the encoder loaded from --weights fixed (BatchNorm statistics too): train the heads only")
    p.add_argument("--clinical-penalty", choices=CLINICAL_PENALTIES, default=None,
                   help="ridge penalty of the clinical columns of the multimodal reader and of the coxph baselines "
                        "with covariates clinical or clinical+biomarkers: inner (chosen per fold on inner folds of "
                        "its training patients; the multimodal reader's default, docs/METHOD.md thirteenth round) "
                        "or fixed (0.01; the Cox baselines' default)")
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false")
    p.add_argument("--compile", action="store_true", help="torch.compile the train step")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC activations for 2D backbones (default: on for GPU only)")
    p.add_argument("--n-bootstrap", type=int, default=d.n_bootstrap,
                   help="bootstrap resamples of the pooled C-index's 95 %% CI")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_cli)
    p.set_defaults(option_defaults=vars(p.parse_args(["--out", "."])))  # to tell which options were given


def _backbone_arg(text: str) -> str:
    if text == "coxph":
        raise argparse.ArgumentTypeError(COXPH_AS_BACKBONE)
    if text not in BACKBONES:
        raise argparse.ArgumentTypeError(f"unknown backbone {text!r}; choose one of {', '.join(BACKBONES)}")
    return text


def _cli(args) -> int:
    config = _config_from_args(args)
    if args.collect:
        result = collect(args.out, config)
    elif args.crops is None:
        raise InputError("--crops is required (except with --collect)")
    else:
        with distributed.launched((config or CVConfig()).device):  # torchrun: one process group
            if args.fold is not None:
                run_fold(args.crops, args.out, config or CVConfig(), args.fold)
                if distributed.is_main():
                    print(f"{(config or CVConfig()).name}: fold {args.fold} done in {args.out}")
                return 0
            result = run_cv(args.crops, args.out, config or CVConfig())
    if result is None:  # not rank 0
        return 0
    s = result.summary
    print(f"{result.config.name}: patient-level C-index pooled OOF {s['pooled']:.3f} "
          f"(95 % CI {s['pooled_lo']:.3f}-{s['pooled_hi']:.3f}), folds {s['fold_min']:.3f}-{s['fold_max']:.3f} "
          f"(mean {s['fold_mean']:.3f}); results in {result.out_dir}")
    return 0


def _config_from_args(args) -> CVConfig | None:
    """The run's configuration: ``--config``'s file, else the options (None: ``--collect`` takes
    the folder's own). The options may not be combined with ``--config`` or ``--collect``."""
    fields = {f.name for f in dataclasses.fields(CVConfig)} - {"progress"}
    given = {k: v for k, v in vars(args).items() if k in fields}
    changed = sorted(k for k, v in given.items() if v != args.option_defaults[k])
    if args.config is None and not args.collect:
        return CVConfig(**given, progress=args.progress)
    if changed:
        raise InputError(f"--{changed[0].replace('_', '-')} cannot be combined with "
                         f"{'--config' if args.config else '--collect'}: the configuration comes from one place")
    if args.config is None:
        return None
    try:
        config = config_from_record(json.loads(args.config.read_text()))
        return dataclasses.replace(config, progress=config.progress and args.progress)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise InputError(f"cannot read a configuration from it ({exc})", file=str(args.config)) from exc
