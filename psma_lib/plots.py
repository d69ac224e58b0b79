"""Figures for the book: labelled axes, units and legends on every figure.

Every helper returns a :class:`matplotlib.figure.Figure`, already closed in pyplot and never
shown: the notebook displays the returned figure once. Tables are :mod:`psma_lib.report`'s.

**Display orientation of crops.** The contract's crop grid runs ``(D, H, W)`` along world
``(+z, +y, +x)`` = (inferior→superior, posterior→anterior, patient left→right). Radiologists read
axial images with *anterior up* and the *patient's right on the image's left*; ``imshow`` draws
row 0 at the top and column 0 at the left, so :func:`display_plane` flips an axial ``[H, W]``
plane in both axes (row 0 = most anterior, column 0 = most rightward). Coronal ``[D, W]``: flip
D (superior up) and W (patient right on the left). Sagittal ``[D, H]``: flip D (superior up)
and H (anterior on the left).

>>> fig = per_fold_c_index(pd.DataFrame({"configuration": ["a"] * 2, "modality": ["imaging"] * 2,
...                                      "fold": [0, 1], "c_index": [0.6, 0.7]}))
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from .vocabulary import SITES, UNKNOWN_SITE, site_labels

SITE_ORDER = (*SITES, UNKNOWN_SITE)
SITE_COLORS = {"bone": "#4c72b0", "lymph_node": "#dd8452", "prostate": "#55a868",
               "visceral": "#c44e52", "unknown": "#8c8c8c"}
MODALITY_COLORS = {"clinical": "#8c8c8c", "imaging": "#4c72b0", "multimodal": "#c44e52", "oracle": "#2ca02c"}
GROUP_COLORS = {"high": "#c44e52", "low": "#4c72b0"}
CT_WINDOW_HU = (-300.0, 700.0)   # a soft-tissue/bone compromise: nodes and sclerotic bone both show
PET_SUV_RANGE = (2.0, 20.0)      # below 2 SUV the PET overlay is transparent (background uptake)
MASK_COLOUR = "#39d353"         # the lesion-mask outline: green, apart from the hot PET scale
# (left, right, top, bottom) of a displayed plane, after display_plane's flips.
ORIENTATION_LETTERS = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"),
                       "sagittal": ("A", "P", "S", "I")}
# The book's text column is ~700 px wide: figures are drawn at ~9 in with fonts that survive that.
BOOK_STYLE = {"font.size": 12, "axes.titlesize": 12, "axes.labelsize": 12, "xtick.labelsize": 11,
              "ytick.labelsize": 11, "legend.fontsize": 10, "figure.dpi": 100}


def _book_style(func):
    """Draw the figure under :data:`BOOK_STYLE` (fonts sized for the book's column) and detach
    it from pyplot, so a notebook shows it exactly once: as the cell's returned value."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with plt.rc_context(BOOK_STYLE):
            fig = func(*args, **kwargs)
        plt.close(fig)
        return fig
    return wrapper


def display_plane(plane: np.ndarray, view: str = "axial") -> np.ndarray:
    """Re-orient a crop plane for ``imshow`` in the radiological convention (see module doc).

    ``plane``: ``[H, W]`` axial, ``[D, W]`` coronal or ``[D, H]`` sagittal (any leading dims).

    >>> display_plane(np.array([[0, 1], [2, 3]]))        # row 1 (anterior) goes on top
    array([[3, 2],
           [1, 0]])
    """
    if view not in ("axial", "coronal", "sagittal"):
        raise ValueError(f"unknown view {view!r}")
    return plane[..., ::-1, ::-1]


def montage_selection(lesions: pd.DataFrame, per_site: int = 3) -> list[int]:
    """Row indices of lesions for the QC montage: per site, the lowest, median and highest SUVmax.

    Deterministic, and it shows the range a reader must check (faint and hot lesions alike).

    >>> montage_selection(pd.DataFrame({"site": ["bone"] * 4 + [""], "suvmax": [3.0, 50, 10, 20, 8]}))
    [0, 3, 1, 4]
    """
    picks: list[int] = []
    sites = site_labels(lesions["site"])
    for site in SITE_ORDER:
        rows = lesions.index[sites == site]
        if len(rows) == 0:
            continue
        order = lesions.loc[rows, "suvmax"].sort_values(kind="stable").index
        take = np.unique(np.linspace(0, len(order) - 1, min(per_site, len(order))).round().astype(int))
        picks += [int(lesions.index.get_loc(order[i])) for i in take]
    return picks


@_book_style
def lesion_overview(lesions: pd.DataFrame) -> Figure:
    """Three panels: lesions per site, SUVmax by site (log axis), lesions per patient.

    ``lesions``: one row per lesion with ``patient_id``, ``site``, ``suvmax``.
    """
    df = lesions.assign(site=site_labels(lesions["site"]))
    sites = [s for s in SITE_ORDER if s in set(df["site"])]
    fig = plt.figure(figsize=(10, 8))
    grid = fig.add_gridspec(2, 2)
    axes = [fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, :]), fig.add_subplot(grid[0, 1])]
    counts = df["site"].value_counts().reindex(sites)
    axes[0].bar([s.replace("_", " ") for s in sites], counts.to_numpy(),
                color=[SITE_COLORS[s] for s in sites])
    axes[0].set(xlabel="lesion site", ylabel="lesions (n)", title="Lesions per site")
    rng = np.random.default_rng(0)  # jitter only; fixed so the figure is reproducible
    data = [df.loc[df["site"] == s, "suvmax"].to_numpy(float) for s in sites]
    axes[1].boxplot(data, positions=range(len(sites)), widths=0.5, showfliers=False)
    for i, (s, values) in enumerate(zip(sites, data, strict=True)):
        axes[1].scatter(i + rng.uniform(-0.18, 0.18, len(values)), values, s=9, alpha=0.6,
                        color=SITE_COLORS[s], label=f"{s.replace('_', ' ')} (n={len(values)})")
    axes[1].set_yscale("log")
    axes[1].set_xticks(range(len(sites)), [s.replace("_", " ") for s in sites])
    axes[1].set(xlabel="lesion site", ylabel="SUVmax (g/mL, log scale)",
                title="SUVmax by site (box: median, IQR)")
    axes[1].legend(loc="upper right")
    per_patient = df.groupby("patient_id").size()
    bins = np.arange(per_patient.min() - 0.5, per_patient.max() + 1.5)
    axes[2].hist(per_patient, bins=bins, color="#777777", edgecolor="white")
    axes[2].set(xlabel="lesions per patient (n)", ylabel="patients (n)",
                title=f"Lesions per patient (mean {per_patient.mean():.1f})")
    fig.tight_layout()
    return fig


