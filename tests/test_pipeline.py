"""The cached stages: each runs once per configuration and data, then is read back."""

from __future__ import annotations

import pytest

from psma_lib import cv, pipeline
from psma_lib.crop import load_crops
from psma_lib.cv import CVConfig
from psma_lib.testing import write_tiny_crops

COXPH = dict(modality="clinical", model="coxph", folds=3, seed=5, n_bootstrap=50, progress=False)


def must_not_run(*_args, **_kwargs):
    raise AssertionError("a cached step ran again")


def test_cache_key_changes_with_every_parameter():
    base = {"size_mm": 64, "spacing_mm": 2, "data": "abc"}
    key = pipeline.cache_key("crops", **base)
    assert key == pipeline.cache_key("crops", **dict(reversed(base.items())))
    for name, other in (("size_mm", 48), ("spacing_mm", 3), ("data", "abd")):
        assert pipeline.cache_key("crops", **{**base, name: other}) != key
    assert pipeline.cache_key("cv", **base) != key


def test_cohort_and_crops_are_made_once(tmp_path, monkeypatch):
    from psma_lib import crop, synthetic

    def fake_generate(out, **_kwargs):
        out.mkdir(parents=True)
        (out / "manifest.yaml").write_text("format: psma-pfs-manifest\n")

    monkeypatch.setattr(synthetic, "generate_cohort", fake_generate)
    monkeypatch.setattr(crop, "crop_cohort", lambda _manifest, out, **_kw: write_tiny_crops(out))
    cohort = pipeline.generate_cohort(tmp_path, patients=24, seed=0)
    crops = pipeline.crop_cohort(cohort, tmp_path, size_mm=32, spacing_mm=2)
    assert cohort.root.parent == tmp_path and crops.root.parent == tmp_path and crops.n_lesions > 24
    monkeypatch.setattr(synthetic, "generate_cohort", must_not_run)
    monkeypatch.setattr(crop, "crop_cohort", must_not_run)
    assert pipeline.generate_cohort(tmp_path, patients=24, seed=0) == cohort
    assert pipeline.crop_cohort(cohort, tmp_path, size_mm=32, spacing_mm=2).root == crops.root
    # another size is another folder: it would be cropped
    with pytest.raises(AssertionError, match="ran again"):
        pipeline.crop_cohort(cohort, tmp_path, size_mm=48, spacing_mm=2)


def test_cv_runs_once_then_reads_its_stored_results(tiny_crops, tmp_path, monkeypatch):
    crops = load_crops(tiny_crops)
    run = pipeline.run_cv(crops, tmp_path, CVConfig(**COXPH))
    assert run.out_dir.parent == tmp_path / "cv" and run.out_dir.name.startswith("clinical-coxph-")
    assert len(run.oof) == 24 and run.oof["fold"].nunique() == 3
    monkeypatch.setattr(cv, "run_cv", must_not_run)
    again = pipeline.run_cv(crops, tmp_path, CVConfig(**COXPH))
    assert again.out_dir == run.out_dir and again.summary == run.summary and again.config == run.config
    assert list(again.train_predictions.columns) == ["fold", "patient_id", "risk"]
    # every result-defining field is in the key: a changed one is a new run
    for changed in ({"n_bootstrap": 60}, {"seed": 6}, {"folds": 4}):
        with pytest.raises(AssertionError, match="ran again"):
            pipeline.run_cv(crops, tmp_path, CVConfig(**{**COXPH, **changed}))
    # progress changes nothing the run computes: same folder
    assert pipeline.run_cv(crops, tmp_path, CVConfig(**{**COXPH, "progress": True})).out_dir == run.out_dir


def test_cv_key_includes_the_data_checksum(tiny_crops, tmp_path, monkeypatch):
    first = pipeline.run_cv(load_crops(tiny_crops), tmp_path, CVConfig(**COXPH))
    other = load_crops(tiny_crops)
    other.meta["data_checksum"] = "another cohort"
    monkeypatch.setattr(cv, "run_cv", must_not_run)
    with pytest.raises(AssertionError, match="ran again"):
        pipeline.run_cv(other, tmp_path, CVConfig(**COXPH))
    assert pipeline.run_cv(load_crops(tiny_crops), tmp_path, CVConfig(**COXPH)).out_dir == first.out_dir


def test_stage_warnings_become_notes_on_stdout(tiny_crops, tmp_path, monkeypatch, capsys):
    import warnings

    def warn_twice(*_args, **_kwargs):
        warnings.warn("near-constant column. Details follow", UserWarning, stacklevel=1)
        warnings.warn("near-constant column. Details follow", UserWarning, stacklevel=1)
        raise RuntimeError("stop")

    monkeypatch.setattr(cv, "run_cv", warn_twice)
    with pytest.raises(RuntimeError):
        pipeline.run_cv(load_crops(tiny_crops), tmp_path, CVConfig(**COXPH))
    captured = capsys.readouterr()
    assert captured.out.count("note: psma-pfs cv warned: UserWarning: near-constant column\n") == 1
    assert captured.err == ""
