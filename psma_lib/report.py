"""Everything the book shows as text: tables, page furniture and one formatting vocabulary.

Nothing here computes a statistic: the tables format what the analysis produced (the stored
summaries of the cross-validated runs, :mod:`psma_lib.evaluation`'s Kaplan-Meier and Cox results,
:mod:`psma_lib.analysis`), next to what the paper reports where it reports something.

* Formatting: :func:`fmt_ci`, :func:`fmt_range`, :func:`fmt_mean_sd`, :func:`fmt_months`,
  :func:`fmt_percent`, :func:`median_iqr` -- every table writes numbers through these.
* Tables: :func:`table_one`, :func:`lesion_site_table`, :func:`crop_info_table`,
  :func:`cv_config_table`, :func:`ablation_table`, :func:`fold_table`, :func:`oracle_table`,
  :func:`hr_table`, :func:`cutoff_table`, :func:`km_table`, :func:`headline_table`, shown with
  :func:`html_table`.
* Page furniture: :func:`data_banner`, :func:`settings_table`, :func:`warnings_note`,
  :func:`reproducibility_box`.

>>> fmt_ci(0.7123, 0.65, 0.78), fmt_months(float("inf")), fmt_range(0.61, 0.744)
('0.712 (0.650–0.780)', 'not reached', '0.61–0.74')
>>> fmt_percent(7, 40), fmt_percent(0, 0)     # 17.5 % rounds up, as clinical tables do
('18 %', '—')
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import pandas as pd
from lifelines import KaplanMeierFitter
from lifelines.utils import median_survival_times

from .evaluation import _numeric_column, _require_columns, _survival_arrays
from .vocabulary import site_labels

# The abstract's five-fold C-index ranges and Kaplan–Meier medians (../shared/PAPER.md).
PAPER_C_INDEX_RANGE = {
    "multimodal": (0.75, 0.94),
    "imaging": (0.70, 0.89),
    "clinical": (0.53, 0.65),
}
PAPER_MEDIAN_PFS_MONTHS = {"high": 19.7, "low": 26.0}

#: How a table names each kind of model (psma_lib.vocabulary.MODEL_KINDS).
MODEL_NAMES = {"coxph": "Cox (lifelines)", "mlp": "MLP-Cox", "resnet": "ResNet-Cox", "reader": "pretrained reader + Cox"}
#: An empty cell: nothing applies (e.g. the backbone of a clinical model).
EMPTY = "—"


# --------------------------------------------------------------------------- formatting


def fmt_ci(value: float, low: float, high: float, digits: int = 3) -> str:
    """``value (low–high)``."""
    return f"{value:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


def fmt_floats(df: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """``df`` with every float column written with ``digits`` decimals (NaN as an empty cell).

    >>> fmt_floats(pd.DataFrame({"c": [0.71234, float("nan")], "n": [3, 4]})).values.tolist()
    [['0.712', 3], ['', 4]]
    """
    out = df.copy()
    for column in out.columns[out.dtypes.map(pd.api.types.is_float_dtype).to_numpy()]:
        out[column] = [f"{v:.{digits}f}" if pd.notna(v) else "" for v in out[column]]
    return out


def fmt_range(low: float, high: float, digits: int = 2) -> str:
    """``low–high``."""
    return f"{low:.{digits}f}–{high:.{digits}f}"


def fmt_mean_sd(mean: float, sd: float, digits: int = 3) -> str:
    """``mean ± sd``."""
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def fmt_months(months: float, digits: int = 1) -> str:
    """A Kaplan-Meier time in months; ``inf`` (the curve never reaches the level) is "not reached"."""
    return "not reached" if not np.isfinite(months) else f"{months:.{digits}f}"


def fmt_percent(count: int, total: int, digits: int = 0) -> str:
    """``count`` as a percentage of ``total``, rounded half up (Python's format rounds half to even)."""
    if total == 0:
        return EMPTY
    scale = 10**digits
    value = np.floor(100.0 * count * scale / total + 0.5 + 1e-9) / scale
    return f"{value:.{digits}f} %"


def median_iqr(values: pd.Series, digits: int = 1) -> str:
    """``median (Q1–Q3)`` of the values present.

    >>> median_iqr(pd.Series([1.0, 2.0, 3.0, None, 4.0]))
    '2.5 (1.8–3.2)'
    """
    q1, med, q3 = np.quantile(values.dropna(), [0.25, 0.5, 0.75])
    return f"{med:.{digits}f} ({q1:.{digits}f}–{q3:.{digits}f})"


def html_table(df: pd.DataFrame, caption: str | None = None):
    """A DataFrame as a clean HTML table (no index column), with an optional caption."""
    styler = df.style.hide(axis="index")
    styler = styler.set_table_attributes('class="dataframe psma-table"')
    if caption:
        styler = styler.set_caption(caption)
    return styler


# --------------------------------------------------------------------------- the cohort

# Table 1 rows: column of patients.csv -> label shown in the table.
CONTINUOUS_VARIABLES = {"age": "Age (years)", "bmi": "BMI (kg/m²)", "psa": "PSA (ng/mL)"}
CATEGORICAL_VARIABLES = {"ecog": "ECOG performance status", "gleason": "Gleason score"}
TREATMENT_VARIABLES = {
    "adt": "ADT",
    "arpi": "ARPI",
    "docetaxel": "Docetaxel",
    "radiotherapy": "Radiotherapy",
    "lu_psma": "[¹⁷⁷Lu]Lu-PSMA",
}


def _continuous_rows(values: pd.Series, label: str, digits: int) -> list[dict]:
    present = values.dropna()
    missing = int(values.isna().sum())
    if present.empty:
        return [{"characteristic": label, "level": "", "statistic": "median (IQR)", "value": EMPTY,
                 "missing": missing}]
    return [
        {"characteristic": label, "level": "", "statistic": "median (IQR)",
         "value": median_iqr(present, digits), "missing": missing},
        {"characteristic": label, "level": "", "statistic": "range",
         "value": fmt_range(present.min(), present.max(), digits), "missing": missing},
    ]


def _level_text(level) -> str:
    """``2.0`` -> ``"2"`` (CSV integers are read as floats when a value is missing)."""
    if isinstance(level, (int, float, np.integer, np.floating)) and float(level).is_integer():
        return str(int(level))
    return str(level)


def _count_rows(
    values: pd.Series, label: str, percent_digits: int, levels: Sequence | None = None, level_name: str | None = None
) -> list[dict]:
    """n (%) per level (all observed levels unless given); percentages of the known values."""
    present = values.dropna()
    missing = int(values.isna().sum())
    if levels is None:
        levels = sorted(present.unique())
    rows = []
    for level in levels:
        n = int((present == level).sum())
        rows.append({"characteristic": label, "level": level_name or _level_text(level), "statistic": "n (%)",
                     "value": f"{n} ({fmt_percent(n, len(present), percent_digits)})", "missing": missing})
    return rows


def _median_time_row(kmf: KaplanMeierFitter, label: str, digits: int, n_missing: int = 0) -> dict:
    ci = median_survival_times(kmf.confidence_interval_)
    med, lo, hi = kmf.median_survival_time_, ci.iloc[0, 0], ci.iloc[0, 1]
    return {"characteristic": label, "level": "", "statistic": "median (95 % CI)",
            "value": f"{fmt_months(med, digits)} ({fmt_months(lo, digits)}–{fmt_months(hi, digits)})",
            "missing": n_missing}


def table_one(patients: pd.DataFrame, digits: int = 1, percent_digits: int = 0) -> pd.DataFrame:
    """A clinical paper's "Table 1" of the cohort (``patients.csv`` columns).

    Rows: number of patients; age, BMI, PSA as median (IQR) and range; ECOG and Gleason as
    n (%) per level; each treatment as n (%) of patients who received it; PSA progression
    observed as n (%); median follow-up by the reverse Kaplan-Meier method (censoring treated as
    the event) and median PSA-PFS (Kaplan-Meier), both with 95 % CI in months. Percentages are
    of the patients with a known value; ``missing`` counts the others.

    Returns:
        DataFrame with columns ``characteristic, level, statistic, value, missing``.

    Example:
        >>> from psma_lib.testing import tiny_patients
        >>> t = table_one(tiny_patients()).set_index(["characteristic", "level", "statistic"])
        >>> t.loc[("ECOG performance status", "0", "n (%)"), "value"]
        '3 (60 %)'
    """
    required = [*CONTINUOUS_VARIABLES, *CATEGORICAL_VARIABLES, *TREATMENT_VARIABLES, "pfs_months", "event"]
    _require_columns(patients, required, "patients table")
    time, event = _survival_arrays(patients["pfs_months"], patients["event"])
    rows = [{"characteristic": "Patients", "level": "", "statistic": "n", "value": str(len(patients)), "missing": 0}]
    for column, label in CONTINUOUS_VARIABLES.items():
        rows += _continuous_rows(_numeric_column(patients, column), label, digits)
    for column, label in CATEGORICAL_VARIABLES.items():
        rows += _count_rows(_numeric_column(patients, column), label, percent_digits)
    for column, label in TREATMENT_VARIABLES.items():
        rows += _count_rows(_numeric_column(patients, column), label, percent_digits, levels=[1], level_name="received")
    rows += _count_rows(patients["event"], "PSA progression observed", percent_digits, levels=[1], level_name="yes")
    follow_up = KaplanMeierFitter().fit(time, ~event)
    rows.append(_median_time_row(follow_up, "Follow-up, reverse KM (months)", digits))
    rows.append(_median_time_row(KaplanMeierFitter().fit(time, event), "PSA-PFS, Kaplan-Meier (months)", digits))
    return pd.DataFrame(rows, columns=["characteristic", "level", "statistic", "value", "missing"])


def lesion_site_table(lesions: pd.DataFrame) -> pd.DataFrame:
    """Lesions per site with SUVmax median (IQR) and range and volume median (IQR).

    ``lesions``: the crops' lesion table (``site``, ``suvmax``, ``volume_ml``, ``patient_id``).
    """
    df = lesions.assign(site=site_labels(lesions["site"]))
    rows = []
    for site, g in df.groupby("site", sort=False):
        rows.append({
            "Site": site.replace("_", " "),
            "Lesions, n (%)": f"{len(g)} ({fmt_percent(len(g), len(df))})",
            "Patients, n": g["patient_id"].nunique(),
            "SUVmax, median (IQR)": median_iqr(g["suvmax"]),
            "SUVmax, range": fmt_range(g["suvmax"].min(), g["suvmax"].max(), 1),
            "Volume, mL, median (IQR)": median_iqr(g["volume_ml"], 2),
        })
    return pd.DataFrame(rows).sort_values("Patients, n", ascending=False, ignore_index=True)


def crop_info_table(meta: dict, lesions: pd.DataFrame) -> pd.DataFrame:
    """The crop set's geometry in words: array shape, storage, size, spacing, orientation, edge
    crops and, for float16 storage, its measured error."""
    n = len(lesions)
    error = meta.get("storage_error")
    stored = [("storage error (measured)",
               f"PET ≤ {error['pet_suv']['max_abs']:.2g} SUV, CT ≤ {error['ct_hu']['max_abs']:.2g} HU "
               f"(relative ≤ {max(e['max_rel'] for e in error.values()):.1e})")] if error else []
    return pd.DataFrame([
        ("array", f"float32 [{' × '.join(map(str, meta['shape']))}] (lesion, channel PET/CT, D, H, W), "
                  + (f"stored as {meta['dtype']} in {meta['n_shards']} shard(s)" if "n_shards" in meta
                     else "crops.npy")),
        ("crop size", f"{meta['size_mm']:g} mm cube at {meta['spacing_mm']:g} mm spacing"),
        ("orientation", str(meta.get("orientation", ""))),
        ("centre", str(meta.get("center_mode", ""))),
        ("lesions padded at the field-of-view edge",
         f"{int(lesions['edge'].sum())} of {n} ({fmt_percent(int(lesions['edge'].sum()), n)})"),
        *stored,
    ], columns=["Property", "Value"])


def reader_table(meta: dict) -> pd.DataFrame:
    """A lesion reader's pretraining (:func:`psma_lib.pretrain.read_pretrained_meta`) in words: what it
    was trained on, how long, and how well it reads the held-out patients' lesions.

    >>> meta = {"config": {"backbone": "resnet18", "view": "axial", "epochs": 30, "batch_size": 128},
    ...         "n_train_lesions": 360, "n_holdout_lesions": 40, "n_holdout_patients": 10,
    ...         "data_checksum": "ab" * 32, "holdout_reading_r": {"log_volume": 0.9431}}
    >>> reader_table(meta).iloc[-1].tolist()
    ['held-out reading of log_volume (Pearson r)', '0.943']
    """
    config = meta["config"]
    return pd.DataFrame([
        ("encoder", f"{config['backbone']}, {config['view']} view"),
        ("pretrained on", f"{meta['n_train_lesions']} lesions (data checksum {meta['data_checksum'][:12]}…); "
                          "no outcome read"),
        ("schedule", f"{config['epochs']} epochs, batches of {config['batch_size']}"),
        ("held out", f"{meta['n_holdout_lesions']} lesions of {meta['n_holdout_patients']} patients"),
        *((f"held-out reading of {name} (Pearson r)", f"{r:.3f}") for name, r in meta["holdout_reading_r"].items()),
    ], columns=["Property", "Value"])


# --------------------------------------------------------------------------- cross-validated runs


def model_name(config) -> str:
    """The kind of model of a run's :class:`psma_lib.cv.CVConfig` in words (:data:`MODEL_NAMES`),
    saying so where its clinical penalty was chosen on inner folds.

    >>> from psma_lib.cv import CVConfig
    >>> model_name(CVConfig(modality="clinical", model="coxph", clinical_penalty="inner"))
    'Cox (lifelines), clinical penalty by inner CV'
    """
    name = MODEL_NAMES[config.model]
    return f"{name}, clinical penalty by inner CV" if config.clinical_penalty == "inner" else name


def run_label(config) -> str:
    """Short name of a run's :class:`psma_lib.cv.CVConfig`: ``multimodal resnet18`` or
    ``clinical Cox (lifelines)`` (with :func:`model_name`'s note on a tuned clinical penalty)."""
    if config.model == "resnet":
        return f"{config.modality} {config.backbone}"
    if config.model == "coxph" and config.covariates != "clinical":
        return f"{config.covariates} {model_name(config)}"
    return f"{config.modality} {model_name(config)}"


def cv_config_table(config) -> pd.DataFrame:
    """A run's :class:`psma_lib.cv.CVConfig` as a short two-column table."""
    keep = ("modality", "model", "backbone", "view", "channels", "head", "stem", "aggregation", "unit", "aux_targets", "aux_weight",
            "selection", "epochs", "batch_size", "lr", "weight_decay", "val_fraction", "patience", "augment",
            "folds", "seed", "device")
    values = [getattr(config, k) for k in keep]
    return pd.DataFrame([(k, EMPTY if v is None else str(v)) for k, v in zip(keep, values, strict=True)],
                        columns=["Setting", "Value"])


def ablation_table(runs: Sequence, headline: pd.DataFrame) -> pd.DataFrame:
    """One row per run (:class:`psma_lib.cv.CVResult`): our fold range beside the paper's, the
    fold mean with its within-fold bootstrap CI and the pooled C of training-standardised risks
    (``headline``: :func:`psma_lib.comparison.summary_table` of the same runs, in order)."""
    rows = []
    for run, head in zip(runs, headline.itertuples(), strict=True):
        sm, config = run.summary, run.config
        baseline = config.model == "coxph" and config.covariates != "clinical"
        rows.append({
            "Modality": config.covariates if baseline else config.modality,
            "Backbone": config.backbone or EMPTY, "Model": model_name(config),
            "Fold range (min–max)": fmt_range(sm["fold_min"], sm["fold_max"]),
            "Paper's fold range": EMPTY if baseline or config.model == "reader"
            else fmt_range(*PAPER_C_INDEX_RANGE[config.modality]),
            "Fold-mean C (95 % CI)": fmt_ci(head.fold_mean, head.ci_low, head.ci_high),
            "Pooled C, training-standardised": f"{head.pooled_standardised:.3f}",
            "Patients / events": f"{sm['n_patients']} / {sm['n_events']}",
        })
    return pd.DataFrame(rows)


def structural_check_table(models: dict[str, float], baselines: dict, aggregation: str) -> pd.DataFrame:
    """Chapter 3's check: each model's fold-mean C (``models``: row name -> value) beside what the
    aggregation earns without images (``baselines``: :func:`psma_lib.recovery.structural_baselines`
    on the same folds: log(count), and noise lesion outputs through ``aggregation``).

    >>> noise = {"mean": 0.69, "low": 0.64, "high": 0.74}
    >>> structural_check_table({"net": 0.7712}, {"log_count": 0.73, "noise": noise}, "sum")["fold-mean C"].tolist()
    ['0.771', '0.730', '0.690 (0.640–0.740)']
    """
    noise = baselines["noise"]
    return pd.DataFrame({
        "patient risk": [*models, "log(number of lesions), nothing trained",
                         f"noise lesion outputs through {aggregation}: mean (95 % of draws)"],
        "fold-mean C": [*(f"{c:.3f}" for c in models.values()), f"{baselines['log_count']:.3f}",
                        f"{noise['mean']:.3f} ({noise['low']:.3f}–{noise['high']:.3f})"],
    })


def fold_c_index_long(runs: Sequence) -> pd.DataFrame:
    """Stored per-fold C-index of every run, long format: ``configuration, modality, fold, c_index``."""
    return pd.concat([pd.DataFrame({"configuration": run_label(run.config), "modality": run.config.modality,
                                    "fold": run.fold_results["fold"], "c_index": run.fold_results["c_index"]})
                      for run in runs], ignore_index=True)


def fold_table(run) -> pd.DataFrame:
    """A run's stored per-fold results: test patients and events, C-index, selected epoch."""
    fr = run.fold_results
    return pd.DataFrame({
        "Fold": fr["fold"],
        "Test patients": fr["n_test_patients"],
        "Test events": fr["n_test_events"],
        "C-index (patient level)": [f"{c:.3f}" for c in fr["c_index"]],
        "C-index (lesion level, flatters)": [f"{c:.3f}" for c in fr["c_index_lesion"]],
        "Selected epoch": fr["best_epoch"],
    })


def oracle_table(oracles: dict[str, dict]) -> pd.DataFrame:
    """One row per oracle summary (:func:`psma_lib.analysis.oracle_c_index`) by its name: fold
    range, mean ± sd, pooled C (95 % CI)."""
    return pd.DataFrame([{
        "Ranked by the true": name,
        "Fold range (min–max)": fmt_range(oracle["fold_min"], oracle["fold_max"]),
        "Mean ± sd over folds": fmt_mean_sd(oracle["fold_mean"], oracle["fold_sd"]),
        "Pooled C-index (95 % CI)": fmt_ci(oracle["pooled"], oracle["pooled_lo"], oracle["pooled_hi"]),
    } for name, oracle in oracles.items()])


def hr_table(hr: pd.DataFrame) -> pd.DataFrame:
    """Hazard ratios for display: term, HR (95 % CI), p, imputed values."""
    return pd.DataFrame({
        "Covariate": hr["label"].to_numpy(),
        "Hazard ratio (95 % CI)": [fmt_ci(h, lo, hi, 2) for h, lo, hi
                                   in zip(hr["hr"], hr["hr_lo"], hr["hr_hi"], strict=True)],
        "p": [f"{p:.3g}" for p in hr["p"]],
        "Imputed values, n": hr["n_imputed"].to_numpy(),
    })


def cutoff_table(cutoffs: pd.Series, train_predictions: pd.DataFrame, groups: pd.DataFrame) -> pd.DataFrame:
    """Per fold: the cutoff, how many training patients it comes from, and how many test patients
    fall on each side (``cutoffs``: :func:`psma_lib.evaluation.risk_group_cutoffs`)."""
    rows = []
    for fold, cutoff in cutoffs.items():
        g = groups[groups["fold"] == fold]
        rows.append({"Fold": fold, "Training patients": int((train_predictions["fold"] == fold).sum()),
                     "Cutoff (training-fold median risk)": f"{cutoff:.3f}",
                     "Test patients high / low": f"{(g['group'] == 'high').sum()} / "
                                                 f"{(g['group'] == 'low').sum()}"})
    return pd.DataFrame(rows)


def km_table(km: pd.DataFrame) -> pd.DataFrame:
    """Per risk group (:func:`psma_lib.evaluation.km_summary`): n, events, median PSA-PFS
    (95 % CI) beside the paper's."""
    return pd.DataFrame({
        "Risk group": [f"{g} risk" for g in km.index],
        "Patients, n": km["n"].to_numpy(), "Events, n": km["events"].to_numpy(),
        "Median PSA-PFS, months (95 % CI)": [
            f"{fmt_months(m)} ({fmt_months(lo)}–{fmt_months(hi)})"
            for m, lo, hi in zip(km["median"], km["median_lo"], km["median_hi"], strict=True)],
        "Paper, months": [f"{PAPER_MEDIAN_PFS_MONTHS[g]:.1f}" for g in km.index],
    })


def headline_table(runs: Sequence, oracle: dict | None, km: pd.DataFrame, p_value: float) -> pd.DataFrame:
    """The book's key numbers on one table, each next to what the paper reports: the runs' pooled
    and per-fold C-indices, the oracle's, the Kaplan–Meier medians and the log-rank p."""
    rows = [{"Quantity": f"C-index, {run_label(run.config)}",
             "This book": f"pooled {fmt_ci(sm['pooled'], sm['pooled_lo'], sm['pooled_hi'])}; "
                          f"folds {fmt_range(sm['fold_min'], sm['fold_max'])}",
             "Paper": f"folds {fmt_range(*PAPER_C_INDEX_RANGE[run.config.modality])}"}
            for run in runs for sm in [run.summary]]
    if oracle is not None:
        rows.append({"Quantity": "C-index, oracle (true linear predictor, without frailty)",
                     "This book": fmt_ci(oracle["pooled"], oracle["pooled_lo"], oracle["pooled_hi"]),
                     "Paper": EMPTY})
    for _, row in km_table(km).iterrows():
        rows.append({"Quantity": f"Median PSA-PFS, {row['Risk group']} (months)",
                     "This book": row["Median PSA-PFS, months (95 % CI)"],
                     "Paper": row["Paper, months"]})
    rows.append({"Quantity": "Log-rank p (high vs low risk)", "This book": f"{p_value:.2g}",
                 "Paper": "< 0.001"})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- page furniture


def admonition(kind: str, title: str, body_html: str):
    """A Jupyter Book admonition box (``note``, ``warning``, ``seealso``, ...)."""
    from IPython.display import HTML

    return HTML(f'<div class="admonition {kind}"><p class="admonition-title">{html.escape(title)}'
                f"</p>{body_html}</div>")


def data_banner(crops_meta: dict, profile: str, manifest: str):
    """An admonition saying plainly whether this page's results come from SYNTHETIC data
    (the cohort's flag, as ``crops.json`` records it)."""
    name = html.escape(str(crops_meta.get("cohort_name") or "cohort"))
    if crops_meta.get("synthetic", False):
        return admonition(
            "warning", "Results on SYNTHETIC data",
            f"<p>Every number and figure on this page comes from the <b>synthetic</b> cohort "
            f"<code>{name}</code> generated by <code>psma_lib.synthetic</code> (profile "
            f"<code>{profile}</code>), not from patients. They test the pipeline against a "
            f"known ground truth; they are not clinical evidence.</p>")
    return admonition("note", "Real cohort",
                      f"<p>Results on the cohort <code>{name}</code> "
                      f"(manifest <code>{html.escape(manifest)}</code>).</p>")


def settings_table(s) -> pd.DataFrame:
    """A chapter's resolved :class:`psma_lib.book.BookSettings` as a two-column table."""
    return pd.DataFrame([
        ("profile", s.profile), ("output folder", s.shown(s.output_dir)),
        ("manifest", s.shown(s.manifest) if s.manifest else "default synthetic cohort"),
        ("device", s.device), ("seed", s.seed), ("epochs", s.epochs),
        ("backbones", ", ".join(s.backbones)), ("folds", s.folds),
        ("crop", f"{s.size_mm:g} mm at {s.spacing_mm:g} mm"),
        ("lesion reader", s.shown(s.reader_weights) if s.reader_weights else
         "none (real cohort: give reader_weights)" if s.manifest else "pretrained on another synthetic cohort"),
    ], columns=["Parameter", "Value"])


def warnings_note(messages: Sequence[str], what: str):
    """A note admonition listing warnings a fit raised (nothing when there were none)."""
    from IPython.display import HTML

    if not messages:
        return HTML("")
    items = "".join(f"<li>{html.escape(m)}</li>" for m in messages)
    return admonition("note", f"Warnings from {what}", f"<ul>{items}</ul>")


def reproducibility_box(s, checksum: str):
    """The closing box of every chapter: versions, seed, profile, data checksum, output folder."""
    from .repro import versions

    v = versions()
    rows = {
        "profile": f"{s.profile} ({s.description})",
        "seed": s.seed, "device": s.device, "epochs": s.epochs,
        "backbones": ", ".join(s.backbones),
        "data checksum (SHA-256)": checksum,
        "output folder": s.shown(s.output_dir),
        "python / platform": f"{v['python']} / {v['platform']}",
        "versions": ", ".join(f"{k} {v[k]}" for k in ("psma-lib", "torch", "torchvision", "numpy",
                                                      "pandas", "lifelines", "scikit-learn")),
    }
    body = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
                   f"<td><code>{html.escape(str(val))}</code></td></tr>" for k, val in rows.items())
    return admonition("seealso", "Reproducibility", f"<table>{body}</table>")


