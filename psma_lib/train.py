"""Training loop of the survival models: patient-level (bag) or lesion-level Cox training,
auxiliary lesion targets, batched on-device augmentation, a fixed schedule or inner-validation
model selection, and a fast GPU path.

Training units (``TrainConfig.unit``):

* ``patient`` (the default for image models): each batch holds whole patients as bags of all
  their lesions; the lesions' log-hazards are combined with the run's aggregation
  (:func:`psma_lib.models.segment_aggregate`, or attention pooling) and the Cox loss acts on the
  patients' risks -- the same quantity that is evaluated. ``batch_size`` counts patients.
* ``lesion``: each lesion inherits its patient's ``pfs_months`` / ``event`` and the Cox loss runs
  over a batch of lesions (Efron ties handle the identical times of one patient's lesions).
  ``batch_size`` counts lesions. Kept for comparison (docs/METHOD.md).
* the clinical model always trains on patients (a patient's lesions would only repeat the same
  clinical row).

``aux_weight > 0`` adds a lesion-level regression of measured quantities (standardised log SUVmax
and log volume from the lesion table, ``SurvivalData.lesion_targets``) from the image embedding:
a regulariser that needs no outcome, fitted on the training patients only.

Measured lesion inputs (``SurvivalData.lesion_inputs``, a model with ``n_lesion_inputs``): the
linear term's weights are fitted before the network by :func:`fit_lesion_linear` (a Cox model
of the training patients whose lesion log-hazards are linear in the inputs, combined with the
run's aggregation) and stay fixed while the network trains; the head's last layer starts at 0, so
the model starts as that table model and the network learns what the pixels add to it.

Model selection (``TrainConfig.selection``): ``last`` trains a fixed schedule (cosine-decayed
learning rate) on every training patient and keeps the final weights; ``val_loss`` /
``val_c_index`` keep the best epoch on an inner validation set (with early stopping).

The history is on one scale: each epoch's Cox loss of the training (and validation) patients at
patient level with the run's aggregation, beside the loss of a constant risk on the same patients
(``*_null_loss``); their difference is comparable across sets of different size.

CPU: deterministic (``torch.use_deterministic_algorithms(True)``, seeded generators for shuffling,
augmentation and dropout), so the same seed gives bit-identical results. GPU: the data lives on the
device, augmentation runs batched there, bf16 autocast, cudnn autotuning, and for lesion units
without auxiliary targets the whole train step (forward, Cox loss, backward, capturable AdamW) is
captured once in a CUDA graph and replayed (falls back to eager with a warning if capture fails);
``compile=True`` uses ``torch.compile``.

Several processes (``torchrun``, :mod:`psma_lib.distributed`): with an initialised process group
of more than one rank, :class:`Trainer` splits each global batch into one shard of patients per
rank, wraps the step in ``DistributedDataParallel`` and computes the loss over the global batch on
every rank from the gathered lesion embeddings, so the gradient is the single-process gradient of
that batch (BatchNorm over the global batch too; augmentation and dropout draw the global batch's
random numbers). CUDA graphs and ``torch.compile`` are off there (a note in the history says so).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from . import distributed
from .cox import neg_partial_log_likelihood
from .errors import InputError
from .evaluation import concordance_index
from .models import SurvivalModel, aggregate_lesion_risks, segment_aggregate
from .vocabulary import DEFAULT_AGGREGATION, INPUT_CHANNELS

TRAINING_UNITS = ("patient", "lesion")
SELECTIONS = ("last", "val_loss", "val_c_index")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class SurvivalData:
    """One set of patients with their lesion inputs, as tensors (moved to the device once).

    ``time`` / ``event`` / ``clinical`` are per patient ``[P]``, ``[P]``, ``[P, F]``;
    ``images`` per lesion ``[L, 2, H, W]`` (2D axial), ``[L, 3, 2, S, S]`` (orthogonal) or
    ``[L, 2, D, H, W]`` (3D) in physical units; ``lesion_patient`` ``[L]`` int64 row in ``0..P-1``;
    ``lesion_targets`` ``[L, T]`` float32 auxiliary targets (NaN = unknown), only for training;
    ``lesion_inputs`` ``[L, K]`` float32 standardised measured lesion quantities for a model that
    takes them (every set: they are inputs, not targets).
    """

    time: torch.Tensor
    event: torch.Tensor
    clinical: torch.Tensor | None = None
    images: torch.Tensor | None = None
    lesion_patient: torch.Tensor | None = None
    lesion_targets: torch.Tensor | None = None
    lesion_inputs: torch.Tensor | None = None

    @property
    def n_patients(self) -> int:
        return int(self.time.shape[0])

    def to(self, device: torch.device) -> SurvivalData:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return SurvivalData(move(self.time), move(self.event), move(self.clinical), move(self.images),
                            move(self.lesion_patient), move(self.lesion_targets), move(self.lesion_inputs))


@dataclass
class TrainConfig:
    """Optimisation settings (see :func:`fit`)."""

    epochs: int = 20
    batch_size: int = 32         # patients (unit "patient") or lesions (unit "lesion")
    lr: float = 1e-3
    weight_decay: float = 1e-2
    aggregation: str = DEFAULT_AGGREGATION
    unit: str = "patient"
    aux_weight: float = 1.0          # used where the model has an auxiliary head and targets exist
    selection: str = "last"
    patience: int = 10           # early stopping, for the val_* selections only
    augment: bool = True
    freeze_encoder: bool = False  # train the heads only: the image encoder as loaded, BatchNorm statistics included
    bf16: bool = True            # GPU only; CPU stays float32 (deterministic, and not faster there)
    cuda_graph: bool = True      # GPU only
    compile: bool = False
    channels_last: bool | None = None  # 2D NHWC; None = on for GPU, off for CPU (measured slower there)
    progress: bool = True


@dataclass
class FitResult:
    state_dict: dict[str, torch.Tensor]
    history: pd.DataFrame
    best_epoch: int
    notes: list[str] = field(default_factory=list)


def augment_batch(x: torch.Tensor, generator: torch.Generator, *, max_rotation_deg: float = 10.0,
                  max_shift: float = 0.08, pet_log_scale_sd: float = 0.1, ct_shift_sd_hu: float = 20.0,
                  draw: tuple[int, int] | None = None, views: bool | None = None) -> torch.Tensor:
    """Random flips, small rotations and shifts and intensity jitter for a whole batch at once.

    ``x``: ``[B, C, H, W]``, ``[B, V, C, S, S]`` (``views=True``) or ``[B, C, D, H, W]`` in SUV / HU
    (``C`` = 2, or 3 with the lesion mask, which is moved with the image and not jittered;
    ``views=None`` takes a 5-D ``x`` whose third axis is at most 3 long for views). One affine
    resampling (``grid_sample``, border padding) does flips (per axis, p = 0.5), rotation (in the
    axial H-W plane, uniform +-``max_rotation_deg``) and shift (+-``max_shift`` of the field of
    view); PET is scaled by ``exp(N(0, 0.1))`` (calibration), CT shifted by ``N(0, 20)`` HU. All
    random numbers come from ``generator`` on ``x``'s device: no per-sample Python loop.
    ``draw=(first, total)``: the random numbers are drawn for a batch of ``total`` samples and
    rows ``first .. first + len(x)`` are used, so a rank's shard of a global batch is augmented
    exactly as in one process (which draws for the whole batch).
    """
    b, device = x.shape[0], x.device
    first, total = draw if draw is not None else (0, b)
    rows = slice(first, first + b)
    rand = lambda *s: torch.rand(total, *s, generator=generator, device=device)[rows]  # noqa: E731
    randn = lambda: torch.randn(total, generator=generator, device=device)[rows]  # noqa: E731
    is_views = x.ndim == 5 and (x.shape[2] <= len(INPUT_CHANNELS) if views is None else views)
    is_3d = x.ndim == 5 and not is_views
    # intensity: channel axis is 1 (or 2 for views)
    shape = [b] + [1] * (x.ndim - 1)
    pet_scale = torch.exp(pet_log_scale_sd * randn()).view(shape)
    ct_shift = (ct_shift_sd_hu * randn()).view(shape)
    channel_dim = 2 if is_views else 1
    pet, ct, *rest = x.unbind(channel_dim)
    x = torch.stack([pet * pet_scale.squeeze(-1), ct + ct_shift.squeeze(-1), *rest], dim=channel_dim)
    n_axes = 3 if is_3d else 2
    flips = torch.where(rand(n_axes) < 0.5, -1.0, 1.0)
    angle = (2 * rand() - 1) * math.radians(max_rotation_deg)
    shift = (2 * rand(n_axes) - 1) * 2 * max_shift  # grid units span 2 per field of view
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(b, n_axes, n_axes + 1, device=device)
    # grid coordinates are (W, H[, D]); rotate in the (W, H) plane
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    if is_3d:
        theta[:, 2, 2] = 1.0
    theta[:, :, :n_axes] *= flips.unsqueeze(1)
    theta[:, :, n_axes] = shift
    flat = x.flatten(1, 2) if is_views else x
    grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
    out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.view_as(x)


class Batch(NamedTuple):
    """Model inputs and targets of one batch; ``bags`` = (lesion -> patient row, n patients)."""

    images: torch.Tensor | None
    clinical: torch.Tensor | None
    time: torch.Tensor
    event: torch.Tensor
    bags: tuple[torch.Tensor, int] | None
    targets: torch.Tensor | None
    lesion_inputs: torch.Tensor | None = None


class _Batches:
    """Index batches for one epoch: lesions (lesion units) or patients with their lesion bags."""

    def __init__(self, data: SurvivalData, unit: str):
        self.data, self.unit = data, unit
        if unit == "bag":
            lp = data.lesion_patient
            self.order = torch.argsort(lp, stable=True)
            self.counts = torch.bincount(lp, minlength=data.n_patients)
            self.offsets = torch.cumsum(self.counts, 0) - self.counts
            self.counts_cpu = self.counts.cpu()
        self.n_units = data.images.shape[0] if unit == "lesion" else data.n_patients

    def bag_lesions(self, patients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Lesion rows and their bag index (0..len(patients)-1) for the given patients."""
        lens = self.counts[patients]
        starts = self.offsets[patients]
        bag = torch.repeat_interleave(torch.arange(len(patients), device=lens.device), lens)
        first = torch.cumsum(lens, 0) - lens
        pos = torch.arange(int(lens.sum()), device=lens.device) - first[bag] + starts[bag]
        return self.order[pos], bag

    def lesion_counts(self, idx: torch.Tensor) -> torch.Tensor:
        """``[len(idx)]`` lesions of each unit row (CPU): a bag's size, or 1 for a lesion."""
        idx = idx.cpu()
        return self.counts_cpu[idx] if self.unit == "bag" else torch.ones(len(idx), dtype=torch.int64)

    def inputs(self, idx: torch.Tensor, lesions: slice = slice(None)) -> Batch:
        """The batch of unit rows ``idx``; ``lesions`` selects the batch's lesion rows whose images
        are taken (a rank's shard; everything else is the whole batch's)."""
        d = self.data
        pick = lambda t, rows: None if t is None else t[rows]  # noqa: E731
        if self.unit == "patient":
            return Batch(None, d.clinical[idx], d.time[idx], d.event[idx], None, None)
        if self.unit == "lesion":
            pid = d.lesion_patient[idx]
            return Batch(d.images[idx[lesions]], pick(d.clinical, pid), d.time[pid], d.event[pid], None,
                         pick(d.lesion_targets, idx), pick(d.lesion_inputs, idx))
        rows, bag = self.bag_lesions(idx)
        return Batch(d.images[rows[lesions]], pick(d.clinical, idx), d.time[idx], d.event[idx],
                     (bag, len(idx)), pick(d.lesion_targets, rows), pick(d.lesion_inputs, rows))


