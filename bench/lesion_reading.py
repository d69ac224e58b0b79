"""How well a finished image run's network reads each lesion's measured quantities, out of fold.

A run with auxiliary targets (the default) has a head that predicts each lesion's measured
quantities (log SUVmax, log volume, log(SUVmean / SUVmax), bone site, ...) from its embedding.
This reads every fold's checkpoint back, predicts those quantities for the fold's *test* lesions
(unaugmented), undoes the training fold's standardisation (recomputed from the run's data and
folds, as training fitted it) and prints the Pearson and Spearman correlation of predicted with
measured over all lesions: how exactly the network reads what the crop stage measures
(docs/METHOD.md, tenth round). Nothing is trained; a few seconds per run on 2 CPU cores.

Usage::

    .venv/bin/python bench/lesion_reading.py _build/results/quick/cv/imaging-resnet18-<key> [...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import pearsonr, spearmanr

from psma_lib import cv
from psma_lib.crop import load_crops


def reading(run: Path) -> pd.DataFrame:
    """One row per auxiliary target of the run in ``run``: Pearson r, Spearman ρ and lesions."""
    record = json.loads((run / "config.json").read_text())
    config = cv.config_from_record(record)
    if config.model != "resnet" or config.aux_weight <= 0:
        raise SystemExit(f"{run}: not an image run with auxiliary targets")
    crops = load_crops(record["crops_dir"])
    lesions = crops.lesions.astype({"patient_id": str})
    images = cv.image_inputs(crops, lesions, config.backbone, config.view, config.channels)
    names = cv.aux_target_names(config.aux_targets)
    values = cv.lesion_target_values(lesions, names)
    folds = pd.read_csv(run / "folds.csv", dtype={"patient_id": str})
    predicted = np.full(values.shape, np.nan)
    for k in sorted(folds["fold"].unique()):
        test = lesions["patient_id"].isin(folds.loc[folds["fold"] == k, "patient_id"]).to_numpy()
        mean, sd = cv.lesion_scaling(values, ~test)  # the training fold's, as cv fitted it (selection=last)
        state, pre, _ = cv.load_checkpoint(run / "checkpoints" / f"fold{k}.safetensors")
        model = cv.make_model(config, pre.n_features)
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            clinical = None if config.modality == "imaging" else torch.as_tensor(
                pre.transform(crops.patients.astype({"patient_id": str}).set_index("patient_id")
                              .loc[lesions.loc[test, "patient_id"]].reset_index()), dtype=torch.float32)
            _, aux = model.forward_with_aux(images[test], clinical)
        predicted[test] = aux.numpy() * sd + mean
    rows = []
    for j, name in enumerate(names):
        known = np.isfinite(values[:, j])
        rows.append({"target": name, "pearson_r": pearsonr(predicted[known, j], values[known, j])[0],
                     "spearman": spearmanr(predicted[known, j], values[known, j])[0], "n_lesions": int(known.sum())})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished cross-validation folders")
    args = parser.parse_args()
    for run in args.runs:
        print(f"{run}:\n{reading(run).to_string(index=False, float_format='{:.3f}'.format)}\n")


if __name__ == "__main__":
    main()