def comparison_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Display of :func:`psma_lib.comparison.summary_table` (plus reference rows that may lack a
    CI, range or pooled value): fold-mean C (95 % CI), fold range, training-standardised pooled C."""
    def cell(row, fmt, *cols):
        values = [getattr(row, c, np.nan) for c in cols]
        return fmt(*values) if all(pd.notna(v) for v in values) else ""

    rows = list(summary.itertuples())
    return pd.DataFrame({
        "Model": summary["model"],
        "Fold-mean C (95 % CI)": [cell(r, fmt_ci, "fold_mean", "ci_low", "ci_high") or f"{r.fold_mean:.3f}"
                                  for r in rows],
        "Fold range": [cell(r, fmt_range, "fold_min", "fold_max") for r in rows],
        "Pooled C, training-standardised risks": [cell(r, lambda v: f"{v:.3f}", "pooled_standardised")
                                                  for r in rows],
    })


def repeat_table(fold_means: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    """Fold-mean C per repeat (``repeat, fold seed`` + one column per model), then a row with each
    model's mean and range over the repeats."""
    spread = {"repeat": "mean (min–max)", "fold seed": "",
              **{m: f"{fold_means[m].mean():.3f} ({fold_means[m].min():.3f}–{fold_means[m].max():.3f})"
                 for m in models}}
    return pd.concat([fmt_floats(fold_means), pd.DataFrame([spread])], ignore_index=True)


