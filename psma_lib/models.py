"""Survival models: ResNet image encoders with a (PET, CT) or (PET, CT, lesion mask) stem, a
clinical branch, and lesion-to-patient aggregation. Every model outputs a **log-hazard** (higher = shorter PFS).

Backbones (torchvision, built with ``weights=None``; nothing is downloaded):

* ``resnet18`` / ``resnet34`` / ``resnet50`` (2D) on planes through the lesion centre.
  ``view="axial"`` (the class's default; cross-validation defaults to ``orthogonal``,
  :data:`psma_lib.vocabulary.DEFAULT_VIEW`): the axial plane through the centre, PET and CT as the two channels
  of one image ``[B, 2, H, W]`` -- the cheapest view and the one radiologists read.
  ``view="orthogonal"``: axial, coronal and sagittal planes ``[B, 3, 2, S, S]`` go through the
  *same* backbone as three views and their embeddings are averaged (a 2.5D summary of the lesion's
  3D shape at 3x the cost; averaging keeps the embedding size and makes it view-order invariant).
* ``r3d_18`` (3D, ``torchvision.models.video``) on the whole crop volume ``[B, 2, D, H, W]``.

Intensity normalisation is fixed and data-independent (:func:`normalize_intensity`), so it cannot
leak information between folds: PET ``log1p(clip(SUV, 0, 100)) / log1p(50)`` (about 0..1.2, keeps
the ordering of very hot lesions); CT ``(clip(HU, -1000, 2000) + 1000) / 1500 - 1`` (-1 = air,
about -0.3 = soft tissue, 1 = dense cortical bone). A lesion-mask channel (0/1) is passed as it is.

Modalities: ``clinical`` (clinical features -> MLP -> log-hazard), ``imaging`` (image embedding ->
log-hazard; refuses clinical input), ``multimodal`` (image embedding concatenated with the
clinical features -> one log-hazard). An image model may also take measured quantities of each
lesion (``n_lesion_inputs``: standardised log SUVmax, log volume, ... from the crop stage's lesion
table) as a *linear* term added to the lesion's log-hazard: the table's reading of the lesion is
then exact, and the network's part is what the pixels add to it (docs/METHOD.md, ninth round).

Lesions -> patient (:func:`aggregate_lesion_risks`): ``sum`` (the default of ``psma-pfs cv`` and
the book: the patient's hazard is the sum of the lesions' hazards, ``log sum_l exp(h_l)``;
independent lesions' hazards add, so burden — how many lesions, not only how bad the worst one
is — enters the risk), ``geometric`` (``log n + mean_l h_l``: the summed hazard of n lesions
each at the geometric mean of their hazards; the same as ``sum`` when the lesions' hazards are
equal, so the count enters alike, but it averages the lesions' scores where ``sum`` soft-maxes
them), ``mean`` (every lesion counts equally, robust to one noisy lesion) or
``max`` (the most aggressive lesion drives the risk). On the default synthetic cohort (quick
profile, imaging ResNet-18, 20 epochs) the pooled out-of-fold C-index was 0.73 with ``sum``
against 0.50 (``mean``) and 0.59 (``max``) for 20 epochs with lesion-level training. ``attention``:
:class:`SurvivalModel` with ``attention=True`` pools lesion embeddings of a patient with learned
weights and is trained at patient level on bags of lesions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision
from torch import nn

from .errors import InputError
from .vocabulary import (
    BACKBONES,
    BACKBONES_3D,
    CLINICAL_COLUMNS,
    DEFAULT_AGGREGATION,
    INPUT_CHANNELS,
    LESION_AGGREGATIONS,
    MODALITIES,
    PET_CT,
    RISK_HEADS,
    STEMS,
    VIEWS,
)

# PSA is log-normal (ng/mL over 4 orders of magnitude): log1p before scaling.
LOG_COLUMNS = ("psa",)

#: The input convolution of the 2D ResNets and of r3d_18 (torchvision's key names).
STEM_KEYS = ("conv1.weight", "stem.0.weight")

PET_SUV_CLIP = 100.0
PET_SUV_REF = 50.0
CT_HU_WINDOW = (-1000.0, 2000.0)


def normalize_intensity(x: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """Map physical units to ~[-1, 1.2]: channel 0 SUV, channel 1 HU, any further channel (the
    lesion mask) unchanged. ``channel_dim`` is 1, or 2 for orthogonal views ``[B, 3, C, S, S]``.

    PET: ``log1p(clip(SUV, 0, 100)) / log1p(50)``; CT: ``(clip(HU, -1000, 2000) + 1000) / 1500 - 1``.

    >>> normalize_intensity(torch.tensor([[50.0, -1000.0, 1.0]])).tolist()
    [[1.0, -1.0, 1.0]]
    """
    pet, ct, *rest = x.unbind(channel_dim)
    pet = torch.log1p(pet.clamp(0.0, PET_SUV_CLIP)) / math.log1p(PET_SUV_REF)
    lo, hi = CT_HU_WINDOW
    ct = (ct.clamp(lo, hi) - lo) / ((hi - lo) / 2) - 1.0
    return torch.stack([pet, ct, *rest], channel_dim)


class ClinicalPreprocessor:
    """Median imputation + missing indicators + standardisation, fitted on training patients only.

    ``transform`` returns float32 ``[n, 2 * len(columns)]``: the standardised values (missing ->
    training median) followed by one 0/1 missing-indicator per column. PSA is log1p-transformed.

    >>> pre = ClinicalPreprocessor(["age", "psa"]).fit(pd.DataFrame({"age": [60, 70, None], "psa": [1, 10, 100]}))
    >>> pre.transform(pd.DataFrame({"age": [None], "psa": [10]})).shape
    torch.Size([1, 4])
    """

    def __init__(self, columns: Sequence[str] = CLINICAL_COLUMNS):
        self.columns = list(columns)
        self.median: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    @property
    def n_features(self) -> int:
        return 2 * len(self.columns)

    def _raw(self, df: pd.DataFrame) -> np.ndarray:
        missing = [c for c in self.columns if c not in df.columns]
        if missing:
            raise InputError(f"clinical columns missing from the patients table: {missing}")
        values = df[self.columns].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
        for j, c in enumerate(self.columns):
            if c in LOG_COLUMNS:
                values[:, j] = np.log1p(np.clip(values[:, j], 0, None))
        return values

    def fit(self, df: pd.DataFrame) -> ClinicalPreprocessor:
        """Learn medians, means and sds from ``df`` (the training fold's patients)."""
        values = self._raw(df)
        with np.errstate(all="ignore"):
            median = np.nanmedian(values, axis=0)
        median = np.where(np.isfinite(median), median, 0.0)  # column entirely missing
        filled = np.where(np.isnan(values), median, values)
        std = filled.std(axis=0)
        self.median = torch.tensor(median, dtype=torch.float64)
        self.mean = torch.tensor(filled.mean(axis=0), dtype=torch.float64)
        self.std = torch.tensor(np.where(std > 1e-8, std, 1.0), dtype=torch.float64)
        return self

    def transform(self, df: pd.DataFrame) -> torch.Tensor:
        """``[n, 2 * n_columns]`` float32 features for the rows of ``df``."""
        if self.median is None:
            raise RuntimeError("ClinicalPreprocessor.transform called before fit")
        values = torch.tensor(self._raw(df), dtype=torch.float64)
        is_missing = torch.isnan(values)
        filled = torch.where(is_missing, self.median.expand_as(values), values)
        scaled = (filled - self.mean) / self.std
        return torch.cat([scaled, is_missing.to(torch.float64)], dim=1).float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to save beside the model (safetensors); columns are stored in the metadata."""
        return {"clinical.median": self.median, "clinical.mean": self.mean, "clinical.std": self.std}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], columns: Sequence[str]) -> ClinicalPreprocessor:
        pre = cls(columns)
        pre.median, pre.mean, pre.std = (state[f"clinical.{k}"].double() for k in ("median", "mean", "std"))
        return pre


def _stem_conv(conv: nn.Module, in_channels: int) -> nn.Module:
    """Same conv with ``in_channels`` input channels (PET, CT and maybe the lesion mask)."""
    cls = type(conv)
    return cls(in_channels, conv.out_channels, kernel_size=conv.kernel_size, stride=conv.stride,
               padding=conv.padding, bias=conv.bias is not None)


class ImageEncoder(nn.Module):
    """Backbone without its classifier: images in physical units -> embedding ``[B, dim]``.

    Input with ``C = in_channels`` (2: PET, CT; 3: and the lesion mask): 2D axial ``[B, C, H, W]``,
    2D orthogonal ``[B, 3, C, S, S]``, 3D ``[B, C, D, H, W]``.

    >>> enc = ImageEncoder("resnet18")
    >>> enc(torch.zeros(2, 2, 32, 32)).shape
    torch.Size([2, 512])
    >>> ImageEncoder("resnet18", "orthogonal", in_channels=3)(torch.zeros(2, 3, 3, 32, 32)).shape
    torch.Size([2, 512])

    ``stem="no-maxpool"`` (:data:`~psma_lib.vocabulary.STEMS`, 2D only) drops the stem's max-pool,
    so the residual stages see twice the resolution:

    >>> ImageEncoder("resnet18", stem="no-maxpool").net.maxpool
    Identity()
    """

    def __init__(self, backbone: str = "resnet18", view: str = "axial", in_channels: int = 2,
                 stem: str = "standard"):
        super().__init__()
        if backbone not in BACKBONES:
            raise InputError(f"unknown backbone {backbone!r}; choose one of {BACKBONES}")
        if view not in VIEWS:
            raise InputError(f"unknown view {view!r}; choose one of {VIEWS}")
        if in_channels not in (len(PET_CT), len(INPUT_CHANNELS)):
            raise InputError(f"an image model takes {len(PET_CT)} (PET, CT) or {len(INPUT_CHANNELS)} (and the "
                             f"lesion mask) channels, got {in_channels}")
        if stem not in STEMS:
            raise InputError(f"unknown stem {stem!r}; choose one of {STEMS}")
        self.backbone_name, self.view, self.in_channels, self.stem = backbone, view, in_channels, stem
        self.is_3d = backbone in BACKBONES_3D
        if self.is_3d and stem != "standard":
            raise InputError(f"stem {stem!r} is for the 2D ResNets: {backbone}'s stem has no max-pool")
        if self.is_3d:
            net = torchvision.models.video.r3d_18(weights=None)
            net.stem[0] = _stem_conv(net.stem[0], in_channels)
        else:
            net = getattr(torchvision.models, backbone)(weights=None)
            net.conv1 = _stem_conv(net.conv1, in_channels)
            if stem == "no-maxpool":  # no parameters: pretrained weights load the same
                net.maxpool = nn.Identity()
        self.dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net
        self.channels_last = False  # NHWC activations for 2D (set by the trainer where it helps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        views = images.shape[1] if not self.is_3d and self.view == "orthogonal" else 0
        x = normalize_intensity(images, channel_dim=2 if views else 1)
        if views:
            x = x.flatten(0, 1)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        emb = self.net(x)
        return emb.view(-1, views, emb.shape[1]).mean(dim=1) if views else emb


class SurvivalModel(nn.Module):
    """Log-hazard model for one modality; ``forward(images, clinical) -> [B]`` (lesion level).

    ``imaging`` raises if given clinical features (no clinical information can reach it);
    ``clinical`` raises if given images. With ``attention=True`` use :meth:`forward_bags`.
    ``head="concepts"`` (:data:`~psma_lib.vocabulary.RISK_HEADS`) scores a lesion linearly from
    its ``n_aux`` auxiliary predictions instead of from the embedding. ``n_lesion_inputs > 0`` adds
    a linear term in the lesion's measured quantities ``lesion_inputs`` ``[B, n_lesion_inputs]``
    (standardised, given with every call) to its log-hazard; the head's last layer then starts at 0,
    so an untrained model is that linear term alone. Not for attention pooling.

    >>> m = SurvivalModel("multimodal", "resnet18", n_clinical=4)
    >>> m(torch.zeros(3, 2, 32, 32), torch.zeros(3, 4)).shape
    torch.Size([3])
    >>> SurvivalModel("imaging", "resnet18", n_aux=5, head="concepts").head
    Linear(in_features=5, out_features=1, bias=True)
    >>> m = SurvivalModel("imaging", "resnet18", n_lesion_inputs=2).eval()
    >>> x, z = torch.zeros(3, 2, 32, 32), torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> with torch.no_grad():
    ...     _ = m.lesion_linear.weight.copy_(torch.tensor([[0.5, -1.0]]))
    ...     h = m(x, lesion_inputs=z)
    >>> [round(v, 3) for v in (h - h[0]).tolist()]
    [0.0, 0.5, -1.0]
    """

    def __init__(self, modality: str, backbone: str = "resnet18", *, n_clinical: int = 0,
                 view: str = "axial", hidden: int = 32, dropout: float = 0.2, attention: bool = False,
                 n_aux: int = 0, in_channels: int = 2, head: str = "mlp", stem: str = "standard",
                 n_lesion_inputs: int = 0):
        super().__init__()
        if modality not in MODALITIES:
            raise InputError(f"unknown modality {modality!r}; choose one of {MODALITIES}")
        if modality != "imaging" and n_clinical <= 0:
            raise InputError(f"modality {modality!r} needs clinical features (n_clinical > 0)")
        if head not in RISK_HEADS:
            raise InputError(f"unknown risk head {head!r}; choose one of {RISK_HEADS}")
        if head == "concepts" and (modality == "clinical" or n_aux <= 0):
            raise InputError("the concepts head scores the auxiliary head's predictions: it needs an image "
                             "model with auxiliary targets (n_aux > 0)")
        if n_lesion_inputs and (modality == "clinical" or attention):
            raise InputError("measured lesion inputs are added to each lesion's log-hazard: they need an image "
                             "model that scores lesions (not clinical, not attention pooling)")
        self.modality, self.attention, self.head_kind = modality, attention, head
        self.n_clinical = n_clinical if modality != "imaging" else 0
        self.encoder = ImageEncoder(backbone, view, in_channels, stem) if modality != "clinical" else None
        image_dim = self.encoder.dim if self.encoder is not None else 0
        if attention and self.encoder is not None:
            self.attention_score = nn.Sequential(nn.Linear(image_dim, 64), nn.Tanh(), nn.Linear(64, 1))
        # auxiliary lesion regression (measured lesion quantities, vocabulary.AUX_TARGETS): a regulariser that makes
        # the embedding encode what the lesion table measures; part of the log-hazard only with the concepts head
        self.aux_head = nn.Linear(image_dim, n_aux) if n_aux and self.encoder is not None else None
        if head == "concepts":  # a concept bottleneck: linear in what the image is read to measure
            self.head = nn.Linear(n_aux + self.n_clinical, 1)
        else:
            self.head = nn.Sequential(
                nn.Dropout(dropout), nn.Linear(image_dim + self.n_clinical, hidden), nn.ReLU(), nn.Linear(hidden, 1),
            )
        # the table's reading of the lesion, exact and linear (weights fitted before training and kept,
        # psma_lib.train.fit_lesion_linear); the head starts at 0 and learns what the image adds to it
        self.lesion_linear = nn.Linear(n_lesion_inputs, 1, bias=False) if n_lesion_inputs else None
        if self.lesion_linear is not None:
            last = self.head if isinstance(self.head, nn.Linear) else self.head[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def _check_inputs(self, images, clinical, lesion_inputs=None):
        if (self.lesion_linear is None) != (lesion_inputs is None):
            raise ValueError("measured lesion inputs must be given exactly when the model takes them "
                             f"(n_lesion_inputs={0 if self.lesion_linear is None else self.lesion_linear.in_features})")
        if self.modality == "imaging" and clinical is not None:
            raise ValueError("imaging modality must not receive clinical features")
        if self.modality == "clinical" and images is not None:
            raise ValueError("clinical modality must not receive images")
        if self.modality != "imaging" and clinical is None:
            raise ValueError(f"{self.modality} modality needs clinical features")
        if self.modality != "clinical" and images is None:
            raise ValueError(f"{self.modality} modality needs images")

    def _head(self, embedding: torch.Tensor | None, clinical: torch.Tensor | None,
              aux: torch.Tensor | None = None, lesion_inputs: torch.Tensor | None = None) -> torch.Tensor:
        """Log-hazards from the embedding (``mlp``) or from the auxiliary predictions ``aux``
        (``concepts``), with the clinical features beside them, plus the linear term in the
        measured lesion inputs where the model takes them."""
        image = aux if self.head_kind == "concepts" else embedding
        parts = [t for t in (image, clinical) if t is not None]
        log_hazard = self.head(torch.cat(parts, dim=1)).squeeze(1)
        if self.lesion_linear is not None:
            log_hazard = log_hazard + self.lesion_linear(lesion_inputs.to(log_hazard.dtype)).squeeze(1)
        return log_hazard

    def forward(self, images: torch.Tensor | None = None, clinical: torch.Tensor | None = None,
                lesion_inputs: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_with_aux(images, clinical, lesion_inputs)[0]

    def forward_with_aux(self, images: torch.Tensor | None = None, clinical: torch.Tensor | None = None,
                         lesion_inputs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Lesion log-hazards ``[B]`` and auxiliary predictions ``[B, n_aux]`` (None without)."""
        self._check_inputs(images, clinical, lesion_inputs)
        return self.score_embedding(self.encoder(images) if self.encoder is not None else None, clinical,
                                    lesion_inputs)

    def score_embedding(self, embedding: torch.Tensor | None, clinical: torch.Tensor | None = None,
                        lesion_inputs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`forward_with_aux` after the encoder: lesion log-hazards and auxiliary predictions
        from image embeddings ``[B, dim]`` (a data-parallel step gathers these across ranks)."""
        aux = self.aux_head(embedding) if self.aux_head is not None else None
        return self._head(embedding, clinical, aux, lesion_inputs), aux

    def forward_bags(self, images: torch.Tensor, bag_index: torch.Tensor, n_bags: int,
                     clinical: torch.Tensor | None = None, aggregation: str = "sum",
                     lesion_inputs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Patient log-hazards ``[n_bags]`` from lesions ``images`` ``[L, ...]``, and the lesions'
        auxiliary predictions ``[L, n_aux]`` (None without).

        ``bag_index`` ``[L]`` (int64) gives each lesion's patient row in ``0..n_bags-1``;
        ``clinical`` is per patient ``[n_bags, F]``. An attention model pools the lesion embeddings
        with a softmax over each patient's lesions (segment softmax via scatter, no padding, any
        bag sizes); any other model scores each lesion and combines the log-hazards with
        :func:`segment_aggregate` (``aggregation``), so the Cox loss acts on the patient's risk.
        ``lesion_inputs`` are per lesion ``[L, n_lesion_inputs]``.
        """
        self._check_inputs(images, clinical, lesion_inputs)
        return self.score_bags(self.encoder(images), bag_index, n_bags, clinical, aggregation, lesion_inputs)

    def score_bags(self, emb: torch.Tensor, bag_index: torch.Tensor, n_bags: int,
                   clinical: torch.Tensor | None = None, aggregation: str = "sum",
                   lesion_inputs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`forward_bags` after the encoder, from the lesions' embeddings ``[L, dim]``."""
        aux = self.aux_head(emb) if self.aux_head is not None else None
        if not self.attention:
            lesion_clinical = None if clinical is None else clinical[bag_index]
            log_hazard = self._head(emb, lesion_clinical, aux, lesion_inputs)
            return segment_aggregate(log_hazard, bag_index, n_bags, aggregation), aux
        score = self.attention_score(emb).squeeze(1).float()
        bag_max = torch.full((n_bags,), -torch.inf, device=score.device).scatter_reduce(
            0, bag_index, score, reduce="amax", include_self=True)
        weight = torch.exp(score - bag_max[bag_index])
        norm = torch.zeros(n_bags, device=score.device).index_add(0, bag_index, weight)
        weight = (weight / norm[bag_index]).to(emb.dtype)
        pooled = torch.zeros(n_bags, emb.shape[1], device=emb.device, dtype=emb.dtype)
        pooled = pooled.index_add(0, bag_index, emb * weight.unsqueeze(1))
        pooled_aux = self.aux_head(pooled) if self.head_kind == "concepts" else None
        return self._head(pooled, clinical, pooled_aux), aux


def segment_aggregate(log_hazard: torch.Tensor, bag_index: torch.Tensor, n_bags: int,
                      how: str = DEFAULT_AGGREGATION) -> torch.Tensor:
    """Differentiable patient log-hazards ``[n_bags]`` from lesion log-hazards ``[L]``.

    The torch twin of :func:`aggregate_lesion_risks` (same ``how``); every bag must be non-empty.

    >>> h = torch.tensor([1.0, 3.0, 0.5]); bag = torch.tensor([0, 0, 1])
    >>> [round(v, 3) for v in segment_aggregate(h, bag, 2, "sum").tolist()]
    [3.127, 0.5]
    >>> segment_aggregate(h, bag, 2, "mean").tolist()
    [2.0, 0.5]
    >>> [round(v, 3) for v in segment_aggregate(h, bag, 2, "geometric").tolist()]
    [2.693, 0.5]
    """
    if how not in LESION_AGGREGATIONS:
        raise InputError(f"unknown lesion aggregation {how!r}; choose one of {LESION_AGGREGATIONS}")
    h = log_hazard.float()
    if how in ("mean", "geometric"):
        counts = torch.zeros(n_bags, device=h.device).index_add(0, bag_index, torch.ones_like(h))
        mean = torch.zeros(n_bags, device=h.device).index_add(0, bag_index, h) / counts
        return mean if how == "mean" else mean + torch.log(counts)
    peak = torch.full((n_bags,), -torch.inf, device=h.device).scatter_reduce(
        0, bag_index, h, reduce="amax", include_self=True)
    if how == "max":
        return peak
    peak = peak.detach()  # the shift cancels exactly; no gradient through it
    summed = torch.zeros(n_bags, device=h.device).index_add(0, bag_index, torch.exp(h - peak[bag_index]))
    return torch.log(summed) + peak


def aggregate_lesion_risks(lesions: pd.DataFrame, how: str = DEFAULT_AGGREGATION, column: str = "log_hazard",
                           by: str = "patient_id") -> pd.Series:
    """Patient risk from lesion log-hazards: ``sum`` (the pipeline's default), ``geometric``, ``mean``
    or ``max``.

    ``sum`` is the log of the summed hazards, ``log sum_l exp(h_l)`` (computed stably);
    ``geometric`` is ``log n + mean_l h_l`` (n lesions at the geometric mean of their hazards).

    >>> df = pd.DataFrame({"patient_id": ["a", "a", "b"], "log_hazard": [1.0, 3.0, 0.5]})
    >>> aggregate_lesion_risks(df).round(3).to_dict()
    {'a': 3.127, 'b': 0.5}
    >>> aggregate_lesion_risks(df, "mean").to_dict()
    {'a': 2.0, 'b': 0.5}
    >>> aggregate_lesion_risks(df, "geometric").round(3).to_dict()
    {'a': 2.693, 'b': 0.5}
    """
    if how not in LESION_AGGREGATIONS:
        raise InputError(f"unknown lesion aggregation {how!r}; choose one of {LESION_AGGREGATIONS}")
    groups = lesions.groupby(by, sort=True)[column]
    if how == "geometric":
        return groups.mean() + np.log(groups.size())
    if how != "sum":
        return groups.agg(how)
    peak = groups.transform("max")
    summed = np.exp(lesions[column] - peak).groupby(lesions[by], sort=True).sum()
    return np.log(summed) + groups.max()


def load_pretrained(model: SurvivalModel, path: str | Path) -> list[str]:
    """Load backbone weights from a LOCAL file (``.safetensors`` or a torch state dict).

    Keys may be torchvision's own (``conv1.weight``, ``layer1...``) or prefixed ``encoder.net.``.
    A 3-channel ImageNet stem is adapted to the model's input channels (PET, CT, maybe the lesion
    mask) by averaging over RGB, whatever the number of channels. The classifier
    (``fc``) is skipped. Returns the encoder keys that stayed randomly initialised.
    """
    path = Path(path)
    if model.encoder is None:
        raise InputError("pretrained weights given, but the clinical modality has no image encoder", file=str(path))
    if not path.is_file():
        raise InputError("weights file not found", file=str(path))
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file: one clear message
        raise InputError(f"cannot read weights: {exc}", file=str(path)) from exc
    if not isinstance(state, dict):
        raise InputError("weights file does not hold a state dict", file=str(path))
    state = {k.removeprefix("encoder.net.").removeprefix("module."): v for k, v in state.items()}
    target = model.encoder.net.state_dict()
    loaded = {}
    for key, value in state.items():
        if key.startswith("fc.") or key not in target:
            continue
        if key in STEM_KEYS and value.ndim >= 4 and value.shape[1] == 3:  # RGB: no channel is ours
            value = value.mean(dim=1, keepdim=True).expand(-1, target[key].shape[1], *value.shape[2:]).clone()
        if value.shape != target[key].shape:
            raise InputError(f"weights for {key} have shape {tuple(value.shape)}, model needs "
                             f"{tuple(target[key].shape)}", file=str(path))
        loaded[key] = value
    if not loaded:
        raise InputError(f"no weights in the file match backbone {model.encoder.backbone_name}", file=str(path))
    model.encoder.net.load_state_dict(loaded, strict=False)
    return sorted(set(target) - set(loaded))
