"""Pretrain an image encoder on lesion crops without outcomes: ``psma-pfs pretrain``.

Many more PSMA PET/CT scans with lesion masks exist than scans with PSA follow-up. This stage
trains the ResNet encoder of the survival models to read each lesion's *measured* quantities
(:data:`~psma_lib.vocabulary.AUX_TARGETS`: log SUVmax, log volume, log(SUVmean/SUVmax), bone site,
mean CT HU -- what the crop stage measures in the lesion's mask) from its PET/CT crop, on a crops
directory of its own (another cohort: no outcome is read, none needs to exist). The weights file
it writes is what ``psma-pfs cv --weights`` loads into the encoder before survival training.

No cohort that a cross-validation evaluates may be used to pretrain its encoder: the stage
refuses nothing here (it cannot know), so keep the pretraining cohort separate (the synthetic
cohorts of other seeds are; :func:`psma_lib.pipeline.pretrain_encoder` draws one).

Training: mean squared error on the targets standardised over the training lesions (unknown
values left out), batches of lesions with the survival training's augmentation, AdamW with a
cosine-decayed learning rate, a fixed number of epochs. A seeded tenth of the patients is held
out, and the correlation of their predicted with their measured quantities is stored with the
weights (how well the encoder reads a lesion it has not seen).

The file is a ``.safetensors`` of the encoder (keys ``encoder.net.*``, the form
:func:`psma_lib.models.load_pretrained` reads) and the auxiliary head (``aux_head.*``), with
everything that defines it in its metadata (:func:`read_pretrained_meta`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .cv import (
    aux_target_names,
    image_inputs,
    lesion_scaling,
    lesion_target_values,
    read_crops,
    torch_settings,
)
from .errors import InputError
from .io import atomic_path
from .models import SurvivalModel
from .repro import provenance, set_seed
from .train import augment_batch, auxiliary_loss, cosine_lr, make_optimizer, resolve_device, set_lr
from .vocabulary import (
    AUX_TARGETS,
    BACKBONES,
    DEFAULT_BACKBONE,
    DEFAULT_INPUT_CHANNELS,
    DEFAULT_VIEW,
    STEMS,
    VIEWS,
    default_stem,
    input_channels,
)

FORMAT = "psma-pfs-pretrained-encoder"
DEFAULT_PRETRAIN_TARGETS = ",".join(AUX_TARGETS)


@dataclass
class PretrainConfig:
    """Everything that defines a pretrained encoder (stored in the weights file's metadata).

    ``backbone``, ``view``, ``stem`` and ``channels`` must be those of the runs that load it
    (``stem`` None: the backbone's default, as in :class:`psma_lib.cv.CVConfig`).
    """

    backbone: str = DEFAULT_BACKBONE
    view: str = DEFAULT_VIEW
    stem: str | None = None
    channels: str = DEFAULT_INPUT_CHANNELS
    targets: str = DEFAULT_PRETRAIN_TARGETS
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-2
    augment: bool = True
    holdout_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.stem is None:
            self.stem = default_stem(self.backbone)

    def validate(self) -> None:
        if self.backbone not in BACKBONES:
            raise InputError(f"unknown backbone {self.backbone!r}; choose one of {BACKBONES}")
        if self.view not in VIEWS:
            raise InputError(f"unknown view {self.view!r}; choose one of {VIEWS}")
        input_channels(self.channels)
        aux_target_names(self.targets, "targets")
        if self.epochs < 1 or self.batch_size < 2 or not 0 < self.holdout_fraction < 0.5:
            raise InputError("need epochs >= 1, batch_size >= 2 and 0 < holdout_fraction < 0.5")

    def defining(self) -> dict:
        """The fields that change the weights (not the device, threads or progress bar)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("device", "num_threads", "progress")}


def holdout_patients(patient_ids, fraction: float, seed: int) -> set[str]:
    """A seeded ``fraction`` of the patients (at least one), held out of pretraining.

    >>> sorted(holdout_patients([f"P{i}" for i in range(10)], 0.2, seed=0)) == \\
    ...     sorted(holdout_patients([f"P{i}" for i in range(10)], 0.2, seed=0))
    True
    >>> len(holdout_patients([f"P{i}" for i in range(10)], 0.2, seed=0))
    2
    """
    ids = np.array(sorted({str(p) for p in patient_ids}))
    n = max(1, int(round(fraction * len(ids))))
    return set(np.random.default_rng(seed).permutation(ids)[:n].tolist())


def reading_correlations(predicted: np.ndarray, measured: np.ndarray, names) -> dict[str, float]:
    """Pearson r of each predicted with its measured quantity over the lesions where it is known.

    >>> reading_correlations(np.array([[1.0], [2.0], [3.0], [4.0]]), np.array([[2.0], [4.0], [6.0], [np.nan]]), ["a"])
    {'a': 1.0}
    """
    out = {}
    for j, name in enumerate(names):
        known = np.isfinite(measured[:, j])
        x, y = predicted[known, j], measured[known, j]
        out[name] = float(np.corrcoef(x, y)[0, 1]) if known.sum() > 2 and x.std() > 0 and y.std() > 0 else float("nan")
    return out


def pretrain_encoder(crops_dir: str | Path, out: str | Path, config: PretrainConfig | None = None) -> dict:
    """Train the encoder on ``crops_dir``'s lesions to read their measured quantities; write the
    weights file ``out`` (atomically) and return its metadata (:func:`read_pretrained_meta`).

    Raises:
        InputError: unreadable crops, a lesion table without the measured columns a target needs,
            or fewer than two patients.
    """
    config = config or PretrainConfig()
    config.validate()
    crops_dir, out = Path(crops_dir), Path(out)
    crops = read_crops(crops_dir)
    lesions = crops.lesions.copy()
    lesions["patient_id"] = lesions["patient_id"].astype(str)
    names = aux_target_names(config.targets, "targets")
    values = lesion_target_values(lesions, names)
    for j, name in enumerate(names):
        if not np.isfinite(values[:, j]).any():
            raise InputError(f"no lesion has a measured value for target {name!r} (lesions.csv lacks the "
                             "column it is computed from)", file=str(crops_dir / "lesions.csv"))
    if lesions["patient_id"].nunique() < 2:
        raise InputError("pretraining needs lesions of at least two patients", file=str(crops_dir))
    held = holdout_patients(lesions["patient_id"], config.holdout_fraction, config.seed)
    train_rows = ~lesions["patient_id"].isin(held).to_numpy()
    mean, sd = lesion_scaling(values, train_rows)
    targets = torch.tensor((values - mean) / sd, dtype=torch.float32)
    images = image_inputs(crops, lesions, config.backbone, config.view, config.channels)
    device = resolve_device(config.device)
    with torch_settings(config, device):  # the run's threads; deterministic kernels on CPU
        set_seed(config.seed)
        model = SurvivalModel("imaging", config.backbone, view=config.view, stem=config.stem,
                              in_channels=len(input_channels(config.channels)), n_aux=len(names)).to(device)
        history = _train(model, images[train_rows], targets[train_rows], config, device)
        predicted = _read(model, images[~train_rows], device)
    reading = reading_correlations(predicted * sd + mean, values[~train_rows], names)
    meta = {
        "format": FORMAT, "config": config.defining(), "targets": list(names),
        "scaling": {"mean": mean.tolist(), "sd": sd.tolist()},
        "crops_dir": str(crops_dir), "data_checksum": str(crops.meta.get("data_checksum", "")),
        "n_train_lesions": int(train_rows.sum()), "n_holdout_lesions": int((~train_rows).sum()),
        "n_holdout_patients": len(held), "holdout_reading_r": reading,
        "train_loss_by_epoch": history,
        "provenance": provenance(**config.defining()),
    }
    state = {f"encoder.net.{k}": v.detach().cpu().contiguous() for k, v in model.encoder.net.state_dict().items()}
    state.update({f"aux_head.{k}": v.detach().cpu().contiguous() for k, v in model.aux_head.state_dict().items()})
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata={"psma_pfs": json.dumps(meta, sort_keys=True)})
    return meta