@_book_style
def fused_montage(planes: np.ndarray, titles: Sequence[str], *, spacing_mm: float,
                  view: str = "axial", ncols: int = 4) -> Figure:
    """QC montage of fused PET/CT lesion crops: CT in grey, PET as a hot overlay, and the
    lesion's own mask outlined where the crops carry it.

    ``planes``: ``[n, C, a, b]`` (channel 0 PET in SUV, channel 1 CT in HU, channel 2 the lesion
    mask if ``C = 3``) in the contract's crop orientation; each tile is re-oriented with :func:`display_plane`. CT window
    :data:`CT_WINDOW_HU`, PET shown from :data:`PET_SUV_RANGE` (transparent below).
    Tiles are drawn in millimetres relative to the lesion centre (axes of the first tile).
    """
    n = len(planes)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.3 * ncols + 1.2, 2.6 * nrows + 0.8),
                             squeeze=False)
    half = planes.shape[-1] * spacing_mm / 2
    extent = (-half, half, -half, half)
    norm = Normalize(*PET_SUV_RANGE)
    image = None
    for ax, plane, title in zip(axes.ravel(), planes, titles, strict=False):
        pet, ct = display_plane(plane[0], view), display_plane(plane[1], view)
        ax.imshow(ct, cmap="gray", vmin=CT_WINDOW_HU[0], vmax=CT_WINDOW_HU[1], extent=extent)
        image = ax.imshow(np.ma.masked_less(pet, PET_SUV_RANGE[0]), cmap="hot", norm=norm,
                          alpha=0.65, extent=extent)
        if len(plane) > 2 and plane[2].any():
            ax.contour(display_plane(plane[2], view), levels=[0.5], colors=MASK_COLOUR, linewidths=1.0,
                       origin="upper", extent=extent)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    # Orientation letters on every tile: the patient's right (R) on the image's left.
    left, right, top, bottom = ORIENTATION_LETTERS[view]
    for ax in axes.ravel()[:n]:
        for x, y, letter in ((0.04, 0.5, left), (0.96, 0.5, right), (0.5, 0.95, top), (0.5, 0.05, bottom)):
            ax.text(x, y, letter, transform=ax.transAxes, color="#7fd4ff", fontsize=8,
                    ha="center", va="center", fontweight="bold")
    fig.subplots_adjust(left=0.02, right=0.88, top=0.86, bottom=0.08, wspace=0.06, hspace=0.32)
    cax = fig.add_axes([0.9, 0.15, 0.02, 0.65])
    fig.colorbar(image, cax=cax).set_label("PET SUV (g/mL)")
    outline = "; lesion mask outlined" if planes.shape[1] > 2 else ""
    fig.text(0.45, 0.02, f"each tile {2 * half:.0f} mm × {2 * half:.0f} mm; CT window "
             f"{CT_WINDOW_HU[0]:.0f} to {CT_WINDOW_HU[1]:.0f} HU{outline}", ha="center", fontsize=10)
    fig.suptitle(f"Fused PET/CT, {view} plane through each lesion centre", fontsize=12)
    return fig


