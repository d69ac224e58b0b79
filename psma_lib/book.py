"""The reproducible book: profiles, cached pipeline steps the chapters call, and the runner.

The chapters in ``chapters/`` stay thin: they resolve their parameters with :func:`settings`,
ask for cached results with ``ensure_*`` (cohort → crops → cross-validation) and turn them into
tables with the analysis helpers below. Every step writes into the output folder under a name
keyed by a hash of its configuration and the cohort's data checksum, so re-running a chapter
reuses what an earlier chapter (or an earlier run) computed, and a changed parameter never
silently reuses a stale result.

>>> s = settings(profile="ci", output_dir="_build/results/ci")     # doctest: +SKIP
>>> manifest = ensure_cohort(s); crops = ensure_crops(s)             # doctest: +SKIP
>>> cv_dir = ensure_cv(s, "multimodal", "resnet18")                  # doctest: +SKIP

``psma-pfs book --profile quick`` executes every chapter with papermill and builds the HTML book
into ``_build/html`` (see :func:`run_book`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import html
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError

with warnings.catch_warnings():
    # tqdm.auto (used by the stages) warns once at import in a kernel without ipywidgets; its
    # text bars work and the chapters disable them anyway. Importing it here, first, keeps that
    # environment note out of the chapter pages (the HTML check treats stderr as a failure).
    warnings.filterwarnings("ignore", message="IProgress not found")
    import tqdm.auto  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parent.parent
CHAPTERS_DIR = REPO_ROOT / "chapters"
BUILD_DIR = REPO_ROOT / "_build"
CHAPTERS = (
    "01_data_preparation",
    "02_clinical_baseline",
    "03_resnet_cox_model",
    "04_ablation",
    "05_kaplan_meier",
    "06_discussion",
)
MODALITIES = ("clinical", "imaging", "multimodal")
ALL_BACKBONES = ("resnet18", "resnet34", "resnet50", "r3d_18")

# The abstract's five-fold C-index ranges and Kaplan–Meier medians (../shared/PAPER.md).
PAPER_C_INDEX_RANGE = {
    "multimodal": (0.75, 0.94),
    "imaging": (0.70, 0.89),
    "clinical": (0.53, 0.65),
}
PAPER_MEDIAN_PFS_MONTHS = {"high": 19.7, "low": 26.0}


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
    """

    name: str
    patients: int
    size_mm: float
    spacing_mm: float
    epochs: int
    backbones: tuple[str, ...]
    folds: int = 5
    n_bootstrap: int = 1000
    aggregation: str = "sum"
    clinical_epochs: int = 300
    clinical_lr: float = 1e-2
    description: str = ""