def _train(model: SurvivalModel, images: torch.Tensor, targets: torch.Tensor, config: PretrainConfig,
           device: torch.device) -> list[float]:
    """The fixed schedule; returns the mean training loss of each epoch."""
    views = model.encoder.view == "orthogonal" and not model.encoder.is_3d
    optimizer = make_optimizer(model, config.lr, config.weight_decay, device, False)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    order = torch.Generator().manual_seed(config.seed + 1)
    batch = min(config.batch_size, len(images))
    history = []
    for epoch in tqdm(range(config.epochs), desc="pretrain", disable=not config.progress, leave=False):
        set_lr(optimizer, cosine_lr(config.lr, epoch, config.epochs))  # the survival training's schedule
        model.train()
        perm = torch.randperm(len(images), generator=order)
        losses = []
        for start in range(0, len(perm) - batch + 1, batch):  # full batches only (BatchNorm)
            idx = perm[start:start + batch]
            x = images[idx].to(device)
            if config.augment:
                x = augment_batch(x, generator, views=views)
            optimizer.zero_grad(set_to_none=True)
            loss = auxiliary_loss(model.aux_head(model.encoder(x)), targets[idx].to(device))
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        history.append(float(np.mean(losses)))
    return history


def _read(model: SurvivalModel, images: torch.Tensor, device: torch.device, batch: int = 256) -> np.ndarray:
    """Standardised predicted quantities ``[L, T]`` of ``images`` (evaluation mode)."""
    model.eval()
    with torch.no_grad():
        parts = [model.aux_head(model.encoder(images[i:i + batch].to(device))).cpu() for i in range(0, len(images), batch)]
    return torch.cat(parts).numpy().astype(float)