@_book_style
def learning_curves(history: pd.DataFrame) -> Figure:
    """Patient-level Cox loss relative to a constant-risk model per epoch, one line per fold.

    ``history``: ``history.csv`` (``fold, epoch, train_loss, train_null_loss`` and, with an inner
    validation split, ``val_loss, val_null_loss, val_c_index``). The Cox loss per event grows with
    the log of the risk-set size, so losses of sets of different size (training fold vs a small
    validation set) are only comparable as ``loss - null loss``: 0 is a model that knows nothing,
    below 0 is better. With validation data a second panel shows its C-index.
    """
    has_val = "val_loss" in history and history["val_loss"].notna().any()
    fig, axes = plt.subplots(2 if has_val else 1, 1, figsize=(9, 8 if has_val else 4.5), squeeze=False)
    ax_loss = axes[0, 0]
    colors = plt.get_cmap("tab10")
    for i, (fold, g) in enumerate(history.groupby("fold")):
        g = g.sort_values("epoch")
        ax_loss.plot(g["epoch"], g["train_loss"] - g["train_null_loss"], color=colors(i),
                     label=f"fold {fold} training patients")
        if has_val:
            ax_loss.plot(g["epoch"], g["val_loss"] - g["val_null_loss"], color=colors(i), ls="--",
                         label=f"fold {fold} validation")
            axes[1, 0].plot(g["epoch"], g["val_c_index"], color=colors(i), marker="o", ms=3, label=f"fold {fold}")
    ax_loss.axhline(0.0, color="black", lw=0.8, ls=":", label="constant risk (0)")
    ax_loss.set(xlabel="epoch", ylabel="Cox loss − constant-risk loss (per event)",
                title="Patient-level loss relative to a model that knows nothing"
                      + (" (dashed: inner validation)" if has_val else ""))
    ax_loss.legend(fontsize=8, ncol=2)
    if has_val:
        axes[1, 0].axhline(0.5, color="black", lw=0.8, ls=":", label="chance (0.5)")
        axes[1, 0].set(xlabel="epoch", ylabel="validation C-index (patient level)", title="Inner-validation C-index")
        axes[1, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig


@_book_style
def per_fold_c_index(folds: pd.DataFrame, paper_ranges: Mapping[str, tuple[float, float]] | None = None,
                     oracle: float | None = None) -> Figure:
    """Per-fold C-index by configuration (dots), fold mean (bar), paper's ranges (shaded).

    ``folds``: ``configuration, modality, fold, c_index`` (long format, one row per fold).
    """
    configs = list(dict.fromkeys(folds["configuration"]))
    fig, ax = plt.subplots(figsize=(max(9.0, 1.1 * len(configs) + 1.5), 7.0))
    for i, config in enumerate(configs):
        g = folds[folds["configuration"] == config]
        color = MODALITY_COLORS.get(g["modality"].iloc[0], "#333333")
        ax.scatter(np.full(len(g), i) + np.linspace(-0.12, 0.12, len(g)), g["c_index"],
                   color=color, s=22, zorder=3)
        ax.hlines(g["c_index"].mean(), i - 0.3, i + 0.3, color=color, lw=2.5, zorder=2)
    for modality, (lo, hi) in (paper_ranges or {}).items():
        ax.axhspan(lo, hi, color=MODALITY_COLORS.get(modality, "#cccccc"), alpha=0.10, lw=0)
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=m)
               for m, c in MODALITY_COLORS.items() if m in set(folds["modality"])]
    handles.append(plt.Line2D([], [], color="black", lw=2.5, label="mean over folds"))
    if paper_ranges:
        handles.append(plt.Rectangle((0, 0), 1, 1, color="#999999", alpha=0.25,
                                     label="paper's fold ranges (by modality colour)"))
    ax.axhline(0.5, color="black", lw=0.8, ls=":")
    handles.append(plt.Line2D([], [], color="black", lw=0.8, ls=":", label="chance (0.5)"))
    if oracle is not None:
        ax.axhline(oracle, color="#2ca02c", lw=1.2, ls="--")
        handles.append(plt.Line2D([], [], color="#2ca02c", ls="--",
                                  label=f"oracle (true risk) {oracle:.2f}"))
    ax.set_xticks(range(len(configs)), configs, rotation=20, ha="right")
    low = min(0.2, float(np.nanmin(folds["c_index"])) - 0.03)
    ax.set(xlabel="configuration", ylabel="test-fold C-index (patient level)",
           title=f"C-index of each of the {folds['fold'].nunique()} test folds", ylim=(low, 1.02))
    ax.legend(handles=handles, fontsize=10, loc="upper center", bbox_to_anchor=(0.5, -0.32),
              ncol=3)
    fig.tight_layout()
    return fig


