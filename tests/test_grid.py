"""Independent fold units, the book's CV grid, and its local, submitit and SLURM runners: each way
of splitting the work must give the files of one sequential run, bit for bit on CPU."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import nbformat
import pandas as pd
import pytest
import torch
from safetensors import safe_open

from psma_lib import book, grid, pipeline, runner
from psma_lib import cv as cv_module
from psma_lib.cli import main
from psma_lib.crop import load_crops
from psma_lib.cv import CVConfig, collect, fold_done, run_cv, run_fold
from psma_lib.errors import InputError
from psma_lib.testing import write_tiny_crops

FAST = dict(folds=2, n_bootstrap=50, progress=False, device="cpu", num_threads=1)
CONFIGS = {"cox": CVConfig(modality="clinical", model="coxph", **FAST),
           "img": CVConfig(modality="imaging", epochs=1, batch_size=8, **FAST)}
LIB_ROOT = str(Path(grid.__file__).resolve().parent.parent)


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    return load_crops(write_tiny_crops(tmp_path_factory.mktemp("grid") / "crops", n_patients=16, size=8))


@pytest.fixture(scope="module")
def sequential(crops, tmp_path_factory) -> dict[str, Path]:
    """Each configuration run the usual way: every fold in one process, then collected."""
    root = tmp_path_factory.mktemp("sequential")
    return {name: run_cv(crops.root, root / name, config).out_dir for name, config in CONFIGS.items()}


def _without_time(record: dict) -> dict:
    record = json.loads(json.dumps(record))
    record.get("provenance", {}).pop("created_utc", None)
    return record


def assert_same_run(expected: Path, actual: Path) -> None:
    """Every file of two run folders: CSVs byte for byte, checkpoints tensor for tensor, JSON
    apart from the provenance's creation time."""
    files = sorted(p.relative_to(expected) for p in expected.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(actual) for p in actual.rglob("*") if p.is_file())
    assert any(f.suffix == ".safetensors" for f in files) and Path("results.json") in files
    for rel in files:
        a, b = expected / rel, actual / rel
        if rel.suffix == ".safetensors":
            with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
                assert fa.metadata() == fb.metadata() and sorted(fa.keys()) == sorted(fb.keys())
                for key in fa.keys():
                    assert torch.equal(fa.get_tensor(key), fb.get_tensor(key)), f"{rel}: {key} differs"
        elif rel.suffix == ".json":
            assert _without_time(json.loads(a.read_text())) == _without_time(json.loads(b.read_text())), rel
        else:
            assert a.read_bytes() == b.read_bytes(), f"{rel} differs"


def _cv_command(crops_dir, out, config_file, *extra):
    return [sys.executable, "-m", "psma_lib", "cv", "--crops", str(crops_dir), "--out", str(out),
            "--config", str(config_file), *extra]