def load_reader(path: str | Path) -> tuple[SurvivalModel, dict]:
    """The pretrained encoder with the head that reads the targets, as :func:`pretrain_encoder`
    wrote them to ``path`` (evaluation mode, CPU), and the file's metadata.

    Raises:
        InputError: not a weights file of ``psma-pfs pretrain``.
    """
    if not Path(path).is_file():
        raise InputError("weights file not found", file=str(path))
    meta = read_pretrained_meta(path)
    if meta.get("format") != FORMAT:
        raise InputError("not a weights file written by psma-pfs pretrain (no reader head in it)", file=str(path))
    c = meta["config"]
    model = SurvivalModel("imaging", c["backbone"], view=c["view"], stem=c["stem"],
                          in_channels=len(input_channels(c["channels"])), n_aux=len(meta["targets"]))
    state = load_file(str(path))
    model.encoder.net.load_state_dict({k.removeprefix("encoder.net."): v for k, v in state.items()
                                       if k.startswith("encoder.net.")})
    model.aux_head.load_state_dict({k.removeprefix("aux_head."): v for k, v in state.items() if k.startswith("aux_head.")})
    return model.eval(), meta


def read_lesions(path: str | Path, crops, lesions: pd.DataFrame) -> pd.DataFrame:
    """What the pretrained reader in ``path`` reads from the crops of ``lesions`` (rows of the
    :class:`psma_lib.crop.CropSet` ``crops``' lesion table, given to it as
    :func:`psma_lib.cv.image_inputs` for the file's backbone, view and channels): one column per
    target, in the measured quantities' units (log SUVmax, log mL, ...). A fixed function of each
    lesion's pixels: nothing of the lesions read is fitted."""
    model, meta = load_reader(path)
    c = meta["config"]
    images = image_inputs(crops, lesions, c["backbone"], c["view"], c["channels"])
    predicted = _read(model, images, torch.device("cpu"))
    return pd.DataFrame(predicted * np.array(meta["scaling"]["sd"]) + np.array(meta["scaling"]["mean"]),
                        columns=meta["targets"])


def read_pretrained_meta(path: str | Path) -> dict:
    """The metadata :func:`pretrain_encoder` stored with a weights file (``{}`` for a weights file
    from elsewhere, e.g. torchvision's)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # corrupt or foreign file: one clear message
        raise InputError(f"cannot read weights: {exc}", file=str(path)) from exc
    return json.loads(meta["psma_pfs"]) if "psma_pfs" in meta else {}


def register_cli(subparsers) -> None:
    d = PretrainConfig()
    p = subparsers.add_parser("pretrain", help="pretrain the image encoder on lesion crops without outcomes",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("crops", type=Path, help="crops directory (psma-pfs crop) of a cohort NOT cross-validated later")
    p.add_argument("--out", required=True, type=Path, help="weights file to write (.safetensors)")
    p.add_argument("--backbone", choices=BACKBONES, default=d.backbone)
    p.add_argument("--view", choices=VIEWS, default=d.view)
    p.add_argument("--stem", choices=STEMS, default=None, help="2D ResNet stem (default: the backbone's, as psma-pfs cv)")
    p.add_argument("--channels", default=d.channels)
    p.add_argument("--targets", default=d.targets, help=f"measured quantities to read (default {d.targets})")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="lesions per batch")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--holdout-fraction", type=float, default=d.holdout_fraction)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    if args.out.suffix != ".safetensors":
        raise InputError("the weights file must end in .safetensors", file=str(args.out))
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    config = PretrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    meta = pretrain_encoder(args.crops, args.out, config)
    reading = ", ".join(f"{k} {v:.3f}" for k, v in meta["holdout_reading_r"].items())
    print(f"pretrained {config.backbone} ({config.view}) on {meta['n_train_lesions']} lesions; held-out "
          f"lesions ({meta['n_holdout_lesions']}) read with r: {reading}; weights in {args.out}")
    return 0