@_book_style
def forest_plot(hr: pd.DataFrame, limits: tuple[float, float] = (0.05, 20.0)) -> Figure:
    """Hazard ratios with 95 % CI on a log axis; ``hr``: ``label, hr, hr_lo, hr_hi, p``.

    The axis spans ``limits``; an estimate or bound beyond them (e.g. a near-separated binary
    covariate in a small cohort) is drawn at the edge as a triangle and labelled "off scale".
    """
    hr = hr.iloc[::-1].reset_index(drop=True)
    lo_lim, hi_lim = limits
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(hr) + 1.6))
    y = np.arange(len(hr))
    point = hr["hr"].clip(lo_lim, hi_lim)
    low, high = hr["hr_lo"].clip(lo_lim, hi_lim), hr["hr_hi"].clip(lo_lim, hi_lim)
    ax.errorbar(point, y, xerr=[point - low, high - point], fmt="s", color="#333333",
                ecolor="#333333", capsize=3, label="HR (95 % CI)")
    off = (hr["hr"] > hi_lim) | (hr["hr"] < lo_lim)
    if off.any():
        ax.scatter(point[off], y[off], marker=">", s=80, color="#c44e52", zorder=3,
                   label="estimate off scale (see table)")
    ax.axvline(1.0, color="#c44e52", ls="--", lw=1, label="HR = 1 (no effect)")
    ax.set_xscale("log")
    ax.set_xlim(lo_lim, hi_lim)
    ax.set_yticks(y, [f"{lab}   p={p:.2g}" for lab, p in zip(hr["label"], hr["p"], strict=True)])
    ax.set(xlabel="hazard ratio for PSA progression (log scale)",
           title="Clinical Cox model: hazard ratios")
    ax.legend(fontsize=9, loc="lower right")
    fig.tight_layout()
    return fig


@_book_style
def km_plot(groups: pd.DataFrame, p_value: float | None = None) -> Figure:
    """Kaplan–Meier PSA-PFS per risk group with 95 % CI bands and a number-at-risk table.

    ``groups``: ``pfs_months, event, group`` ("high"/"low"), one row per patient.
    """
    from lifelines import KaplanMeierFitter
    from lifelines.plotting import add_at_risk_counts

    fig, ax = plt.subplots(figsize=(8, 5.2))
    fitters = []
    for name in ("high", "low"):
        g = groups[groups["group"] == name]
        if g.empty:
            continue
        kmf = KaplanMeierFitter(label=f"{name} risk (n={len(g)})").fit(g["pfs_months"], g["event"])
        kmf.plot_survival_function(ax=ax, ci_show=True, color=GROUP_COLORS[name])
        fitters.append(kmf)
    ax.axhline(0.5, color="black", lw=0.6, ls=":")
    title = "PSA progression-free survival by predicted risk group"
    if p_value is not None:
        title += f" (log-rank p = {p_value:.2g})"
    ax.set(xlabel="time since PSMA PET/CT (months)", ylabel="PSA-PFS probability",
           title=title, ylim=(0, 1.02))
    ax.legend(loc="upper right", fontsize=9)
    add_at_risk_counts(*fitters, ax=ax, rows_to_show=["At risk"])
    fig.tight_layout()
    return fig


