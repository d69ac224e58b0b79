"""Data-parallel training (psma_lib.distributed): two gloo ranks on CPU, started with torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from psma_lib import distributed
from psma_lib.cli import main as cli_main
from psma_lib.cv import load_result

ROOT = Path(__file__).resolve().parents[1]
CASES = ("bags_sum_aux", "attention_augment_dropout", "lesion_units", "clinical_mlp")


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 ARGS`` with one thread per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def gradients(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ddp") / "gradients.json"
    _torchrun(str(ROOT / "tests" / "ddp_worker.py"), str(out), cwd=out.parent)
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", CASES)
def test_ddp_step_has_the_single_process_gradient_of_the_global_batch(gradients, case):
    """Cox loss over the global batch + auxiliary mean over its lesions, BatchNorm over the global
    batch, dropout and augmentation drawn for the global batch: loss, gradient and running
    statistics equal one process's on the same batch, and both ranks hold the same gradient."""
    r = gradients[case]
    assert r["world_size"] == 2 and r["same_batch"]
    assert any("DDP over 2 ranks" in note for note in r["notes"])
    assert r["loss"] == pytest.approx(r["single_loss"], rel=1e-5)
    assert r["grad_allclose_1e-5"], r  # rtol 1e-5, atol 1e-5 x the largest gradient entry
    assert r["grad_rel_diff"] < 2e-5, r
    assert r["ranks_max_abs_diff"] == 0.0
    assert r["running_mean_rel_diff"] < 1e-5


def test_a_per_rank_cox_loss_would_give_another_gradient(gradients):
    """The mean of per-rank losses (risk sets of one rank's patients) is another objective: the DDP
    step must not compute it."""
    r = gradients["bags_sum_aux"]
    assert r["per_rank_grad_rel_diff"] > 0.1
    assert r["ddp_vs_per_rank_rel_diff"] > 0.1
    assert abs(r["per_rank_loss"] - r["single_loss"]) > 0.05


def test_two_rank_cv_run_writes_once_and_matches_one_process(tiny_crops, tmp_path, capsys):
    """``torchrun -m psma_lib cv`` (inner validation: rank 0's decisions broadcast): rank 0 alone
    reports and writes; one full-batch step per epoch, so the run follows one process's up to float
    error (several Adam steps on tiny batches would amplify sign flips of near-zero gradients)."""
    args = ["--modality", "imaging", "--folds", "2", "--epochs", "2", "--batch-size", "24", "--seed", "5",
            "--selection", "val_loss", "--patience", "1", "--device", "cpu", "--num-threads", "1",
            "--no-progress", "--n-bootstrap", "50"]
    proc = _torchrun("-m", "psma_lib", "cv", "--crops", str(tiny_crops), "--out", str(tmp_path / "ddp"), *args,
                     cwd=tmp_path)
    assert proc.stdout.count("patient-level C-index") == 1
    assert cli_main(["cv", "--crops", str(tiny_crops), "--out", str(tmp_path / "one"), *args]) == 0
    capsys.readouterr()
    ddp, one = load_result(tmp_path / "ddp"), load_result(tmp_path / "one")
    assert json.loads((tmp_path / "ddp" / "config.json").read_text())["world_size"] == 2
    assert all("DDP over 2 ranks (gloo)" in note for note in ddp.fold_results["notes"])
    assert not one.fold_results["notes"].fillna("").str.contains("DDP").any()
    assert not [p for p in (tmp_path / "ddp").rglob(".*")]  # no temporary leftovers
    for k in range(2):  # global-batch BatchNorm layers keep the checkpoint's keys
        keys = [set(load_file(run / "checkpoints" / f"fold{k}.safetensors")) for run in (tmp_path / "ddp", tmp_path / "one")]
        assert keys[0] == keys[1]
    h_ddp, h_one = ddp.history, one.history
    assert len(h_ddp) == len(h_one)
    first = h_one["epoch"] == 0
    np.testing.assert_allclose(h_ddp.loc[first, "batch_loss"], h_one.loc[first, "batch_loss"], rtol=1e-5)
    for column in ("train_loss", "val_loss"):
        np.testing.assert_allclose(h_ddp[column], h_one[column], rtol=1e-4)
    assert ddp.fold_results["best_epoch"].tolist() == one.fold_results["best_epoch"].tolist()
    np.testing.assert_allclose(ddp.oof["risk"], one.oof["risk"], atol=5e-3)
    np.testing.assert_allclose(ddp.fold_results["c_index"], one.fold_results["c_index"], atol=1e-12)


def test_single_process_context_initialises_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.launched("cpu") as ctx:
        assert (ctx.rank, ctx.world_size, ctx.backend) == (0, 1, None)
        assert not torch.distributed.is_initialized()
    x = torch.ones(3, 2)
    assert distributed.all_gather_rows(x, [3]) is x


def test_half_set_torchrun_environment_is_one_clear_error(monkeypatch):
    from psma_lib.errors import InputError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(InputError, match="launch with torchrun"), distributed.launched("cpu"):
        pass