def test_folds_as_separate_processes_equal_the_sequential_run(crops, sequential, tmp_path):
    config, out = CONFIGS["img"], tmp_path / "split"
    config_file = tmp_path / "img.json"
    config_file.write_text(json.dumps(json.loads((sequential["img"] / "results.json").read_text())["config"]))
    # fold 1 and fold 0 start at once, each its own process, racing for config.json and folds.csv
    env = {"PYTHONPATH": LIB_ROOT, "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(_cv_command(crops.root, out, config_file, "--fold", str(k)), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in (1, 0)]
    outputs = [p.communicate()[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert not (out / "results.json").exists()  # a fold unit trains, it does not collect
    collect(out, config)
    assert_same_run(sequential["img"], out)


def test_collect_names_unfinished_folds_and_refuses_another_configuration(crops, sequential, tmp_path):
    config, out = CONFIGS["cox"], tmp_path / "cox"
    run_fold(crops.root, out, config, 1)
    assert fold_done(out, 1) and not fold_done(out, 0)
    with pytest.raises(InputError, match=r"fold\(s\) 0 of 2 not finished"):
        collect(out, config)
    assert not (out / "results.json").exists() and not (out / "oof_predictions.csv").exists()
    other = CVConfig(**{**FAST, "modality": "clinical", "model": "coxph", "seed": 1})
    with pytest.raises(InputError, match="different configuration"):
        run_fold(crops.root, out, other, 0)
    with pytest.raises(InputError, match="different configuration"):
        collect(out, other)
    with pytest.raises(InputError, match="fold 2 does not exist"):
        run_fold(crops.root, out, config, 2)
    run_fold(crops.root, out, config, 0)
    collect(out)  # the folder's own configuration
    assert_same_run(sequential["cox"], out)


def test_cli_config_file_and_collect(crops, sequential, tmp_path, capsys):
    out = tmp_path / "cox"
    shutil.copytree(sequential["cox"], out)
    for name in ("results.json", "oof_predictions.csv"):
        (out / name).unlink()
    assert main(["cv", "--out", str(out), "--collect"]) == 0  # configuration from the folder
    assert main(["cv", "--out", str(out), "--collect", "--config", str(out / "config.json")]) == 0
    assert_same_run(sequential["cox"], out)
    assert main(["cv", "--out", str(out), "--collect", "--lr", "0.5"]) == 2
    assert "--lr cannot be combined with --collect" in capsys.readouterr().err
    assert main(["cv", "--out", str(out), "--fold", "0"]) == 2
    assert "--crops is required" in capsys.readouterr().err


def _tiny_grid(crops, root, names=("cox", "img")) -> grid.Grid:
    return grid.plan(crops, root, [CONFIGS[n] for n in names])


def test_grid_on_two_cpu_slots_equals_sequential_runs_names_a_failing_unit_and_resumes(
        crops, sequential, tmp_path, monkeypatch, capsys):
    good = _tiny_grid(crops, tmp_path)
    assert [(u.config.name, u.fold, u.done) for u in good.units] == [
        ("clinical-coxph", 0, False), ("clinical-coxph", 1, False),
        ("imaging-resnet18", 0, False), ("imaging-resnet18", 1, False)]
    assert {u.folder for u in good.units} == {pipeline.cv_folder(crops, tmp_path, c) for c in CONFIGS.values()}
    bad_config = CVConfig(modality="imaging", epochs=1, batch_size=8, weights=str(tmp_path / "missing.pt"), **FAST)
    bad = grid.plan(crops, tmp_path, [bad_config]).units[0]
    g = grid.Grid(good.crops_dir, good.root, (bad, *good.units))
    monkeypatch.setattr(grid, "book_grid", lambda s: g)  # the CLI on this tiny grid
    code = main(["grid", "run", "--slots", "2", "--profile", "ci", "--output", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1
    assert f"unit {bad.label} (repeat 0) failed (exit status 2)" in err and f"log: {g.log_path(bad)}" in err
    assert "weights file not found" in g.log_path(bad).read_text() and f"unfinished: {bad.folder.name}" in err
    assert all(u.done for u in good.units)  # the other units went on
    for name, config in CONFIGS.items():
        assert_same_run(sequential[name], pipeline.cv_folder(crops, tmp_path, config))
        # the book's cached call reads the grid's folder back instead of training
        with mock.patch.object(cv_module, "run_cv", side_effect=AssertionError("retrained")):
            summary = pipeline.run_cv(crops, tmp_path, config).summary
        assert summary == json.loads((sequential[name] / "results.json").read_text())["summary"]
    logs = {p: p.stat().st_mtime_ns for p in (tmp_path / "grid" / "logs").iterdir()}
    assert len(logs) == 5
    assert grid.run_local(good, slots=2, progress=False) == []  # resume: nothing left to run
    assert {p: p.stat().st_mtime_ns for p in logs} == logs
    assert grid.collect(good) == ([], {})  # already collected


def test_plan_cli_writes_the_units_table(crops, tmp_path, monkeypatch, capsys):
    g = _tiny_grid(crops, tmp_path, ("cox",))
    run_fold(crops.root, g.units[1].folder, CONFIGS["cox"], 1)
    monkeypatch.setattr(grid, "book_grid", lambda s: g)
    assert main(["grid", "plan", "--profile", "ci", "--csv", str(tmp_path / "plan.csv"),
                 "--json", str(tmp_path / "plan.json")]) == 0
    assert "2 units (1 configurations, profile ci), 1 to run" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "plan.csv")
    assert table[["configuration", "repeat", "fold", "done"]].values.tolist() == [
        ["clinical-coxph", 0, 0, False], ["clinical-coxph", 0, 1, True]]
    assert json.loads((tmp_path / "plan.json").read_text()) == json.loads(table.to_json(orient="records"))
    assert main(["grid", "collect", "--profile", "ci"]) == 1  # fold 0 not trained
    assert "unfinished: " + g.units[0].folder.name + " (folds 0)" in capsys.readouterr().err


def test_submit_through_submitit_local_executor(crops, sequential, tmp_path):
    g = _tiny_grid(crops, tmp_path, ("cox",))
    run_fold(crops.root, g.units[1].folder, CONFIGS["cox"], 1)  # finished units are not submitted
    executor = grid.slurm_executor(g.work_dir / "submitit", cluster="local", cpus_per_task=1, time_min=5)
    jobs, failures = grid.submit(g, executor, progress=False)
    assert len(jobs) == 1 and failures == []
    assert len(grid.collect(g)[0]) == 1
    assert_same_run(sequential["cox"], g.units[0].folder)


def _slurm_node() -> str | None:
    """Why there is no usable SLURM node here (None: there is one; .ci/slurm-up.sh makes one)."""
    if shutil.which("sinfo") is None:
        return "no SLURM client (sinfo) on this machine; .ci/slurm-up.sh installs a one-node cluster"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "sinfo timed out"
    if not {"idle", "mixed"} & set(states.stdout.split()):
        return f"no idle SLURM node: {(states.stdout + states.stderr).strip() or 'sinfo printed nothing'}"
    return None


@pytest.mark.slurm
def test_submit_to_a_real_slurm_cluster(crops, sequential, tmp_path):
    reason = _slurm_node()
    if reason:
        pytest.skip(reason)
    g = _tiny_grid(crops, tmp_path, ("cox",))
    executor = grid.slurm_executor(g.work_dir / "submitit", cpus_per_task=1, time_min=5)
    jobs, _ = grid.submit(g, executor, wait=False)
    assert sorted(j.job_id.split("_")[1] for j in jobs) == ["0", "1"]  # one job array, a task per unit
    assert grid.collect(g)[1] == {g.units[0].folder.name: [0, 1]}  # submitted, not finished
    for job in jobs:
        job.result()
    assert len(grid.collect(g)[0]) == 1
    assert_same_run(sequential["cox"], g.units[0].folder)
    assert all(f"fold {u.fold} done" in g.log_path(u).read_text() for u in g.units)


# --------------------------------------------------------------------------- the grid is the book's


def _chapter_configs(profile: str, output_dir: Path) -> dict[str, CVConfig]:
    """Every configuration the chapters ask for, recorded by executing their code with every
    cross-validation (pipeline.run_cv, cv.run_cv) and the data stages replaced by stand-ins.

    Each top-level statement runs on its own and may fail on a stand-in result (an analysis
    step); what this could miss is a run asked for later in the very statement that failed.
    """
    recorded: dict[str, CVConfig] = {}

    def record(config):
        recorded[json.dumps(config.run_defining(), sort_keys=True)] = config
        return mock.MagicMock(name=config.name)

    with mock.patch.object(pipeline, "run_cv", side_effect=lambda crops, root, config: record(config)), \
            mock.patch.object(cv_module, "run_cv", side_effect=lambda crops, out, config, **kw: record(config)), \
            mock.patch.object(book, "crops", return_value=mock.MagicMock()), \
            mock.patch.object(book, "cohort", return_value=mock.MagicMock()), \
            mock.patch.object(book, "start", side_effect=lambda **p: book.settings(**p, show_progress=False)), \
            mock.patch.object(book, "reader_weights", return_value=output_dir / "reader.safetensors"), \
            mock.patch("matplotlib.pyplot.show"):
        for path in runner.chapter_paths():
            namespace: dict = {}
            for cell in nbformat.read(path, as_version=4).cells:
                if cell.cell_type != "code":
                    continue
                for statement in ast.parse(cell.source).body:
                    try:
                        exec(compile(ast.Module([statement], []), path.name, "exec"), namespace)
                    except Exception:  # a stand-in result broke an analysis step: go on
                        pass
                if "parameters" in cell.metadata.get("tags", []):  # as papermill injects them
                    namespace.update(profile=profile, output_dir=str(output_dir))
    return recorded


@pytest.mark.parametrize("profile", ["ci", "paper"])
def test_the_grid_holds_exactly_the_configurations_the_chapters_ask_for(profile, tmp_path):
    s = book.settings(profile=profile, output_dir=tmp_path)
    planned = {json.dumps(c.run_defining(), sort_keys=True): c.name for c in book.cv_configs(s)}
    asked = {key: c.name for key, c in _chapter_configs(profile, tmp_path).items()}
    # the lesion reader's runs are the chapters' own: they need the reader first and take seconds
    readers = {key for key, name in asked.items() if name.endswith("-reader")}
    assert sorted(asked[key] for key in readers) == ["imaging-reader", "multimodal-reader"]
    asked = {key: name for key, name in asked.items() if key not in readers}
    assert sorted(asked.values()) == sorted(planned.values()) and asked.keys() == planned.keys()
    repeats = book.PROFILES[profile].repeats
    assert len(planned) == len(book.ablation_specs(s)) + 3 * (repeats - 1)
