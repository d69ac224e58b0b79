"""What a chapter needs to start: the profiles, a chapter's settings, and the book's runs.

A chapter's first cell is ``s = book.start(profile=profile, ...)``: it resolves the ``parameters``
cell into :class:`BookSettings` and shows the data banner and the settings table. The chapter then
asks for the cached stages with :func:`cohort`, :func:`crops` and :func:`cv` (the profile's
configuration of :mod:`psma_lib.pipeline`'s calls) and shows each statistical step itself, with
the analysis functions of :mod:`psma_lib.evaluation` and :mod:`psma_lib.analysis` and the tables
of :mod:`psma_lib.report`. The runner that executes the chapters is :mod:`psma_lib.runner`.

>>> s = settings(profile="ci", output_dir="/tmp/book")
>>> cv_config(s, "multimodal").name, cv_config(s, "clinical", "coxph").name
('multimodal-resnet18', 'clinical-coxph')
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import pipeline, report
from .crop import CropSet
from .errors import InputError
from .vocabulary import (
    BACKBONES,
    DEFAULT_AGGREGATION,
    DEFAULT_BACKBONE,
    MODALITIES,
    model_kinds_for,
)

if TYPE_CHECKING:  # cv imports torch: only a chapter that cross-validates pays for it
    from .cv import CVConfig, CVResult

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Profile:
    """How much work one book run does.

    ``patients`` only applies to the generated synthetic cohort; ``size_mm``/``spacing_mm``
    set the crop (``size_mm / spacing_mm`` voxels per axis); ``epochs`` and ``backbones`` the
    cross-validated models; ``n_bootstrap`` the resamples behind every C-index CI.
    ``aggregation`` turns lesion log-hazards into a patient risk (``sum``: the patient's hazard
    is the sum of its lesions' hazards, so lesion burden counts; see ``psma_lib.models``).
    The clinical MLP sees one row per patient (two optimiser steps per epoch on ~80 training
    patients), so it gets its own, longer schedule: ``clinical_epochs`` at ``clinical_lr``.
    ``repeats``: how many times chapter 6 repeats the whole cross-validation with new fold seeds
    (``seed``, ``seed + 1``, ...) to show how much the fold mean depends on the split.
    ``stem``: the 2D ResNets' stem (None: :data:`psma_lib.vocabulary.DEFAULT_STEM`, without the
    max-pool); ``ci`` and ``quick`` keep torchvision's ``standard`` stem, whose residual stages
    cost about 2.4x less on a CPU (docs/METHOD.md, eighth round).
    ``pretrain_patients`` / ``pretrain_epochs`` / ``pretrain_batch_size``: the lesion reader's
    pretraining (:func:`reader_weights`) on another synthetic cohort of that many patients, without
    outcomes (docs/METHOD.md, twelfth round: the quick book's choice, read off how well candidates
    read the lesions, no outcome involved).
    """

    name: str
    patients: int
    size_mm: float
    spacing_mm: float
    epochs: int
    backbones: tuple[str, ...]
    folds: int = 5
    n_bootstrap: int = 1000
    aggregation: str = DEFAULT_AGGREGATION
    clinical_epochs: int = 300
    clinical_lr: float = 1e-2
    repeats: int = 1
    stem: str | None = None
    pretrain_patients: int = 100
    pretrain_epochs: int = 60
    pretrain_batch_size: int = 32
    description: str = ""


PROFILES: dict[str, Profile] = {
    "ci": Profile(
        name="ci", patients=30, size_mm=48.0, spacing_mm=3.0, epochs=2,
        backbones=("resnet18",), n_bootstrap=200, stem="standard",
        pretrain_patients=20, pretrain_epochs=2, pretrain_batch_size=16,
        description="smallest: every chapter, table and figure in a few minutes on 2 CPU cores",
    ),
    "quick": Profile(
        name="quick", patients=99, size_mm=48.0, spacing_mm=2.0, epochs=20,
        backbones=("resnet18",), stem="standard",
        description="the default: the whole 99-patient cohort, ResNet-18, few epochs (CPU)",
    ),
    "paper": Profile(
        name="paper", patients=99, size_mm=64.0, spacing_mm=2.0, epochs=20,
        backbones=BACKBONES, repeats=5,
        description="larger crops and every backbone: ResNet-18/34/50 and 3D r3d_18 (one GPU)",
    ),
}


@dataclasses.dataclass(frozen=True)
class BookSettings:
    """Resolved parameters of one chapter run (absolute paths, profile defaults filled in)."""

    profile: str
    output_dir: Path
    manifest: Path | None
    device: str
    seed: int
    epochs: int
    backbones: tuple[str, ...]
    patients: int
    size_mm: float
    spacing_mm: float
    folds: int
    n_bootstrap: int
    reader_weights: Path | None = None
    show_progress: bool = True

    @property
    def main_backbone(self) -> str:
        """The configuration the single-model chapters show: ResNet-18 (the paper's best)."""
        return DEFAULT_BACKBONE if DEFAULT_BACKBONE in self.backbones else self.backbones[0]

    @property
    def description(self) -> str:
        return PROFILES[self.profile].description

    def shown(self, path: Path) -> str:
        """A path as a page shows it: relative to the repository when inside it.

        >>> settings(profile="ci").shown(REPO_ROOT / "_build" / "x"), settings(profile="ci").shown(Path("/tmp/x"))
        ('_build/x', '/tmp/x')
        """
        return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def resolve_path(path: str | os.PathLike, base: Path = REPO_ROOT) -> Path:
    """Absolute path; a relative one is taken relative to the repository root.

    Chapters run with cwd = ``chapters/`` under nbval and wherever papermill is told; anchoring
    relative paths at the repository root makes ``_build/results`` mean the same folder in both.

    >>> resolve_path("/tmp/x") == Path("/tmp/x")
    True
    """
    path = Path(os.path.expanduser(os.fspath(path)))
    return path if path.is_absolute() else (base / path).resolve()


def settings(
    profile: str | None = None,
    output_dir: str | os.PathLike | None = None,
    manifest: str | os.PathLike | None = None,
    device: str = "auto",
    seed: int = 0,
    epochs: int | None = None,
    backbones: Sequence[str] | None = None,
    patients: int | None = None,
    reader_weights: str | os.PathLike | None = None,
    show_progress: bool = True,
) -> BookSettings:
    """Resolve a chapter's ``parameters`` cell into :class:`BookSettings`.

    ``profile`` None → ``$PSMA_BOOK_PROFILE`` or ``"quick"``; ``output_dir`` None →
    ``$PSMA_BOOK_OUTPUT`` or ``_build/results/<profile>``; ``manifest`` None → the default
    synthetic cohort generated into the output folder. ``epochs``/``backbones``/``patients``
    None → the profile's values. ``reader_weights``: a lesion reader of ``psma-pfs pretrain``
    (trained on an archive of scans with lesion masks) for the reader runs; None → on the
    synthetic cohort the book pretrains one (:func:`reader_weights`), on a real cohort there is none.

    >>> s = settings(profile="ci", output_dir="/tmp/book")
    >>> (s.epochs, s.backbones, str(s.output_dir))
    (2, ('resnet18',), '/tmp/book')
    """
    profile = profile or os.environ.get("PSMA_BOOK_PROFILE") or "quick"
    if profile not in PROFILES:
        raise InputError(f"unknown book profile {profile!r}; choose one of {sorted(PROFILES)}")
    prof = PROFILES[profile]
    output_dir = output_dir or os.environ.get("PSMA_BOOK_OUTPUT") or f"_build/results/{profile}"
    backbones = tuple(backbones) if backbones else prof.backbones
    unknown = sorted(set(backbones) - set(BACKBONES))
    if unknown:
        raise InputError(f"unknown backbone(s) {unknown}; choose from {list(BACKBONES)}")
    manifest_path = resolve_path(manifest) if manifest else None
    if manifest_path is not None and not manifest_path.is_file():
        raise InputError("manifest not found", file=str(manifest_path))
    reader_path = resolve_path(reader_weights) if reader_weights else None
    if reader_path is not None and not reader_path.is_file():
        raise InputError("reader weights not found (a psma-pfs pretrain file)", file=str(reader_path))
    return BookSettings(
        profile=profile,
        output_dir=resolve_path(output_dir),
        manifest=manifest_path,
        device=device,
        seed=int(seed),
        epochs=int(epochs) if epochs else prof.epochs,
        backbones=backbones,
        patients=int(patients) if patients else prof.patients,
        size_mm=prof.size_mm,
        spacing_mm=prof.spacing_mm,
        folds=prof.folds,
        n_bootstrap=prof.n_bootstrap,
        reader_weights=reader_path,
        show_progress=show_progress,
    )


def start(**parameters) -> BookSettings:
    """A chapter's first cell: resolve its ``parameters`` (see :func:`settings`), make sure the
    cohort and its crops exist, and show the data banner and the settings table."""
    from IPython.display import display

    s = settings(**parameters, show_progress=False)
    crop_set = crops(s)
    display(report.data_banner(crop_set.meta, s.profile, s.shown(cohort(s).manifest)),
            report.html_table(report.settings_table(s)))
    return s


# --------------------------------------------------------------------------- the book's stages


def cohort(s: BookSettings) -> pipeline.CohortFiles:
    """The cohort: ``s.manifest`` if given, else the synthetic one generated into the output folder."""
    if s.manifest is not None:
        return pipeline.cohort_files(s.manifest)
    return pipeline.generate_cohort(s.output_dir, patients=s.patients, seed=s.seed,
                                    progress=s.show_progress)


def crops(s: BookSettings) -> CropSet:
    """The cohort's lesion crops (:class:`psma_lib.crop.CropSet`) at the profile's size and spacing."""
    return pipeline.crop_cohort(cohort(s), s.output_dir, size_mm=s.size_mm, spacing_mm=s.spacing_mm,
                                progress=s.show_progress)


def pretrained_encoder(s: BookSettings, *, seed: int, patients: int, epochs: int, batch_size: int = 128) -> Path:
    """An encoder pretrained (:func:`psma_lib.pipeline.pretrained_encoder`) on another cohort of
    the default generator (``seed`` must differ from the book's; its outcomes are never read),
    cropped at the profile's size and spacing, with the view, stem and channels of the profile's
    imaging ResNet; cached in the output folder. :func:`reader_weights` and the benches' tenth to
    twelfth rounds (docs/METHOD.md) use it."""
    from .pretrain import PretrainConfig

    if seed == s.seed:
        raise InputError(f"the pretraining cohort must be another cohort: seed {seed} is the book's")
    imaging = cv_config(s, "imaging")
    pretraining = pipeline.crop_cohort(pipeline.generate_cohort(s.output_dir, patients=patients, seed=seed),
                                       s.output_dir, size_mm=s.size_mm, spacing_mm=s.spacing_mm)
    return pipeline.pretrained_encoder(pretraining, s.output_dir, PretrainConfig(
        view=imaging.view, stem=imaging.stem, channels=imaging.channels, epochs=epochs, batch_size=batch_size,
        progress=False))


#: The book's pretraining cohort is the default generator's draw ``seed + PRETRAIN_SEED_OFFSET``.
PRETRAIN_SEED_OFFSET = 1000


def reader_weights(s: BookSettings) -> Path | None:
    """The lesion reader of the book's ``reader`` runs: ``s.reader_weights`` when given; on the
    synthetic cohort otherwise an encoder pretrained on another synthetic cohort (draw ``s.seed +``
    :data:`PRETRAIN_SEED_OFFSET`, the profile's ``pretrain_*`` settings),
    made once and cached; on a real cohort without one, None (the chapters then skip the reader:
    pretrain it on scans of other patients with lesion masks, ``psma-pfs pretrain``)."""
    if s.reader_weights is not None:
        return s.reader_weights
    if s.manifest is not None:
        return None
    prof = PROFILES[s.profile]
    return pretrained_encoder(s, seed=s.seed + PRETRAIN_SEED_OFFSET, patients=prof.pretrain_patients,
                              epochs=prof.pretrain_epochs, batch_size=prof.pretrain_batch_size)


def cv_config(s: BookSettings, modality: str, model: str | None = None, backbone: str | None = None,
              covariates: str = "clinical", repeat: int = 0, clinical_penalty: str | None = None) -> CVConfig:
    """The profile's :class:`psma_lib.cv.CVConfig` of one run.

    ``model`` None: the modality's default (``resnet`` for images, ``mlp`` for clinical);
    ``reader``: the fixed lesion reader of :func:`reader_weights` and a Cox model on its readings;
    ``backbone`` None: the settings' main backbone (ResNet runs only); ``covariates``: what a
    ``coxph`` baseline is fitted on (clinical, count, biomarkers, clinical+biomarkers, biomarkers+ct);
    ``repeat`` r > 0: the same run on the folds of seed ``s.seed + r``; ``clinical_penalty``: how
    a multimodal reader or a Cox baseline with clinical columns penalises them (``fixed``, or
    ``inner``: chosen on inner folds; None: :class:`~psma_lib.cv.CVConfig`'s default, ``inner`` for
    the multimodal reader, ``fixed`` for the Cox baselines).
    """
    from .cv import CVConfig

    if modality not in MODALITIES:
        raise InputError(f"unknown modality {modality!r}; choose one of {list(MODALITIES)}")
    prof = PROFILES[s.profile]
    model = model or model_kinds_for(modality)[0]
    common = dict(modality=modality, model=model, folds=s.folds, seed=s.seed + repeat, device=s.device,
                  n_bootstrap=s.n_bootstrap, progress=s.show_progress, clinical_penalty=clinical_penalty)
    if model == "resnet":
        return CVConfig(**common, backbone=backbone or s.main_backbone, epochs=s.epochs,
                        aggregation=prof.aggregation, stem=prof.stem)
    if backbone is not None:
        raise InputError(f"the {model} model has no image backbone; got backbone {backbone!r}")
    if model == "mlp":
        epochs = max(s.epochs, prof.clinical_epochs)
        return CVConfig(**common, epochs=epochs, lr=prof.clinical_lr, patience=epochs)
    if model == "reader":
        weights = reader_weights(s)
        if weights is None:
            raise InputError("the reader runs need a lesion reader: give the book reader_weights (a psma-pfs "
                             "pretrain file trained on other patients' scans with lesion masks)")
        return CVConfig(**common, weights=str(weights), aggregation=prof.aggregation)
    return CVConfig(**common, covariates=covariates)  # coxph: fitted once per fold, no schedule


def cv(s: BookSettings, modality: str, model: str | None = None, backbone: str | None = None,
       covariates: str = "clinical", repeat: int = 0, clinical_penalty: str | None = None) -> CVResult:
    """One cross-validated run (:class:`psma_lib.cv.CVResult`), computed once per configuration."""
    return pipeline.run_cv(crops(s), s.output_dir,
                           cv_config(s, modality, model, backbone, covariates, repeat, clinical_penalty))


# The book's runs as :func:`cv` keywords: the chapters ask for these, ``psma-pfs grid`` trains them.
CLINICAL_RUNS = (dict(modality="clinical", model="coxph"), dict(modality="clinical", model="mlp"))
#: The Cox baselines by name, as :func:`cv` keywords: lesion count, the PSMA PET biomarkers, clinical +
#: biomarkers (once more with the clinical penalty chosen on inner folds, as the multimodal reader's
#: is: does the reader win only because its shrinkage is tuned?) and biomarkers + CT density.
BASELINE_RUNS = {
    "lesion count (Cox)": dict(modality="clinical", model="coxph", covariates="count"),
    "PSMA PET biomarkers (Cox)": dict(modality="clinical", model="coxph", covariates="biomarkers"),
    "clinical + biomarkers (Cox)": dict(modality="clinical", model="coxph", covariates="clinical+biomarkers"),
    "clinical + biomarkers (Cox, tuned)": dict(modality="clinical", model="coxph", covariates="clinical+biomarkers",
                                               clinical_penalty="inner"),
    "biomarkers + CT density (Cox)": dict(modality="clinical", model="coxph", covariates="biomarkers+ct"),
}


def baseline_runs(s: BookSettings) -> dict[str, CVResult]:
    """The Cox baselines of :data:`BASELINE_RUNS` on the networks' folds, by name (the clinical Cox
    model is among :func:`clinical_runs`)."""
    return {name: cv(s, **run) for name, run in BASELINE_RUNS.items()}


def clinical_runs(s: BookSettings) -> list[CVResult]:
    """The two clinical-only runs on the same folds: the classical lifelines Cox model and the
    ResNet-Cox pipeline's clinical branch (an MLP with the Cox loss)."""
    return [cv(s, **run) for run in CLINICAL_RUNS]


def ablation_specs(s: BookSettings) -> list[dict]:
    """:func:`ablation_runs`' runs as :func:`cv` keywords."""
    return [*CLINICAL_RUNS, *BASELINE_RUNS.values(), *(dict(modality=modality, model="resnet", backbone=backbone)
                                              for modality in ("imaging", "multimodal") for backbone in s.backbones)]


def ablation_runs(s: BookSettings) -> list[CVResult]:
    """Every configuration of the ablation: the clinical runs and the Cox baselines once, then
    imaging and multimodal for each backbone of the settings, then the reader runs
    (:func:`reader_runs`)."""
    return [cv(s, **run) for run in ablation_specs(s)] + list(reader_runs(s).values())


#: The lesion reader's runs by name, as :func:`cv` keywords (seconds on a CPU: no grid needed for them).
#: The multimodal reader's clinical penalty is chosen on inner folds (docs/METHOD.md, thirteenth round).
READER_RUNS = {"imaging reader": dict(modality="imaging", model="reader"),
               "multimodal reader": dict(modality="multimodal", model="reader", clinical_penalty="inner")}


def reader_runs(s: BookSettings) -> dict[str, CVResult]:
    """The imaging and multimodal reader runs by name (a Cox model per fold on what the fixed
    lesion reader of :func:`reader_weights` reads; multimodal adds the clinical columns); none on
    a real cohort without ``reader_weights``."""
    if reader_weights(s) is None:
        return {}
    return {name: cv(s, **run) for name, run in READER_RUNS.items()}


def repeat_models(s: BookSettings) -> dict[str, dict]:
    """Chapter 6's repeated cross-validation: its models (row name -> :func:`cv` keywords), each
    run again with ``repeat=r`` for r < the profile's ``repeats``.

    >>> list(repeat_models(settings(profile="ci")))
    ['lesion count (Cox)', 'imaging resnet18', 'multimodal resnet18']
    """
    return {"lesion count (Cox)": BASELINE_RUNS["lesion count (Cox)"],
            f"imaging {s.main_backbone}": dict(modality="imaging"),
            f"multimodal {s.main_backbone}": dict(modality="multimodal")}


def cv_configs(s: BookSettings) -> list[CVConfig]:
    """Every cross-validation configuration the chapters ask for that trains a network or a
    baseline, each once: the ablation's runs (which include every single-model chapter's) and
    chapter 6's repeats with new fold seeds. Not the reader runs (:func:`reader_runs`), which need
    the pretrained reader first and fit in seconds on a CPU.

    >>> [c.name for c in cv_configs(settings(profile="ci"))][:3]
    ['clinical-coxph', 'clinical-mlp', 'clinical-coxph-count']
    >>> len(cv_configs(settings(profile="paper"))) - len(ablation_specs(settings(profile="paper")))
    12
    """
    repeats = PROFILES[s.profile].repeats
    runs = ablation_specs(s) + [dict(run, repeat=r) for r in range(1, repeats) for run in repeat_models(s).values()]
    configs = {}
    for run in runs:
        config = cv_config(s, **run)
        configs.setdefault(json.dumps(config.run_defining(), sort_keys=True), config)
    return list(configs.values())


def reproducibility_box(s: BookSettings):
    """A chapter's closing box (:func:`psma_lib.report.reproducibility_box`)."""
    return report.reproducibility_box(s, cohort(s).checksum)