def _unit(model: SurvivalModel, unit: str = "patient") -> str:
    """What one training row is: ``patient`` (clinical), ``bag`` (patients with their lesions)
    or ``lesion``."""
    if model.encoder is None:
        return "patient"
    return "bag" if model.attention or unit == "patient" else "lesion"


def _forward(model: SurvivalModel, batch: Batch, aggregation: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-hazards of the batch's units, auxiliary lesion predictions or None)."""
    if model.modality == "clinical":
        return model(None, batch.clinical), None
    clinical = None if model.modality == "imaging" else batch.clinical
    if batch.bags is not None:
        return model.forward_bags(batch.images, batch.bags[0], batch.bags[1], clinical, aggregation,
                                  batch.lesion_inputs)
    return model.forward_with_aux(batch.images, clinical, batch.lesion_inputs)


def _score(model: SurvivalModel, embedding: torch.Tensor, batch: Batch, aggregation: str
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_forward` after the image encoder, from the batch's lesion embeddings."""
    clinical = None if model.modality == "imaging" else batch.clinical
    if batch.bags is not None:
        return model.score_bags(embedding, batch.bags[0], batch.bags[1], clinical, aggregation,
                                batch.lesion_inputs)
    return model.score_embedding(embedding, clinical, batch.lesion_inputs)


def _batch_loss(log_hazard: torch.Tensor, aux: torch.Tensor | None, batch: Batch, aux_weight: float | None
                ) -> torch.Tensor:
    """Cox loss of the batch (mean per event) plus ``aux_weight`` x the auxiliary loss (None: no
    auxiliary term)."""
    loss = neg_partial_log_likelihood(log_hazard.float(), batch.time, batch.event)
    aux_loss = auxiliary_loss(aux, batch.targets) if aux_weight is not None else None
    return loss if aux_loss is None else loss + aux_weight * aux_loss


def auxiliary_loss(prediction: torch.Tensor | None, targets: torch.Tensor | None) -> torch.Tensor | None:
    """Mean squared error over the known (non-NaN) auxiliary targets; None if there are none.

    >>> auxiliary_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, float("nan")]])).item()
    4.0
    """
    if prediction is None or targets is None:
        return None
    known = ~torch.isnan(targets)
    err = torch.where(known, prediction.float() - torch.nan_to_num(targets), torch.zeros_like(targets))
    return (err**2).sum() / known.sum().clamp(min=1)


def _autocast(device: torch.device, enabled: bool):
    # no weight-cast cache: it is not allowed across CUDA graph capture and saves little here
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=False)


@torch.no_grad()
def predict(model: SurvivalModel, data: SurvivalData, aggregation: str = DEFAULT_AGGREGATION, batch_size: int = 256,
            bf16: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Patient risks ``[P]`` and lesion log-hazards ``[L]`` (None without images), float64.

    Image models score each lesion and aggregate (``aggregation``, as in training); attention
    models pool each patient's bag and score every lesion also as a bag of one (its own
    log-hazard, for the lesion table). The clinical model scores patients only.
    """
    model.eval()
    device = next(model.parameters()).device
    use_bf16 = bf16 and device.type == "cuda"

    def run(n, fn):
        out = [fn(torch.arange(i, min(i + batch_size, n), device=device)) for i in range(0, n, batch_size)]
        return torch.cat(out).double().cpu().numpy()

    with _autocast(device, use_bf16):
        if model.encoder is None:
            return run(data.n_patients, lambda idx: model(None, data.clinical[idx]).float()), None
        lesions = _Batches(data, "lesion")

        def lesion_fn(idx):
            batch = lesions.inputs(idx)
            if model.attention:  # each lesion as a bag of one
                batch = batch._replace(bags=(torch.arange(len(idx), device=device), len(idx)))
            return _forward(model, batch, aggregation)[0].float()

        lesion = run(data.images.shape[0], lesion_fn)
        if model.attention:
            bags = _Batches(data, "bag")
            patient = run(data.n_patients, lambda idx: _forward(model, bags.inputs(idx), aggregation)[0].float())
        else:
            frame = pd.DataFrame({"p": data.lesion_patient.cpu().numpy(), "h": lesion})
            patient = (aggregate_lesion_risks(frame, aggregation, column="h", by="p")
                       .reindex(range(data.n_patients)).to_numpy())
    return patient, lesion


def fit_lesion_linear(inputs: torch.Tensor, lesion_patient: torch.Tensor, time: torch.Tensor,
                      event: torch.Tensor, aggregation: str = DEFAULT_AGGREGATION,
                      penalizer: float = 0.01, patient_inputs: torch.Tensor | None = None,
                      patient_penalizer: float | None = None) -> torch.Tensor:
    """Weights ``[K]`` (``[K + J]`` with ``patient_inputs``; float64) of a Cox model whose lesion
    log-hazards are linear in ``inputs``.

    The patients' risks are the lesions' ``inputs @ w`` combined with ``aggregation``
    (:func:`~psma_lib.models.segment_aggregate`), plus ``patient_inputs @ b`` where given (e.g. the
    clinical covariates: a lesion's log-hazard is then its own term plus its patient's, whose
    aggregate -- sum, mean or max -- adds the patient's term once); the weights ``[w, b]`` minimise the
    Efron negative log partial likelihood over the number of patients plus
    ``penalizer / 2 * |w|^2 + patient_penalizer / 2 * |b|^2`` (``patient_penalizer`` None: the same
    ``penalizer``) -- lifelines' ``CoxPHFitter(penalizer=...)`` objective with a penalizer per column,
    which it equals for one lesion per patient (tests/test_cox.py compares them). L-BFGS from 0, in
    float64.

    Args:
        inputs: ``[L, K]`` standardised measured quantities of the lesions.
        lesion_patient: ``[L]`` int64 patient row of each lesion in ``0..P-1``.
        time, event: ``[P]`` the patients' times and 0/1 events.
        patient_inputs: ``[P, J]`` standardised patient-level covariates, or None.
        patient_penalizer: the ridge penalty of their weights ``b`` (e.g. chosen on inner folds,
            :func:`psma_lib.cv.select_covariate_penalizer`).

    >>> z = torch.tensor([[1.0], [0.0], [-1.0], [0.5]])
    >>> w = fit_lesion_linear(z, torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1, 1, 1, 0]))
    >>> w.shape, bool(w[0] > 0)  # the higher input had the earlier event
    (torch.Size([1]), True)
    >>> x = torch.tensor([[0.0], [1.0], [0.0], [1.0]])  # a patient covariate beside it
    >>> fit_lesion_linear(z, torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1, 1, 1, 0]),
    ...                   patient_inputs=x).shape
    torch.Size([2])
    """
    z = inputs.detach().double().cpu()
    bags, n = lesion_patient.detach().cpu(), int(time.shape[0])
    time, event = time.detach().double().cpu(), event.detach().cpu()
    x = None if patient_inputs is None else patient_inputs.detach().double().cpu()
    if x is not None and x.shape[0] != n:
        raise ValueError(f"patient_inputs has {x.shape[0]} rows for {n} patients")
    k = z.shape[1]
    w = torch.zeros(k + (0 if x is None else x.shape[1]), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], lr=1.0, max_iter=200, tolerance_grad=1e-10, tolerance_change=1e-14,
                                  line_search_fn="strong_wolfe")
    ridge = torch.full_like(w, penalizer)
    ridge[k:] = penalizer if patient_penalizer is None else patient_penalizer

    def objective():
        optimizer.zero_grad()
        risk = segment_aggregate(z @ w[:k], bags, n, aggregation)
        if x is not None:
            risk = risk + x @ w[k:]
        loss = neg_partial_log_likelihood(risk, time, event, reduction="sum") / n + (ridge * w * w).sum() / 2
        loss.backward()
        return loss

    optimizer.step(objective)
    return w.detach()


def patient_loss(risk: np.ndarray, data: SurvivalData) -> tuple[float, float]:
    """(Cox loss of patient risks ``risk`` on ``data``'s patients, loss of a constant risk).

    Both are the mean negative partial log-likelihood per event (Efron); the constant-risk loss
    grows with the log of the risk-set sizes, so ``loss - null`` is what compares across sets.
    """
    time, event = data.time.double().cpu(), data.event.cpu()
    if int(event.sum()) == 0:
        return float("nan"), float("nan")
    loss = float(neg_partial_log_likelihood(torch.tensor(risk, dtype=torch.float64), time, event))
    null = float(neg_partial_log_likelihood(torch.zeros(len(risk), dtype=torch.float64), time, event))
    return loss, null


def _evaluate(model, data: SurvivalData, aggregation: str, bf16: bool) -> dict[str, float]:
    """Patient-level Cox loss, constant-risk loss and C-index of ``data``."""
    risk, _ = predict(model, data, aggregation, bf16=bf16)
    loss, null = patient_loss(risk, data)
    time, event = data.time.double().cpu().numpy(), data.event.cpu().numpy()
    c_index = concordance_index(time, risk, event) if int(event.sum()) > 0 else float("nan")
    return {"loss": loss, "null_loss": null, "c_index": c_index}


class _GraphedStep:
    """The whole train step captured in a CUDA graph with static input buffers (lesion units
    without auxiliary targets or lesion inputs: the only ones with static shapes)."""

    def __init__(self, model, optimizer, example: Batch, bf16: bool, aggregation: str):
        self.model, self.optimizer, self.aggregation = model, optimizer, aggregation
        self.static = Batch(*[None if t is None else t.clone() for t in example[:4]], None, None)
        model.train()  # the captured graph replays training-mode BatchNorm and dropout
        params = [p.detach().clone() for p in model.parameters()]
        buffers = [b.detach().clone() for b in model.buffers()]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up on a side stream, as CUDA graph capture requires
                optimizer.zero_grad(set_to_none=True)
                self._loss(bf16).backward()
                optimizer.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self.loss = self._loss(bf16)
            self.loss.backward()
            optimizer.step()
        # undo the warm-up/capture updates in place, so replay starts from the initial state
        with torch.no_grad():
            for p, p0 in zip(model.parameters(), params, strict=True):
                p.copy_(p0)
            for b, b0 in zip(model.buffers(), buffers, strict=True):
                b.copy_(b0)
            for state in optimizer.state.values():
                for value in state.values():
                    if torch.is_tensor(value):
                        value.zero_()

    def _loss(self, bf16):
        device = self.static.time.device
        with _autocast(device, bf16):
            log_hazard, _ = _forward(self.model, self.static, self.aggregation)
        return neg_partial_log_likelihood(log_hazard.float(), self.static.time, self.static.event)

    def __call__(self, batch: Batch) -> torch.Tensor:
        for buf, value in zip(self.static[:4], batch[:4], strict=True):
            if buf is not None:
                buf.copy_(value)
        self.graph.replay()
        return self.loss.clone()  # the static output is overwritten by the next replay


class _GlobalLoss(nn.Module):
    """The loss of one global batch, computed from this rank's shard: the module DDP wraps.

    Image models: the encoder runs on the rank's lesions, every rank's embeddings are gathered
    (differentiable, in global batch order) and the rest of the model and the loss run on the whole
    batch, identically on every rank (:mod:`psma_lib.distributed` has the gradient scaling). The
    clinical model is too small to split: every rank computes the whole batch.
    """

    def __init__(self, model: SurvivalModel, aggregation: str, aux_weight: float | None, bf16: bool):
        super().__init__()
        self.model, self.aggregation, self.aux_weight, self.bf16 = model, aggregation, aux_weight, bf16

    def forward(self, batch: Batch, lesions_per_rank: list[int]) -> torch.Tensor:
        with _autocast(batch.time.device, self.bf16):
            if self.model.encoder is None:
                log_hazard, aux = _forward(self.model, batch, self.aggregation)
            else:
                embedding = distributed.all_gather_rows(self.model.encoder(batch.images), lesions_per_rank)
                log_hazard, aux = _score(self.model, embedding, batch, self.aggregation)
        return _batch_loss(log_hazard, aux, batch, self.aux_weight)


def make_optimizer(model, lr: float, weight_decay: float, device: torch.device, capturable: bool):
    """AdamW on the trainable parameters, without weight decay on norms and biases; capturable
    (tensor lr) for CUDA graphs."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim > 1]
    no_decay = [p for p in trainable if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if capturable:
        return torch.optim.AdamW(groups, lr=torch.tensor(lr, device=device), capturable=True)
    return torch.optim.AdamW(groups, lr=lr)


def cosine_lr(lr: float, epoch: int, epochs: int) -> float:
    """Learning rate of ``epoch`` (0-based) of a fixed schedule: cosine decay from ``lr`` to 5 % of it.

    >>> [round(cosine_lr(1.0, e, 3), 3) for e in range(3)]
    [1.0, 0.525, 0.05]
    """
    frac = epoch / max(1, epochs - 1)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def set_lr(optimizer, lr: float):
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


class Trainer:
    """One model's optimisation: ``step()`` on batches from the epoch permutation.

    Exposed separately from :func:`fit` so the throughput benchmark times exactly the same step.
    Under DDP (:func:`psma_lib.distributed.active`) every rank builds it with the same data and seed:
    the same permutation everywhere, each global batch split into contiguous shards of units (a
    patient's lesions on one rank), ``batch_size`` still counting the global batch.
    """

    def __init__(self, model: SurvivalModel, train: SurvivalData, config: TrainConfig, seed: int):
        if config.unit not in TRAINING_UNITS:
            raise ValueError(f"unknown training unit {config.unit!r}; choose one of {TRAINING_UNITS}")
        self.device = next(model.parameters()).device
        self.model, self.config, self.train = model, config, train
        self.is_cuda = self.device.type == "cuda"
        self.bf16 = config.bf16 and self.is_cuda
        self.unit = _unit(model, config.unit)
        self.use_aux = config.aux_weight > 0 and model.aux_head is not None and train.lesion_targets is not None
        self.frozen = config.freeze_encoder and model.encoder is not None
        if self.frozen:
            model.encoder.requires_grad_(False)
        self.batches = _Batches(train, self.unit)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.cpu_generator = torch.Generator().manual_seed(seed + 1)
        encoder = model.encoder
        self._views = encoder is not None and not encoder.is_3d and encoder.view == "orthogonal"
        channels_last = self.is_cuda if config.channels_last is None else config.channels_last
        if channels_last and model.encoder is not None and not model.encoder.is_3d:
            model.encoder.channels_last = True
            model.to(memory_format=torch.channels_last)
        if self.is_cuda:
            torch.backends.cudnn.benchmark = True
        want_graph = (self.is_cuda and config.cuda_graph and self.unit == "lesion" and not self.use_aux
                      and model.lesion_linear is None and not config.compile and not self.frozen)
        self.notes: list[str] = []
        self.world = distributed.world_size()
        self.ddp: DistributedDataParallel | None = None
        if self.world > 1:
            self._wrap_ddp(want_graph)
            want_graph = False
        self.optimizer = make_optimizer(model, config.lr, config.weight_decay, self.device, want_graph)
        self.batch_size = min(config.batch_size, self.batches.n_units)
        if self.ddp is not None and model.encoder is not None and self.batch_size < self.world:
            raise InputError(f"a batch of {self.batch_size} training units cannot be split over {self.world} "
                             "ranks: use a larger --batch-size or fewer ranks")
        self.graphed: _GraphedStep | None = None
        use_compile = config.compile and self.ddp is None
        self.step_fn = torch.compile(self._eager_loss) if use_compile else self._eager_loss
        if want_graph:
            initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
            try:
                example = self._batch(torch.arange(self.batch_size, device=self.device))
                self.graphed = _GraphedStep(model, self.optimizer, example, self.bf16, config.aggregation)
            except Exception as exc:  # capture is fragile across versions/ops: eager still works
                msg = f"CUDA graph capture failed ({type(exc).__name__}: {exc}); training eagerly"
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
                self.notes.append(msg)
                model.load_state_dict(initial)  # undo any warm-up steps taken before the failure
                self.optimizer = make_optimizer(model, config.lr, config.weight_decay, self.device, False)

    def _wrap_ddp(self, graph_wanted: bool) -> None:
        """Global-batch BatchNorm and the DistributedDataParallel step (CUDA graphs and compile off)."""
        self.notes.append(f"DDP over {self.world} ranks ({torch.distributed.get_backend()}): "
                          "the global batch's loss and gradient")
        if graph_wanted:
            self.notes.append("CUDA graphs off under DDP (collectives and per-rank shapes in the step)")
        if self.config.compile:
            self.notes.append("torch.compile off under DDP (not tested there)")
        distributed.sync_batchnorm(self.model, self.device)
        step = _GlobalLoss(self.model, self.config.aggregation, self.config.aux_weight if self.use_aux else None,
                           self.bf16)
        self.ddp = DistributedDataParallel(step, device_ids=[self.device.index] if self.is_cuda else None,
                                           find_unused_parameters=self.model.aux_head is not None and not self.use_aux)

    def _shard(self, idx: torch.Tensor) -> tuple[Batch, list[int]]:
        """This rank's view of the global batch ``idx`` and the lesions of every rank: all tensors are
        the whole batch's except the images, those of the rank's contiguous run of units (augmented
        with the whole batch's random numbers)."""
        if self.model.encoder is None:
            return self.batches.inputs(idx), []
        lesions = distributed.shard_lesions(self.batches.lesion_counts(idx), self.world)
        first = sum(lesions[:distributed.rank()])
        batch = self.batches.inputs(idx, slice(first, first + lesions[distributed.rank()]))
        if self.config.augment:
            draw = (first, sum(lesions))
            images = augment_batch(batch.images, self.generator, draw=draw, views=self._views)
            batch = batch._replace(images=images)
        return batch, lesions

    def _batch(self, idx) -> Batch:
        batch = self.batches.inputs(idx)
        if batch.images is not None and self.config.augment:
            batch = batch._replace(images=augment_batch(batch.images, self.generator, views=self._views))
        return batch

    def _eager_loss(self, batch: Batch) -> torch.Tensor:
        with _autocast(self.device, self.bf16):
            log_hazard, aux = _forward(self.model, batch, self.config.aggregation)
        return _batch_loss(log_hazard, aux, batch, self.config.aux_weight if self.use_aux else None)

    def epoch_batches(self) -> list[torch.Tensor]:
        """Index batches of one epoch: a seeded permutation cut into full batches (static shapes for
        CUDA graphs); the last batch is topped up from the start of the permutation, so every unit
        is seen at least once per epoch."""
        n = self.batches.n_units
        perm = torch.randperm(n, generator=self.cpu_generator)
        n_batches = math.ceil(n / self.batch_size)
        perm = torch.cat([perm, perm[:n_batches * self.batch_size - n]]).to(self.device)
        return [perm[i * self.batch_size:(i + 1) * self.batch_size] for i in range(n_batches)]

    def step(self, idx: torch.Tensor) -> torch.Tensor:
        """One optimisation step on unit rows ``idx``; returns the loss tensor (no host sync)."""
        self.model.train()
        if self.frozen:  # its BatchNorm keeps the loaded statistics
            self.model.encoder.eval()
        if self.graphed is not None:
            return self.graphed(self._batch(idx))
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.ddp(*self._shard(idx)) if self.ddp is not None else self.step_fn(self._batch(idx))
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def set_epoch_lr(self, epoch: int) -> None:
        """Cosine decay from ``lr`` to 5 % of it over the epochs (:func:`cosine_lr`)."""
        set_lr(self.optimizer, cosine_lr(self.config.lr, epoch, self.config.epochs))


HISTORY_COLUMNS = ("epoch", "batch_loss", "train_loss", "train_null_loss", "val_loss", "val_null_loss",
                   "val_c_index")


def fit(model: SurvivalModel, train: SurvivalData, val: SurvivalData | None, config: TrainConfig, seed: int,
        desc: str = "train") -> FitResult:
    """Train ``model`` (already on its device); returns the kept weights (CPU copy) and a per-epoch
    history (:data:`HISTORY_COLUMNS`).

    ``selection="last"``: the fixed schedule of ``epochs`` epochs on ``train``; the final weights
    are kept and ``val`` (if given) is only monitored. ``val_loss`` / ``val_c_index``: the epoch
    with the best patient-level validation loss (or C-index, ties: lower loss) is kept, and
    training stops after ``patience`` epochs without improvement.

    Inside a process group of several ranks (``torchrun``) every rank calls ``fit`` with the same
    data, config and seed and trains its shard of each global batch (:class:`Trainer`); rank 0
    alone evaluates, keeps the history (the other ranks return an empty one) and decides best epoch
    and early stopping, which it broadcasts, so every rank ends with the same weights.
    """
    if config.selection not in SELECTIONS:
        raise ValueError(f"unknown selection {config.selection!r}; choose one of {SELECTIONS}")
    if config.selection.startswith("val_") and val is None:
        raise ValueError(f"selection {config.selection!r} needs validation patients")
    device = next(model.parameters()).device
    torch.manual_seed(seed)  # dropout on CPU uses the global generator
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    trainer = Trainer(model, train.to(device), config, seed)
    train_eval = dataclasses.replace(trainer.train, lesion_targets=None)
    val = None if val is None else val.to(device)
    main = distributed.is_main()  # under DDP rank 0 evaluates and decides, the other ranks follow
    best_key, best_epoch, best_state, rows, since_best = None, -1, None, [], 0
    bar = tqdm(range(config.epochs), desc=desc, disable=not (config.progress and main), leave=False)
    for epoch in bar:
        trainer.set_epoch_lr(epoch)
        losses = [trainer.step(idx) for idx in trainer.epoch_batches()]
        is_best, stop = False, False
        if main:
            on_train = _evaluate(model, train_eval, config.aggregation, trainer.bf16)
            on_val = _evaluate(model, val, config.aggregation, trainer.bf16) if val is not None else {}
            rows.append({"epoch": epoch, "batch_loss": float(torch.stack(losses).mean()),
                         "train_loss": on_train["loss"], "train_null_loss": on_train["null_loss"],
                         "val_loss": on_val.get("loss", np.nan), "val_null_loss": on_val.get("null_loss", np.nan),
                         "val_c_index": on_val.get("c_index", np.nan)})
            bar.set_postfix(loss=f"{on_train['loss'] - on_train['null_loss']:+.3f}")
            if config.selection != "last":
                val_loss = np.nan_to_num(on_val["loss"], nan=np.inf)
                key = (-val_loss,) if config.selection == "val_loss" else \
                    (np.nan_to_num(on_val["c_index"], nan=0.5), -val_loss)
                is_best = best_key is None or key > best_key
                best_key, since_best = (key, 0) if is_best else (best_key, since_best + 1)
                stop = since_best >= config.patience
        if config.selection == "last":
            continue
        is_best, stop = distributed.broadcast_values([is_best, stop])
        if is_best:
            best_epoch = epoch
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if stop:
            break
    if config.selection == "last":
        best_epoch = config.epochs - 1
        best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return FitResult(copy.deepcopy(best_state), pd.DataFrame(rows, columns=list(HISTORY_COLUMNS)),
                     best_epoch, trainer.notes)
