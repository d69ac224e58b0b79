"""Figure helpers on tiny inputs: every axis labelled, legends where several things are drawn."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from psma_lib import plots  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _labelled(ax) -> bool:
    return bool(ax.get_xlabel().strip()) and bool(ax.get_ylabel().strip())


def _survival_frame(n=24, seed=0):
    rng = np.random.default_rng(seed)
    risk = rng.normal(size=n)
    return pd.DataFrame({"patient_id": [f"p{i}" for i in range(n)], "fold": np.arange(n) % 3,
                         "risk": risk, "pfs_months": rng.exponential(20 * np.exp(-risk)) + 0.5,
                         "event": (rng.random(n) < 0.7).astype(int),
                         "group": np.where(risk > 0, "high", "low")})


def test_display_plane_puts_anterior_up_and_patient_right_on_the_left():
    # crop plane [H, W]: h runs posterior->anterior, w runs patient left->right (+x = Right)
    plane = np.zeros((4, 5))
    plane[3, 4] = 1.0           # most anterior row, most rightward column
    shown = plots.display_plane(plane, "axial")
    assert shown[0, 0] == 1.0   # top-left of the image: anterior, patient's right
    with pytest.raises(ValueError):
        plots.display_plane(plane, "oblique")


def test_lesion_overview_has_labelled_axes_and_a_legend():
    lesions = pd.DataFrame({"patient_id": ["a", "a", "b", "c"], "site": ["bone", "lymph_node", "bone", None],
                            "suvmax": [12.0, 8.0, 30.0, 4.0]})
    fig = plots.lesion_overview(lesions)
    assert len(fig.axes) == 3 and all(_labelled(ax) for ax in fig.axes)
    assert fig.axes[1].get_yscale() == "log" and fig.axes[1].get_legend() is not None


def test_fused_montage_draws_ct_then_pet_per_tile_with_a_suv_colourbar():
    planes = np.zeros((5, 2, 8, 8), np.float32)
    planes[:, 0, 4, 4] = 10.0
    planes[:, 1] = 40.0
    fig = plots.fused_montage(planes, [f"lesion {i}" for i in range(5)], spacing_mm=2.0, ncols=3)
    tiles = [ax for ax in fig.axes if ax.images]
    assert len(tiles) == 5 and all(len(ax.images) == 2 for ax in tiles)
    cbar = [ax for ax in fig.axes if "SUV" in ax.get_ylabel()]
    assert len(cbar) == 1
    assert tiles[0].images[0].get_cmap().name == "gray" and tiles[0].images[1].get_cmap().name == "hot"
    letters = {t.get_text() for t in tiles[0].texts}
    assert letters == {"R", "L", "A", "P"}


def test_learning_curves_plot_losses_relative_to_the_null_model():
    history = pd.DataFrame({"fold": [0, 0, 1, 1], "epoch": [1, 2, 1, 2], "train_loss": [3.0, 2.5, 3.1, 2.6],
                            "train_null_loss": [3.2] * 4, "val_loss": [2.2, 2.0, 2.3, 2.1],
                            "val_null_loss": [2.3] * 4, "val_c_index": [0.55, 0.6, 0.5, 0.62]})
    fig = plots.learning_curves(history)
    assert all(_labelled(ax) and ax.get_legend() is not None for ax in fig.axes)
    assert "loss" in fig.axes[0].get_ylabel().lower() and "C-index" in fig.axes[1].get_ylabel()
    first = fig.axes[0].get_lines()[0].get_ydata()  # fold 0, training: loss - null on one scale
    assert np.allclose(first, [3.0 - 3.2, 2.5 - 3.2])
    fixed = plots.learning_curves(history.assign(val_loss=np.nan, val_null_loss=np.nan, val_c_index=np.nan))
    assert len(fixed.axes) == 1  # fixed schedule: no validation panel


def test_per_fold_c_index_shows_every_fold_and_the_reference_lines():
    folds = pd.DataFrame({"configuration": ["clin"] * 3 + ["mm"] * 3,
                          "modality": ["clinical"] * 3 + ["multimodal"] * 3,
                          "fold": [0, 1, 2] * 2, "c_index": [0.5, 0.55, 0.6, 0.7, 0.72, 0.8]})
    fig = plots.per_fold_c_index(folds, {"clinical": (0.53, 0.65)}, oracle=0.8)
    ax = fig.axes[0]
    assert _labelled(ax) and ax.get_legend() is not None
    assert sum(len(c.get_offsets()) for c in ax.collections if hasattr(c, "get_offsets")) >= 6
    assert any("oracle" in t.get_text() for t in ax.get_legend().get_texts())


def test_forest_plot_uses_a_log_axis_with_one_row_per_term():
    hr = pd.DataFrame({"label": ["Age", "PSA"], "hr": [1.1, 1.5], "hr_lo": [0.9, 1.1],
                       "hr_hi": [1.3, 2.0], "p": [0.3, 0.01]})
    fig = plots.forest_plot(hr)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_xlabel()
    assert [t.get_text().split()[0] for t in ax.get_yticklabels()] == ["PSA", "Age"]


def test_km_plot_has_bands_legend_and_at_risk_table():
    fig = plots.km_plot(_survival_frame(), p_value=0.04)
    main = fig.axes[0]
    assert _labelled(main) and main.get_legend() is not None and "p = 0.04" in main.get_title()
    assert len(main.collections) >= 2          # one CI band per group
    assert len(fig.axes) >= 2                  # the at-risk table axis


def test_oof_risk_scatter():
    fig = plots.oof_risk_scatter(_survival_frame())
    assert _labelled(fig.axes[0]) and fig.axes[0].get_legend() is not None


def test_forest_plot_marks_estimates_beyond_the_axis():
    hr = pd.DataFrame({"label": ["ADT", "PSA"], "hr": [5e6, 1.5], "hr_lo": [0.0, 1.1],
                       "hr_hi": [np.inf, 2.0], "p": [0.99, 0.01]})
    ax = plots.forest_plot(hr, limits=(0.05, 20)).axes[0]
    assert ax.get_xlim() == pytest.approx((0.05, 20))
    assert any("off scale" in t.get_text() for t in ax.get_legend().get_texts())