PROFILES: dict[str, Profile] = {
    "ci": Profile(
        name="ci", patients=30, size_mm=48.0, spacing_mm=3.0, epochs=2,
        backbones=("resnet18",), n_bootstrap=200,
        description="smallest: every chapter, table and figure in a few minutes on 2 CPU cores",
    ),
    "quick": Profile(
        name="quick", patients=99, size_mm=48.0, spacing_mm=2.0, epochs=20,
        backbones=("resnet18", "resnet34", "resnet50"),
        description="the default: the whole 99-patient cohort, 2D backbones, few epochs (CPU)",
    ),
    "paper": Profile(
        name="paper", patients=99, size_mm=64.0, spacing_mm=2.0, epochs=60,
        backbones=ALL_BACKBONES,
        description="paper-scale epochs and every backbone including 3D r3d_18 (one GPU)",
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
    show_progress: bool = True

    @property
    def main_backbone(self) -> str:
        """The configuration the single-model chapters show: ResNet-18 (the paper's best)."""
        return "resnet18" if "resnet18" in self.backbones else self.backbones[0]


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
    show_progress: bool = True,
) -> BookSettings:
    """Resolve a chapter's ``parameters`` cell into :class:`BookSettings`.

    ``profile`` None → ``$PSMA_BOOK_PROFILE`` or ``"quick"``; ``output_dir`` None →
    ``$PSMA_BOOK_OUTPUT`` or ``_build/results/<profile>``; ``manifest`` None → the default
    synthetic cohort generated into the output folder. ``epochs``/``backbones``/``patients``
    None → the profile's values.

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
    unknown = sorted(set(backbones) - set(ALL_BACKBONES))
    if unknown:
        raise InputError(f"unknown backbone(s) {unknown}; choose from {list(ALL_BACKBONES)}")
    manifest_path = resolve_path(manifest) if manifest else None
    if manifest_path is not None and not manifest_path.is_file():
        raise InputError("manifest not found", file=str(manifest_path))
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
        show_progress=show_progress,
    )


def cache_key(step: str, **config) -> str:
    """16-hex-digit key of a step's configuration (order of keywords does not matter).

    >>> cache_key("crops", size_mm=64, spacing_mm=2) == cache_key("crops", spacing_mm=2, size_mm=64)
    True
    >>> cache_key("crops", size_mm=64) == cache_key("crops", size_mm=48)
    False
    """
    blob = json.dumps({"step": step, **config}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- cached steps


def _run_stage(module: str, argv: list[str]) -> None:
    """Run one ``psma-pfs`` stage in-process through its own ``register_cli`` parser.

    Going through the stage's CLI keeps the book on the documented command-line contract;
    an :class:`InputError` propagates unchanged so the chapter shows the stage's own message.
    With ``--no-progress`` (chapters) the stage's stdout report is not echoed into the page;
    its warnings are printed once each as ``note: ...`` lines.
    """
    parser = argparse.ArgumentParser(prog="psma-pfs")
    sub = parser.add_subparsers(dest="command", required=True)
    importlib.import_module(f"psma_lib.{module}").register_cli(sub)
    args = parser.parse_args(argv)
    quiet = "--no-progress" in argv
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            code = int(args.func(args) or 0)
    # Warnings (e.g. lifelines on a near-constant column in one fold) stay visible on the page,
    # once each, as a plain note rather than a stderr block the HTML check counts as an error.
    for text in dict.fromkeys(f"{w.category.__name__}: {str(w.message).split('. ')[0]}"
                              for w in caught):
        print(f"note: psma-pfs {argv[0]} warned: {text}")
    if code != 0:
        raise RuntimeError(f"psma-pfs {' '.join(argv)} exited with code {code}")


def ensure_cohort(s: BookSettings) -> Path:
    """Path of the cohort manifest: ``s.manifest`` if given, else the generated synthetic one.

    The synthetic cohort goes to ``<output>/cohort-<key>/`` (key: patients, seed) and is
    generated only once.
    """
    if s.manifest is not None:
        return s.manifest
    root = s.output_dir / f"cohort-{cache_key('cohort', patients=s.patients, seed=s.seed)}"
    manifest = root / "manifest.yaml"
    if not manifest.is_file():
        _log(s, f"generating the synthetic cohort ({s.patients} patients) into {root}")
        _run_stage("synthetic", ["generate", "--out", str(root), "--patients", str(s.patients),
                                 "--seed", str(s.seed), "--signal", "both", *_no_progress(s)])
    return manifest


def data_checksum(s: BookSettings) -> str:
    """SHA-256 of the cohort's manifest content (which pins every file's SHA-256)."""
    from .manifest import data_checksum as _checksum

    return _checksum(ensure_cohort(s))


def ensure_crops(s: BookSettings) -> Path:
    """Folder of lesion crops for the cohort (``crops.npy`` + tables), cropped once per config."""
    manifest = ensure_cohort(s)
    key = cache_key("crops", size_mm=s.size_mm, spacing_mm=s.spacing_mm, data=data_checksum(s))
    out = s.output_dir / f"crops-{key}"
    if not (out / "crops.json").is_file():
        _log(s, f"cropping lesions ({s.size_mm:g} mm at {s.spacing_mm:g} mm) into {out}")
        _run_stage("crop", ["crop", str(manifest), "--out", str(out), "--size-mm",
                            f"{s.size_mm:g}", "--spacing-mm", f"{s.spacing_mm:g}", *_no_progress(s)])
    return out


def _cv_model(modality: str, backbone: str | None, s: BookSettings) -> str:
    """What a run trains: a backbone name, ``coxph`` (classical clinical Cox) or ``mlp``."""
    if modality == "clinical":
        return "coxph" if backbone == "coxph" else "mlp"
    if backbone == "coxph":
        raise InputError("backbone coxph is the clinical baseline: use modality 'clinical'")
    return backbone or s.main_backbone


def _cv_training_options(s: BookSettings, model: str) -> list[str]:
    """``psma-pfs cv`` options that depend on what is trained (see :class:`Profile`)."""
    prof = PROFILES[s.profile]
    if model == "mlp":
        epochs = max(s.epochs, prof.clinical_epochs)
        return ["--epochs", str(epochs), "--lr", str(prof.clinical_lr), "--patience", str(epochs)]
    return ["--epochs", str(s.epochs), "--aggregation", prof.aggregation]


def cv_key(s: BookSettings, modality: str, backbone: str | None = None) -> str:
    """Cache key of one cross-validation run (the clinical MLP ignores the image backbone)."""
    model = _cv_model(modality, backbone, s)
    return cache_key(
        "cv", modality=modality, model=model, options=_cv_training_options(s, model),
        folds=s.folds, seed=s.seed, size_mm=s.size_mm, spacing_mm=s.spacing_mm,
        data=data_checksum(s),
    )


def ensure_cv(s: BookSettings, modality: str, backbone: str | None = None) -> Path:
    """Folder of one cross-validated configuration (``oof_predictions.csv``, ``results.json``…).

    ``backbone``: an image backbone (default the settings' main one), or ``"coxph"`` with
    ``modality="clinical"`` for the classical lifelines Cox model on the same folds. Runs
    ``psma-pfs cv`` once; an interrupted run resumes from its finished folds.
    """
    if modality not in MODALITIES:
        raise InputError(f"unknown modality {modality!r}; choose one of {list(MODALITIES)}")
    model = _cv_model(modality, backbone, s)
    crops = ensure_crops(s)
    out = s.output_dir / "cv" / f"{modality}-{model}-{cv_key(s, modality, backbone)}"
    if not (out / "results.json").is_file():
        _log(s, f"cross-validating {modality} {model} ({s.folds} folds, {s.epochs} epochs) into {out}")
        _run_stage("cv", ["cv", "--crops", str(crops), "--modality", modality,
                          "--backbone", model if model in ("coxph", *ALL_BACKBONES) else s.main_backbone,
                          *_cv_training_options(s, model), "--folds", str(s.folds),
                          "--seed", str(s.seed), "--device", s.device, "--out", str(out),
                          *_no_progress(s)])
    return out


def _no_progress(s: BookSettings) -> list[str]:
    return [] if s.show_progress else ["--no-progress"]


def _log(s: BookSettings, message: str) -> None:
    if s.show_progress:
        print(f"[book] {message}", flush=True)


# --------------------------------------------------------------------------- analysis helpers


def cohort_info(s: BookSettings) -> dict:
    """The manifest's ``cohort`` block (name, synthetic flag, description, …)."""
    from .manifest import load_manifest

    return dict(load_manifest(ensure_cohort(s)).info)


def is_synthetic(s: BookSettings) -> bool:
    """True when the manifest says the cohort is synthetic (its ``cohort.synthetic`` flag)."""
    return bool(cohort_info(s).get("synthetic", False))


def _fmt_ci(c: float, low: float, high: float) -> str:
    return f"{c:.3f} ({low:.3f}–{high:.3f})"


def _fmt_months(x: float) -> str:
    return "not reached" if not np.isfinite(x) else f"{x:.1f}"


def _median_iqr(x: pd.Series, digits: int = 1) -> str:
    q1, med, q3 = np.percentile(x.dropna(), [25, 50, 75])
    return f"{med:.{digits}f} ({q1:.{digits}f}–{q3:.{digits}f})"


def lesion_site_table(lesions: pd.DataFrame) -> pd.DataFrame:
    """Lesions per site with SUVmax median (IQR) and range and volume median (IQR).

    ``lesions``: the crops' lesion table (``site``, ``suvmax``, ``volume_ml``, ``patient_id``).
    """
    df = lesions.assign(site=lesions["site"].fillna("unknown").replace("", "unknown"))
    rows = []
    for site, g in df.groupby("site", sort=False):
        rows.append({
            "Site": site.replace("_", " "),
            "Lesions, n (%)": f"{len(g)} ({100 * len(g) / len(df):.0f} %)",
            "Patients, n": g["patient_id"].nunique(),
            "SUVmax, median (IQR)": _median_iqr(g["suvmax"]),
            "SUVmax, range": f"{g['suvmax'].min():.1f}–{g['suvmax'].max():.1f}",
            "Volume, mL, median (IQR)": _median_iqr(g["volume_ml"], 2),
        })
    return pd.DataFrame(rows).sort_values("Patients, n", ascending=False, ignore_index=True)


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


def clinical_hazard_ratios(s: BookSettings) -> pd.DataFrame:
    """Descriptive whole-cohort clinical Cox fit for the forest plot (one row per term).

    Covariates in :data:`CLINICAL_COX_TERMS` units; columns ``label, hr, hr_lo, hr_hi, p, …``
    (:func:`psma_lib.evaluation.cox_hazard_ratios`). Its missing values are imputed with the
    cohort median: fine for a description, never for prediction (the cross-validated baseline
    imputes inside each training fold). lifelines' fit warnings (e.g. near-separation in a small
    cohort) are kept in ``hr.attrs["warnings"]`` so the page can show them as a note.
    """
    from .evaluation import cox_hazard_ratios

    patients = read_ids_csv(ensure_crops(s) / "patients.csv")
    design = clinical_design(patients)
    terms = [c for c in design.columns if design[c].nunique() > 1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hr = cox_hazard_ratios(design[terms].assign(pfs_months=patients["pfs_months"],
                                                    event=patients["event"]), terms)
    hr.insert(0, "label", [CLINICAL_COX_TERMS[t] for t in hr.index])
    hr.attrs["warnings"] = list(dict.fromkeys(str(w.message).split(". ")[0] for w in caught))
    return hr


def warnings_note(messages: Sequence[str], what: str):
    """A note admonition listing warnings a fit raised (nothing when there were none)."""
    from IPython.display import HTML

    if not messages:
        return HTML("")
    items = "".join(f"<li>{html.escape(m)}</li>" for m in messages)
    return _admonition("note", f"Warnings from {what}", f"<ul>{items}</ul>")


def read_ids_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read a pipeline CSV with ``patient_id``/``lesion_id`` as strings (the contract)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("expected pipeline output is missing", file=str(path))
    return pd.read_csv(path, dtype={"patient_id": str, "lesion_id": str})


def clinical_runs(s: BookSettings) -> list[dict]:
    """The two clinical-only runs: the classical lifelines Cox model and the ResNet-Cox
    pipeline's clinical branch (an MLP with the Cox loss), on the same folds."""
    return [{"modality": "clinical", "backbone": "—", "model": "Cox (lifelines)",
             "dir": ensure_cv(s, "clinical", "coxph")},
            {"modality": "clinical", "backbone": "—", "model": "MLP-Cox",
             "dir": ensure_cv(s, "clinical")}]


def ablation_runs(s: BookSettings) -> list[dict]:
    """Every configuration of the ablation: ``{"modality", "backbone", "model", "dir"}``.

    The clinical modality appears once per book (:func:`clinical_runs`), not per backbone.
    """
    runs = clinical_runs(s)
    for modality in ("imaging", "multimodal"):
        for backbone in s.backbones:
            runs.append({"modality": modality, "backbone": backbone, "model": "ResNet-Cox",
                         "dir": ensure_cv(s, modality, backbone)})
    return runs


def run_label(run: dict) -> str:
    """Short name of an ablation run, e.g. ``multimodal resnet18`` or ``clinical Cox (lifelines)``."""
    if run["backbone"] == "—":
        return f"clinical {run['model']}"
    return f"{run['modality']} {run['backbone']}"


def ablation_table(s: BookSettings, runs: list[dict]) -> pd.DataFrame:
    """One row per configuration: our fold range beside the paper's, mean ± sd, pooled C (CI)."""
    from .evaluation import summarize_cv

    rows = []
    for run in runs:
        sm = summarize_cv(read_ids_csv(Path(run["dir"]) / "oof_predictions.csv"),
                          n_boot=s.n_bootstrap, seed=s.seed)
        lo, hi = PAPER_C_INDEX_RANGE[run["modality"]]
        rows.append({
            "Modality": run["modality"], "Backbone": run["backbone"], "Model": run["model"],
            "Fold range (min–max)": f"{sm['fold_min']:.2f}–{sm['fold_max']:.2f}",
            "Paper's fold range": f"{lo:.2f}–{hi:.2f}",
            "Mean ± sd over folds": f"{sm['fold_mean']:.3f} ± {sm['fold_sd']:.3f}",
            "Pooled OOF C-index (95 % CI)": _fmt_ci(sm["pooled"], sm["pooled_lo"], sm["pooled_hi"]),
            "Patients / events": f"{sm['n_patients']} / {sm['n_events']}",
        })
    return pd.DataFrame(rows)


def fold_c_index_long(runs: list[dict]) -> pd.DataFrame:
    """Per-fold C-index of every run, long format: ``configuration, modality, fold, c_index``."""
    from .evaluation import fold_cindices

    parts = []
    for run in runs:
        per_fold = fold_cindices(read_ids_csv(Path(run["dir"]) / "oof_predictions.csv"))
        parts.append(pd.DataFrame({"configuration": run_label(run), "modality": run["modality"],
                                   "fold": per_fold.index, "c_index": per_fold.to_numpy()}))
    return pd.concat(parts, ignore_index=True)


def oracle_c_index(s: BookSettings, folds: pd.DataFrame | None = None) -> dict | None:
    """C-index of the synthetic truth's linear predictor (None for a real cohort).

    The ceiling a model can reach on this cohort: pooled over patients with its bootstrap CI
    (``pooled, pooled_lo, pooled_hi``) and, when ``folds`` (patient_id, fold) is given, its
    per-fold range (``fold_min, fold_max, fold_mean, fold_sd``) on the same folds as the models.
    """
    if not is_synthetic(s):
        return None
    from .evaluation import summarize_cv
    from .synthetic import load_truth

    truth = load_truth(ensure_cohort(s).parent)
    truth = truth.assign(patient_id=truth["patient_id"].astype(str))
    patients = read_ids_csv(ensure_crops(s) / "patients.csv")
    df = patients.merge(truth[["patient_id", "linear_predictor"]], on="patient_id")
    if folds is None:
        folds = pd.DataFrame({"patient_id": df["patient_id"], "fold": 0})
    df = df.merge(folds, on="patient_id").rename(columns={"linear_predictor": "risk"})
    sm = summarize_cv(df[["patient_id", "fold", "risk", "pfs_months", "event"]],
                      n_boot=s.n_bootstrap, seed=s.seed)
    sm.pop("fold_c_index")
    return sm


def oracle_table(oracle: dict) -> pd.DataFrame:
    """One-row display of :func:`oracle_c_index`: fold range, mean ± sd, pooled C (95 % CI)."""
    return pd.DataFrame([{
        "Fold range (min–max)": f"{oracle['fold_min']:.2f}–{oracle['fold_max']:.2f}",
        "Mean ± sd over folds": f"{oracle['fold_mean']:.3f} ± {oracle['fold_sd']:.3f}",
        "Pooled C-index (95 % CI)": _fmt_ci(oracle["pooled"], oracle["pooled_lo"], oracle["pooled_hi"]),
    }])


def risk_groups(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Out-of-fold patients split high/low at the median of *their training folds'* risks.

    For each fold k the cutoff is the median risk that fold k's model gave its own training
    patients (``train_predictions.csv``): no test-fold risk or outcome enters the cutoff
    (:func:`psma_lib.evaluation.assign_risk_groups`). Adds ``cutoff`` and ``group`` (high/low).
    """
    from .evaluation import assign_risk_groups

    run_dir = Path(run_dir)
    return assign_risk_groups(read_ids_csv(run_dir / "oof_predictions.csv"),
                              read_ids_csv(run_dir / "train_predictions.csv"))


def km_table(groups: pd.DataFrame) -> tuple[pd.DataFrame, float]:
    """Per risk group: n, events, median PSA-PFS (95 % CI) beside the paper's; and log-rank p."""
    from .evaluation import km_summary, logrank

    km = km_summary(groups["pfs_months"], groups["event"], groups["group"])
    _, p = logrank(groups["pfs_months"], groups["event"], groups["group"])
    table = pd.DataFrame({
        "Risk group": [f"{g} risk" for g in km.index],
        "Patients, n": km["n"].to_numpy(), "Events, n": km["events"].to_numpy(),
        "Median PSA-PFS, months (95 % CI)": [
            f"{_fmt_months(m)} ({_fmt_months(lo)}–{_fmt_months(hi)})"
            for m, lo, hi in zip(km["median"], km["median_lo"], km["median_hi"], strict=True)],
        "Paper, months": [f"{PAPER_MEDIAN_PFS_MONTHS[g]:.1f}" for g in km.index],
    })
    return table, p


def network_input_shape(crops_meta: dict, backbone: str) -> tuple[int, ...]:
    """One lesion's network input from ``crops.json``'s shape ``[n, 2, D, H, W]``:
    ``(2, D, H, W)`` for the 3D r3d_18, the axial plane ``(2, H, W)`` for 2D backbones.

    >>> network_input_shape({"shape": [396, 2, 32, 32, 32]}, "resnet18")
    (2, 32, 32)
    """
    _, channels, depth, height, width = crops_meta["shape"]
    return (channels, depth, height, width) if backbone == "r3d_18" else (channels, height, width)


def architecture_summary(modality: str, backbone: str, image_shape: Sequence[int]) -> pd.DataFrame:
    """Compact layer table of :class:`psma_lib.models.SurvivalModel`: block, output shape, params.

    ``image_shape``: one lesion's network input, e.g. ``(2, 32, 32)`` (2D) or ``(2, 16, 32, 32)``.
    Lists the backbone's top-level blocks then the risk head; shapes are for a batch of one.
    """
    import torch

    from .models import CLINICAL_COLUMNS, SurvivalModel

    model = SurvivalModel(modality, backbone, n_clinical=len(CLINICAL_COLUMNS)).eval()
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


def hr_table(hr: pd.DataFrame) -> pd.DataFrame:
    """Hazard ratios for display: term, HR (95 % CI), p, imputed values."""
    return pd.DataFrame({
        "Covariate": hr["label"].to_numpy(),
        "Hazard ratio (95 % CI)": [f"{h:.2f} ({lo:.2f}–{hi:.2f})" for h, lo, hi
                                   in zip(hr["hr"], hr["hr_lo"], hr["hr_hi"], strict=True)],
        "p": [f"{p:.3g}" for p in hr["p"]],
        "Imputed values, n": hr["n_imputed"].to_numpy(),
    })


def fold_table(run_dir: str | os.PathLike) -> pd.DataFrame:
    """Per-fold results of one run for display (patients, events, C-index, selected epoch)."""
    from .evaluation import fold_cindices

    run_dir = Path(run_dir)
    oof = read_ids_csv(run_dir / "oof_predictions.csv")
    per_fold = fold_cindices(oof)
    out = pd.DataFrame({
        "Fold": per_fold.index,
        "Test patients": oof.groupby("fold").size().reindex(per_fold.index).to_numpy(),
        "Test events": oof.groupby("fold")["event"].sum().reindex(per_fold.index).to_numpy(),
        "C-index (patient level)": [f"{c:.3f}" for c in per_fold],
    })
    results = run_dir / "fold_results.csv"
    if results.is_file():
        fr = read_ids_csv(results).set_index("fold").reindex(per_fold.index)
        if "c_index_lesion" in fr:
            out["C-index (lesion level, flatters)"] = [f"{c:.3f}" for c in fr["c_index_lesion"]]
        if "best_epoch" in fr:
            out["Selected epoch"] = fr["best_epoch"].to_numpy()
    return out


def cutoff_table(groups: pd.DataFrame) -> pd.DataFrame:
    """Per fold: the training-fold median cutoff and how many test patients fall on each side."""
    rows = []
    for fold, g in groups.groupby("fold"):
        rows.append({"Fold": fold, "Cutoff (training-fold median risk)": f"{g['cutoff'].iloc[0]:.3f}",
                     "Test patients high / low": f"{(g['group'] == 'high').sum()} / "
                                                 f"{(g['group'] == 'low').sum()}"})
    return pd.DataFrame(rows)


def montage_selection(lesions: pd.DataFrame, per_site: int = 3) -> list[int]:
    """Row indices of lesions for the QC montage: per site, the lowest, median and highest SUVmax.

    Deterministic, and it shows the range a reader must check (faint and hot lesions alike).
    """
    picks: list[int] = []
    sites = lesions["site"].fillna("unknown").replace("", "unknown")
    for site in ("bone", "lymph_node", "prostate", "visceral", "unknown"):
        rows = lesions.index[sites == site]
        if len(rows) == 0:
            continue
        order = lesions.loc[rows, "suvmax"].sort_values(kind="stable").index
        take = np.unique(np.linspace(0, len(order) - 1, min(per_site, len(order))).round().astype(int))
        picks += [int(lesions.index.get_loc(order[i])) for i in take]
    return picks


def crop_info_table(meta: dict, lesions: pd.DataFrame) -> pd.DataFrame:
    """The crop set's geometry in words: array shape, size, spacing, orientation, edge crops."""
    n = len(lesions)
    return pd.DataFrame([
        ("array", f"crops.npy, float32 [{' × '.join(map(str, meta['shape']))}] "
                  "(lesion, channel PET/CT, D, H, W)"),
        ("crop size", f"{meta['size_mm']:g} mm cube at {meta['spacing_mm']:g} mm spacing"),
        ("orientation", str(meta.get("orientation", ""))),
        ("centre", str(meta.get("center_mode", ""))),
        ("lesions padded at the field-of-view edge",
         f"{int(lesions['edge'].sum())} of {n} ({100 * lesions['edge'].mean():.0f} %)"),
    ], columns=["Property", "Value"])


def cv_config_table(run_dir: str | os.PathLike) -> pd.DataFrame:
    """The configuration of one run (``config.json``) as a short two-column table."""
    config = json.loads((Path(run_dir) / "config.json").read_text())
    config = config.get("config", config)
    keep = ("modality", "backbone", "view", "aggregation", "epochs", "batch_size", "lr",
            "weight_decay", "val_fraction", "patience", "augment", "folds", "seed", "device")
    return pd.DataFrame([(k, str(config[k])) for k in keep if k in config],
                        columns=["Setting", "Value"])


def headline_table(s: BookSettings) -> pd.DataFrame:
    """The book's key numbers on one table: pooled C-indices of the main configurations, the
    oracle, and the Kaplan–Meier medians — each next to what the paper reports."""
    runs = [{"modality": "clinical", "backbone": "—", "model": "Cox (lifelines)",
             "dir": ensure_cv(s, "clinical", "coxph")}]
    runs += [{"modality": m, "backbone": s.main_backbone, "model": "ResNet-Cox",
              "dir": ensure_cv(s, m, s.main_backbone)} for m in ("imaging", "multimodal")]
    table = ablation_table(s, runs)
    rows = [{"Quantity": f"C-index, {run_label(r)}", "This book": "pooled " + row["Pooled OOF C-index (95 % CI)"]
             + f"; folds {row['Fold range (min–max)']}", "Paper": "folds " + row["Paper's fold range"]}
            for r, (_, row) in zip(runs, table.iterrows(), strict=True)]
    oracle = oracle_c_index(s)
    if oracle is not None:
        rows.append({"Quantity": "C-index, oracle (true synthetic risk)",
                     "This book": _fmt_ci(oracle["pooled"], oracle["pooled_lo"], oracle["pooled_hi"]),
                     "Paper": "—"})
    km, p = km_table(risk_groups(ensure_cv(s, "multimodal", s.main_backbone)))
    for _, row in km.iterrows():
        rows.append({"Quantity": f"Median PSA-PFS, {row['Risk group']} (months)",
                     "This book": row["Median PSA-PFS, months (95 % CI)"],
                     "Paper": row["Paper, months"]})
    rows.append({"Quantity": "Log-rank p (high vs low risk)", "This book": f"{p:.2g}",
                 "Paper": "< 0.001"})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- page furniture


def _admonition(kind: str, title: str, body_html: str):
    from IPython.display import HTML

    return HTML(f'<div class="admonition {kind}"><p class="admonition-title">{html.escape(title)}'
                f"</p>{body_html}</div>")


def data_banner(s: BookSettings):
    """An admonition saying plainly whether this page's results come from SYNTHETIC data."""
    info = cohort_info(s)
    name = html.escape(str(info.get("name", "cohort")))
    if info.get("synthetic", False):
        return _admonition(
            "warning", "Results on SYNTHETIC data",
            f"<p>Every number and figure on this page comes from the <b>synthetic</b> cohort "
            f"<code>{name}</code> generated by <code>psma_lib.synthetic</code> (profile "
            f"<code>{s.profile}</code>), not from patients. They test the pipeline against a "
            f"known ground truth; they are not clinical evidence.</p>")
    return _admonition("note", "Real cohort",
                       f"<p>Results on the cohort <code>{name}</code> "
                       f"(manifest <code>{html.escape(str(ensure_cohort(s)))}</code>).</p>")


def reproducibility_box(s: BookSettings):
    """The closing box of every chapter: versions, seed, profile, data checksum, output folder."""
    from .repro import versions

    v = versions()
    rows = {
        "profile": f"{s.profile} ({PROFILES[s.profile].description})",
        "seed": s.seed, "device": s.device, "epochs": s.epochs,
        "backbones": ", ".join(s.backbones),
        "data checksum (SHA-256)": data_checksum(s),
        "output folder": s.output_dir,
        "python / platform": f"{v['python']} / {v['platform']}",
        "versions": ", ".join(f"{k} {v[k]}" for k in ("psma-lib", "torch", "torchvision", "numpy",
                                                      "pandas", "lifelines", "scikit-learn")),
    }
    body = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
                   f"<td><code>{html.escape(str(val))}</code></td></tr>" for k, val in rows.items())
    return _admonition("seealso", "Reproducibility", f"<table>{body}</table>")


def settings_table(s: BookSettings) -> pd.DataFrame:
    """The resolved parameters as a two-column table (shown near the top of each chapter)."""
    return pd.DataFrame([
        ("profile", s.profile), ("output folder", str(s.output_dir)),
        ("manifest", str(s.manifest) if s.manifest else "default synthetic cohort"),
        ("device", s.device), ("seed", s.seed), ("epochs", s.epochs),
        ("backbones", ", ".join(s.backbones)), ("folds", s.folds),
        ("crop", f"{s.size_mm:g} mm at {s.spacing_mm:g} mm"),
    ], columns=["Parameter", "Value"])


# --------------------------------------------------------------------------- runner

BOOK_FILES = ("_config.yml", "_toc.yml", "intro.md", "docs/pipeline.svg")
INJECTED_TAG = "injected-parameters"


def hide_parameter_cells(nb) -> int:
    """Tag papermill's injected cell ``remove-cell`` and fold the defaults cell (``hide-cell``).

    The injected cell only repeats the run's parameters, which each chapter shows as a table;
    returns the number of cells changed. Works on an ``nbformat`` notebook in place.
    """
    changed = 0
    for cell in nb.cells:
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        new = ("remove-cell" if INJECTED_TAG in tags else
               "hide-cell" if "parameters" in tags else None)
        if new and new not in tags:
            tags.append(new)
            changed += 1
    return changed


def chapter_paths(chapters: Sequence[str] | None = None) -> list[Path]:
    """Chapter notebooks to run, in book order; ``chapters`` selects by number or name prefix.

    >>> [p.name for p in chapter_paths(["04"])]
    ['04_ablation.ipynb']
    """
    names = list(CHAPTERS)
    if chapters:
        wanted = [str(c) for c in chapters]
        names = [n for n in CHAPTERS if any(n.startswith(w) for w in wanted)]
        unmatched = [w for w in wanted if not any(n.startswith(w) for n in CHAPTERS)]
        if unmatched:
            raise InputError(f"unknown chapter(s) {unmatched}; chapters are {list(CHAPTERS)}")
    return [CHAPTERS_DIR / f"{n}.ipynb" for n in names]


def execute_chapter(path: Path, out: Path, parameters: dict, prepare_only: bool = False) -> None:
    """Execute one chapter with papermill (cwd ``chapters/``, kernel ``python3``) into ``out``,
    then hide its parameter cells (:func:`hide_parameter_cells`).

    ``prepare_only`` injects the parameters without running anything (papermill's own option).
    A failing cell raises :class:`InputError` naming the chapter and the executed notebook.
    """
    import nbformat
    import papermill

    try:
        papermill.execute_notebook(str(path), str(out), parameters=parameters,
                                   cwd=str(CHAPTERS_DIR), kernel_name="python3",
                                   progress_bar=False, prepare_only=prepare_only)
    except papermill.PapermillExecutionError as exc:
        raise InputError(f"chapter {path.stem} failed: {exc.ename}: {exc.evalue} "
                         f"(the executed notebook shows the traceback: {out})") from exc
    nb = nbformat.read(out, as_version=4)
    hide_parameter_cells(nb)
    nbformat.write(nb, out)


def run_book(profile: str = "quick", output_dir: str | os.PathLike | None = None,
             manifest: str | os.PathLike | None = None, chapters: Sequence[str] | None = None,
             build_html: bool = True, device: str = "auto", seed: int = 0) -> Path:
    """Execute the chapters with papermill, then build the HTML book into ``_build/html``.

    Executed notebooks go to ``_build/book/<profile>/chapters/`` beside copies of the book's
    ``_config.yml``, ``_toc.yml`` and ``intro.md``; jupyter-book (no execution, warnings are
    errors) builds that tree and the result is copied to ``_build/html``. Nothing is written
    outside ``_build/`` (and the output folder). Returns the build tree.
    """
    s = settings(profile=profile, output_dir=output_dir, manifest=manifest, device=device, seed=seed)
    params = {"profile": s.profile, "output_dir": str(s.output_dir),
              "manifest": str(s.manifest) if s.manifest else None, "device": s.device,
              "seed": s.seed}
    tree = BUILD_DIR / "book" / s.profile
    (tree / "chapters").mkdir(parents=True, exist_ok=True)
    paths = chapter_paths(chapters)
    start = time.monotonic()
    for i, path in enumerate(paths, 1):
        out = tree / "chapters" / path.name
        t0 = time.monotonic()
        print(f"[book {i}/{len(paths)}] {path.stem}: running (profile {s.profile}) ...", flush=True)
        execute_chapter(path, out, params)
        print(f"[book {i}/{len(paths)}] {path.stem}: done in {time.monotonic() - t0:.0f} s "
              f"(total {time.monotonic() - start:.0f} s)", flush=True)
    if build_html:
        build_html_book(tree)
        print(f"[book] HTML in {BUILD_DIR / 'html'} (total {time.monotonic() - start:.0f} s)")
    return tree


def build_html_book(tree: Path) -> Path:
    """Copy the book's sources into ``tree`` and build it with jupyter-book into ``_build/html``.

    Every chapter in ``_toc.yml`` must already be executed into ``tree/chapters``.
    """
    for name in BOOK_FILES:
        target = tree / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, target)
    missing = [p.name for p in chapter_paths() if not (tree / "chapters" / p.name).is_file()]
    if missing:
        raise InputError(f"cannot build the HTML book: chapters not executed yet: {missing} "
                         f"(run them, e.g. psma-pfs book --chapters 01 ...)", file=str(tree))
    site = tree / "site"
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb) if jb.exists() else "jupyter-book", "build", str(tree), "--path-output",
           str(site), "--builder", "html", "-W", "-n", "--keep-going"]
    print("[book] building HTML:", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-6000:] + done.stderr[-6000:])
        raise InputError(f"jupyter-book build failed (exit {done.returncode}); see output above",
                         file=str(tree))
    html_dir = BUILD_DIR / "html"
    if html_dir.exists():
        shutil.rmtree(html_dir)
    shutil.copytree(site / "_build" / "html", html_dir)
    return html_dir


