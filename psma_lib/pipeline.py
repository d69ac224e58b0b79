"""The pipeline's stages as cached, typed calls: cohort -> crops -> cross-validation.

Each call writes into a folder under ``root`` whose name holds a key of everything that changes
its output (the stage's configuration and the checksum of the data it reads) and returns the
stage's result object. Called again with the same inputs it reads that folder back instead of
recomputing; a changed input gets a new folder, so a stale result is never reused. These are the
library functions behind ``psma-pfs generate``, ``crop``, ``pretrain`` and ``cv``, called directly.

>>> import tempfile; from psma_lib.cv import CVConfig; from psma_lib.testing import write_tiny_crops
>>> root = Path(tempfile.mkdtemp())
>>> crops = load_crops(write_tiny_crops(root / "crops", n_patients=12, size=8))
>>> config = CVConfig(modality="clinical", model="coxph", folds=2, n_bootstrap=50, progress=False)
>>> run = run_cv(crops, root, config)            # computed
>>> run_cv(crops, root, config).summary == run.summary   # read back from results.json
True
>>> run.out_dir.name.startswith("clinical-coxph-")
True
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .crop import META_FILE, CropSet, load_crops
from .manifest import data_checksum, manifest_file

if TYPE_CHECKING:  # cv imports torch: only the call that cross-validates pays for it
    from .cv import CVConfig, CVResult
    from .pretrain import PretrainConfig


def cache_key(step: str, **config) -> str:
    """16-hex-digit key of a step's configuration (order of keywords does not matter).

    >>> cache_key("crops", size_mm=64, spacing_mm=2) == cache_key("crops", spacing_mm=2, size_mm=64)
    True
    >>> cache_key("crops", size_mm=64) == cache_key("crops", size_mm=48)
    False
    """
    blob = json.dumps({"step": step, **config}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class CohortFiles:
    """A cohort on disk: its ``manifest.yaml`` and the data checksum every later key includes."""

    manifest: Path
    checksum: str

    @property
    def root(self) -> Path:
        """The cohort folder (a synthetic cohort keeps its ground truth in ``root/truth``)."""
        return self.manifest.parent


def cohort_files(manifest: str | os.PathLike) -> CohortFiles:
    """An existing cohort (e.g. a real one) by its manifest or folder."""
    path = manifest_file(manifest)
    return CohortFiles(path, data_checksum(path))


def generate_cohort(root: str | os.PathLike, *, patients: int, seed: int, signal: str = "both",
                    progress: bool = False) -> CohortFiles:
    """The default synthetic cohort (:func:`psma_lib.synthetic.generate_cohort`), generated once
    into ``root/cohort-<key>`` (key: patients, seed, signal)."""
    from . import synthetic

    out = Path(root) / f"cohort-{cache_key('cohort', patients=patients, seed=seed, signal=signal)}"
    manifest = out / "manifest.yaml"
    if not manifest.is_file():
        _log(progress, f"generating the synthetic cohort ({patients} patients) into {out}")
        with _stage_notes("generate"):
            synthetic.generate_cohort(out, n_patients=patients, seed=seed, signal=signal,
                                      progress=progress)
    return cohort_files(manifest)


def crop_cohort(cohort: CohortFiles, root: str | os.PathLike, *, size_mm: float, spacing_mm: float,
                center: str = "centroid", progress: bool = False) -> CropSet:
    """The cohort's lesion crops (:func:`psma_lib.crop.crop_cohort`), cropped once into
    ``root/crops-<key>`` (key: size, spacing, centre mode, data checksum)."""
    from . import crop

    key = cache_key("crops", size_mm=float(size_mm), spacing_mm=float(spacing_mm), center=center,
                    data=cohort.checksum)
    out = Path(root) / f"crops-{key}"
    if not (out / META_FILE).is_file():
        _log(progress, f"cropping lesions ({size_mm:g} mm at {spacing_mm:g} mm) into {out}")
        with _stage_notes("crop"):
            crop.crop_cohort(cohort.manifest, out, size_mm=size_mm, spacing_mm=spacing_mm,
                             center=center, progress=progress)
    return load_crops(out)


def pretrained_encoder(crops: CropSet, root: str | os.PathLike, config: PretrainConfig) -> Path:
    """An encoder pretrained on ``crops``' lesions (:func:`psma_lib.pretrain.pretrain_encoder`),
    trained once into ``root/pretrained/encoder-<key>.safetensors`` (key: every weight-defining
    field of ``config`` and the crops' identity); the path to give ``CVConfig(weights=...)``."""
    from . import pretrain

    identity = {k: crops.meta.get(k) for k in ("data_checksum", "size_mm", "spacing_mm", "center_mode")}
    out = Path(root) / "pretrained" / f"encoder-{cache_key('pretrain', config=config.defining(), crops=identity)}.safetensors"
    if not out.is_file():
        _log(config.progress, f"pretraining the {config.backbone} encoder on {crops.meta.get('n_lesions')} lesions "
                              f"into {out}")
        with _stage_notes("pretrain"):
            pretrain.pretrain_encoder(crops.root, out, config)
    return out


def cv_folder(crops: CropSet, root: str | os.PathLike, config: CVConfig) -> Path:
    """The folder :func:`run_cv` uses for ``config``: ``root/cv/<name>-<key>`` (key: every
    result-defining field of ``config`` and the crops' identity: data checksum, size, spacing,
    centre mode)."""
    config.validate()
    identity = {k: crops.meta.get(k) for k in ("data_checksum", "size_mm", "spacing_mm", "center_mode")}
    key = cache_key("cv", config=config.run_defining(), crops=identity)
    return Path(root) / "cv" / f"{config.name}-{key}"


def run_cv(crops: CropSet, root: str | os.PathLike, config: CVConfig) -> CVResult:
    """One cross-validated configuration (:func:`psma_lib.cv.run_cv`), run once into
    :func:`cv_folder`. An interrupted run resumes; a folder whose folds were trained separately
    (``psma-pfs grid``) is read back once collected."""
    from . import cv

    out = cv_folder(crops, root, config)
    if (out / "results.json").is_file():
        return cv.load_result(out)
    _log(config.progress, f"cross-validating {config.name} ({config.folds} folds, "
                          f"{config.epochs} epochs) into {out}")
    with _stage_notes("cv"):
        return cv.run_cv(crops.root, out, config)


@contextlib.contextmanager
def _stage_notes(stage: str):
    """Print a stage's warnings once each as ``note: ...`` lines on stdout.

    A chapter shows them as plain text; on stderr the HTML check would count them as errors
    (e.g. lifelines on a near-constant column in one fold).
    """
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            yield
    finally:  # a failing stage's warnings may explain the failure
        for text in dict.fromkeys(f"{w.category.__name__}: {str(w.message).split('. ')[0]}" for w in caught):
            print(f"note: psma-pfs {stage} warned: {text}")


def _log(progress: bool, message: str) -> None:
    if progress:
        print(f"[pipeline] {message}", flush=True)