@_book_style
def oof_risk_scatter(groups: pd.DataFrame) -> Figure:
    """Out-of-fold risk against observed PSA-PFS (events filled, censored hollow), by group."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, g in groups.groupby("group"):
        ev = g["event"] == 1
        color = GROUP_COLORS.get(name, "#333333")
        ax.scatter(g.loc[ev, "risk"], g.loc[ev, "pfs_months"], color=color, s=18,
                   label=f"{name}: progression")
        ax.scatter(g.loc[~ev, "risk"], g.loc[~ev, "pfs_months"], facecolors="none",
                   edgecolors=color, s=18, label=f"{name} risk: censored")
    ax.set(xlabel="out-of-fold risk (log-hazard)", ylabel="PSA-PFS or censoring time (months)",
           title="Predicted risk vs observed time")
    ax.legend(fontsize=9)
    fig.tight_layout()
    return fig


@_book_style
def delta_c(deltas: pd.DataFrame) -> Figure:
    """ΔC of paired model comparisons with their bootstrap CIs (one row per comparison).

    ``deltas``: :func:`psma_lib.comparison.delta_table` (``comparison, delta, ci_low, ci_high,
    p_value``). A CI that crosses 0 (dotted line) is a difference the data cannot tell from noise.
    """
    fig, ax = plt.subplots(figsize=(8, 0.7 * len(deltas) + 1.5))
    y = np.arange(len(deltas))[::-1]
    err = [deltas["delta"] - deltas["ci_low"], deltas["ci_high"] - deltas["delta"]]
    ax.errorbar(deltas["delta"], y, xerr=err, fmt="o", color="#1f77b4", capsize=4)
    for yi, (_, row) in zip(y, deltas.iterrows(), strict=True):
        ax.annotate(f"p = {row['p_value']:.2g}", (row["ci_high"], yi), xytext=(6, 0),
                    textcoords="offset points", va="center", fontsize=9)
    ax.axvline(0.0, color="black", lw=0.8, ls=":")
    ax.set_yticks(y, deltas["comparison"])
    ax.set(xlabel="ΔC (fold mean of per-fold differences), 95 % paired bootstrap CI",
           title="Paired comparisons on the same patients and folds")
    fig.tight_layout()
    return fig


@_book_style
def calibration_plot(table: pd.DataFrame, t: float) -> Figure:
    """Predicted vs Kaplan-Meier PSA-PFS at ``t`` months per risk group (``calibration_table``)."""
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    err = [table["observed"] - table["observed_lo"], table["observed_hi"] - table["observed"]]
    ax.errorbar(table["predicted"], table["observed"], yerr=err, fmt="o", capsize=4, color="#d62728",
                label="risk group: KM observed (95 % CI)")
    for group, row in table.iterrows():
        ax.annotate(f"group {group}", (row["predicted"], row["observed"]), xytext=(6, -12),
                    textcoords="offset points", fontsize=9)
    ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls=":", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=f"mean predicted PSA-PFS at {t:g} months",
           ylabel=f"observed (Kaplan–Meier) PSA-PFS at {t:g} months", title=f"Calibration at {t:g} months")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


@_book_style
def truth_recovery(table: pd.DataFrame) -> Figure:
    """Spearman correlations of lesion log-hazards with the true lesion properties, with CIs
    (:func:`psma_lib.recovery.truth_recovery`)."""
    fig, ax = plt.subplots(figsize=(8, 3.5))
    y = np.arange(len(table))[::-1]
    err = [table["spearman"] - table["ci_low"], table["ci_high"] - table["spearman"]]
    ax.errorbar(table["spearman"], y, xerr=err, fmt="o", capsize=4, color="#2ca02c")
    ax.axvline(0.0, color="black", lw=0.8, ls=":")
    ax.set_yticks(y, table.index)
    ax.set(xlabel="Spearman correlation with the out-of-fold lesion log-hazard (95 % CI, patients resampled)",
           title="What the network's lesion scores track (synthetic ground truth)")
    fig.tight_layout()
    return fig