def delta_verdict(row) -> str:
    """One ΔC row (:func:`psma_lib.comparison.delta_table`) in words, decided by its CI alone.

    >>> import collections
    >>> Row = collections.namedtuple("Row", "comparison delta ci_low ci_high")
    >>> delta_verdict(Row("a − b", 0.05, -0.01, 0.1)).endswith("no difference on these patients.")
    True
    """
    head = (f"<b>{html.escape(row.comparison)}: {row.delta:+.3f}</b> "
            f"(95 % CI {row.ci_low:+.3f} to {row.ci_high:+.3f}): ")
    if row.ci_low > 0:
        return head + "the first model ranks patients better."
    if row.ci_high < 0:
        return head + "the first model ranks patients <i>worse</i>."
    return head + "not distinguishable from no difference on these patients."


def images_add_conclusion(deltas: pd.DataFrame):
    """Chapter 6's conclusion box: the first ΔC row (imaging network vs lesion count) leads, and the
    imaging reader's row against the count where there is one; then every row in words."""
    leads = [_count_lead(deltas.iloc[0], "imaging network")]
    reader = deltas[deltas["comparison"] == "imaging reader − lesion count (Cox)"]
    if len(reader):
        leads.append(_count_lead(reader.iloc[0], "imaging reader"))
    items = "".join(f"<li>{delta_verdict(r)}</li>" for r in deltas.itertuples())
    return admonition("note", "Conclusion", "".join(f"<p>{lead}</p>" for lead in leads) + f"<ul>{items}</ul>")


def _count_lead(row, model: str) -> str:
    """One sentence: does ``model`` beat counting lesions (its ΔC row against the count's CI)?

    >>> _count_lead({"ci_low": 0.01}, "imaging reader")
    'The imaging reader ranks patients better than counting their lesions.'
    """
    if row["ci_low"] > 0:
        return f"The {model} ranks patients better than counting their lesions."
    return (f"<b>The {model} does not beat counting lesions</b> on this cohort: the difference is "
            "not larger than the noise of a cohort this size, or it favours the count.")