def register_cli(subparsers) -> None:
    """``psma-pfs book --profile {ci,quick,paper} [--output DIR] [--manifest PATH] ...``."""
    p = subparsers.add_parser(
        "book", help="run every chapter with papermill and build the HTML book (_build/html)",
        description="Execute the chapters in order (papermill) and build the HTML book.")
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                   help="ci (minutes), quick (default, <= 15 min on 2 cores), paper (one GPU)")
    p.add_argument("--output", default=None,
                   help="results folder (default _build/results/<profile>)")
    p.add_argument("--manifest", default=None,
                   help="a real cohort's manifest.yaml (default: the synthetic cohort)")
    p.add_argument("--chapters", nargs="+", default=None, metavar="NN",
                   help="run only these chapters (e.g. 01 04); implies --no-html unless all run")
    p.add_argument("--no-html", action="store_true", help="execute the chapters only")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cli_book)


def _cli_book(args) -> int:
    # Paths on the command line are relative to the caller's cwd, not the repository root.
    output = os.path.abspath(args.output) if args.output else None
    manifest = os.path.abspath(args.manifest) if args.manifest else None
    partial = args.chapters is not None and len(chapter_paths(args.chapters)) < len(CHAPTERS)
    run_book(args.profile, output, manifest, args.chapters,
             build_html=not (args.no_html or partial), device=args.device, seed=args.seed)
    return 0
