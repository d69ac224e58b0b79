"""The book's runner, profiles, cache keys and chapters (no chapter is executed here: nbval does)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from psma_lib import book
from psma_lib.errors import InputError

CHAPTER_FILES = sorted(book.CHAPTERS_DIR.glob("*.ipynb"))


def test_profiles_scale_up_from_ci_to_paper():
    ci, quick, paper = (book.PROFILES[p] for p in ("ci", "quick", "paper"))
    assert ci.patients < quick.patients == paper.patients == 99
    assert ci.epochs < quick.epochs < paper.epochs
    assert ci.backbones == ("resnet18",)
    assert set(quick.backbones) == {"resnet18", "resnet34", "resnet50"}
    assert "r3d_18" in paper.backbones and "r3d_18" not in quick.backbones


def test_settings_defaults_come_from_environment(monkeypatch):
    monkeypatch.setenv("PSMA_BOOK_PROFILE", "ci")
    monkeypatch.setenv("PSMA_BOOK_OUTPUT", "_build/nbval-results")
    s = book.settings()
    assert s.profile == "ci" and s.epochs == book.PROFILES["ci"].epochs
    assert s.output_dir == book.REPO_ROOT / "_build" / "nbval-results"
    monkeypatch.delenv("PSMA_BOOK_PROFILE")
    monkeypatch.delenv("PSMA_BOOK_OUTPUT")
    s = book.settings()
    assert s.profile == "quick"
    assert s.output_dir == book.REPO_ROOT / "_build" / "results" / "quick"


def test_explicit_parameters_override_the_profile(tmp_path):
    s = book.settings(profile="quick", output_dir=tmp_path, epochs=7, backbones=["resnet34"])
    assert (s.epochs, s.backbones, s.main_backbone) == (7, ("resnet34",), "resnet34")
    assert s.output_dir == tmp_path


def test_relative_paths_resolve_against_the_repository_not_the_cwd(tmp_path, monkeypatch):
    # nbval runs chapters with cwd = chapters/, papermill with the runner's cwd: same folder.
    monkeypatch.chdir(tmp_path)
    assert book.resolve_path("_build/x") == book.REPO_ROOT / "_build" / "x"
    monkeypatch.chdir(book.CHAPTERS_DIR)
    assert book.settings(profile="ci", output_dir="_build/y").output_dir == book.REPO_ROOT / "_build" / "y"
    assert book.resolve_path(tmp_path / "abs") == tmp_path / "abs"


def test_bad_parameters_raise_one_clear_input_error(tmp_path):
    with pytest.raises(InputError, match="unknown book profile 'huge'"):
        book.settings(profile="huge")
    with pytest.raises(InputError, match="unknown backbone"):
        book.settings(profile="ci", backbones=["vgg16"])
    with pytest.raises(InputError, match="manifest not found"):
        book.settings(profile="ci", manifest=tmp_path / "missing.yaml")
    with pytest.raises(InputError, match="unknown chapter"):
        book.chapter_paths(["99"])


def test_cache_key_changes_with_every_parameter():
    base = {"size_mm": 64, "spacing_mm": 2, "data": "abc"}
    key = book.cache_key("crops", **base)
    assert key == book.cache_key("crops", **dict(reversed(base.items())))
    for name, other in (("size_mm", 48), ("spacing_mm", 3), ("data", "abd")):
        assert book.cache_key("crops", **{**base, name: other}) != key
    assert book.cache_key("cv", **base) != key


def test_cv_cache_key_depends_on_the_run(monkeypatch, tmp_path):
    monkeypatch.setattr(book, "data_checksum", lambda s: "checksum-1")
    s = book.settings(profile="ci", output_dir=tmp_path)
    key = book.cv_key(s, "multimodal", "resnet18")
    assert book.cv_key(s, "imaging", "resnet18") != key
    assert book.cv_key(s, "multimodal", "resnet34") != key
    assert book.cv_key(book.settings(profile="ci", output_dir=tmp_path, epochs=3), "multimodal", "resnet18") != key
    assert book.cv_key(book.settings(profile="ci", output_dir=tmp_path, seed=1), "multimodal", "resnet18") != key
    # the clinical MLP ignores the image backbone, the classical Cox model is its own run
    assert book.cv_key(s, "clinical", "resnet18") == book.cv_key(s, "clinical", "resnet50")
    assert book.cv_key(s, "clinical", "coxph") != book.cv_key(s, "clinical", "resnet18")
    monkeypatch.setattr(book, "data_checksum", lambda s: "checksum-2")
    assert book.cv_key(s, "multimodal", "resnet18") != key


def test_the_book_has_six_chapters_in_toc_order():
    assert [p.stem for p in CHAPTER_FILES] == list(book.CHAPTERS)
    toc = (book.REPO_ROOT / "_toc.yml").read_text()
    positions = [toc.index(f"chapters/{name}") for name in book.CHAPTERS]
    assert positions == sorted(positions)


@pytest.mark.parametrize("path", CHAPTER_FILES, ids=lambda p: p.stem)
def test_chapters_are_stored_without_outputs_and_with_one_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for name in ("profile", "output_dir", "manifest", "device", "seed", "epochs", "backbones"):
        assert f"{name} = " in tagged[0].source
    sources = "\n".join(c.source for c in code)
    assert "book.data_banner(s)" in sources and "book.reproducibility_box(s)" in sources
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")


def test_post_processing_hides_the_injected_parameters_cell(tmp_path):
    # the runner's own path, with papermill told to inject the parameters without executing
    out = tmp_path / "04.ipynb"
    book.execute_chapter(book.CHAPTERS_DIR / "04_ablation.ipynb", out,
                         {"profile": "ci", "output_dir": str(tmp_path)}, prepare_only=True)
    nb = nbformat.read(out, as_version=4)
    injected = [c for c in nb.cells if book.INJECTED_TAG in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "remove-cell" in injected[0].metadata.tags
    assert "profile = \"ci\"" in injected[0].source
    defaults = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(defaults) == 1 and "hide-cell" in defaults[0].metadata.tags
    others = [c for c in nb.cells if c not in injected + defaults]
    assert not any({"remove-cell", "hide-cell"} & set(c.metadata.get("tags", [])) for c in others)
    assert book.hide_parameter_cells(nb) == 0  # idempotent


def test_chapter_selection_keeps_book_order():
    assert [p.stem for p in book.chapter_paths(["04", "01"])] == ["01_data_preparation", "04_ablation"]
    assert len(book.chapter_paths()) == 6


def test_building_html_refuses_a_tree_without_executed_chapters(tmp_path):
    with pytest.raises(InputError, match="chapters not executed yet"):
        book.build_html_book(tmp_path)


def test_cli_parses_book_options():
    import argparse

    parser = argparse.ArgumentParser()
    book.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["book", "--profile", "ci", "--chapters", "01", "04", "--no-html",
                              "--output", "out", "--manifest", "m.yaml"])
    assert (args.profile, args.chapters, args.no_html) == ("ci", ["01", "04"], True)
    assert (args.output, args.manifest) == ("out", "m.yaml")


def test_risk_groups_use_training_fold_cutoffs_only(tmp_path):
    oof = pd.DataFrame({"patient_id": ["a", "b", "c", "d"], "fold": [0, 0, 1, 1],
                        "risk": [0.4, 0.6, 5.0, 7.0], "pfs_months": [10.0, 5.0, 8.0, 3.0],
                        "event": [1, 1, 0, 1]})
    train = pd.DataFrame({"fold": [0, 0, 0, 1, 1, 1], "patient_id": ["c", "d", "e", "a", "b", "e"],
                          "risk": [0.0, 0.5, 1.0, 6.0, 8.0, 9.0]})
    oof.to_csv(tmp_path / "oof_predictions.csv", index=False)
    train.to_csv(tmp_path / "train_predictions.csv", index=False)
    groups = book.risk_groups(tmp_path)
    # fold 0 cutoff = median(0, .5, 1) = .5; fold 1 cutoff = median(6, 8, 9) = 8: the test risks
    # (5 and 7, both below 8) are low although one of them is the fold's higher test risk.
    assert groups.set_index("patient_id")["cutoff"].to_dict() == {"a": 0.5, "b": 0.5, "c": 8.0, "d": 8.0}
    assert groups.set_index("patient_id")["group"].to_dict() == {"a": "low", "b": "high",
                                                                  "c": "low", "d": "low"}


def test_lesion_site_table_counts_and_medians():
    lesions = pd.DataFrame({"patient_id": ["p1", "p1", "p2", "p3"],
                            "site": ["bone", "bone", "lymph_node", ""],
                            "suvmax": [10.0, 20.0, 5.0, 7.0], "volume_ml": [1.0, 3.0, 2.0, 0.5]})
    table = book.lesion_site_table(lesions).set_index("Site")
    assert table.loc["bone", "Lesions, n (%)"] == "2 (50 %)"
    assert table.loc["bone", "SUVmax, median (IQR)"] == "15.0 (12.5–17.5)"
    assert table.loc["unknown", "Patients, n"] == 1


def test_montage_selection_spans_each_sites_suvmax_range():
    lesions = pd.DataFrame({"site": ["bone"] * 5 + ["visceral"],
                            "suvmax": [3.0, 50.0, 10.0, 20.0, 5.0, 8.0]})
    picks = book.montage_selection(lesions, per_site=3)
    assert lesions.loc[picks, "suvmax"].tolist() == [3.0, 10.0, 50.0, 8.0]


def test_architecture_summary_counts_every_parameter():
    from psma_lib.models import CLINICAL_COLUMNS, SurvivalModel

    table = book.architecture_summary("multimodal", "resnet18", (2, 32, 32))
    model = SurvivalModel("multimodal", "resnet18", n_clinical=len(CLINICAL_COLUMNS))
    counts = table.set_index("Block")["Parameters"].str.replace(",", "").astype(int)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts.drop("total").sum() == counts["total"]
    assert table.set_index("Block").loc["layer4", "Output shape"] == "1 × 512 × 1 × 1"


@pytest.mark.skipif(shutil.which("chromedriver") is None, reason="needs chromium-driver (make browser)")
def test_htmlcheck_catches_broken_images_and_tracebacks(tmp_path):
    from psma_lib import htmlcheck

    nav = ('<nav class="bd-links"><a href="good.html">Good</a><a href="bad.html">Bad</a></nav>')
    png = Path(book.REPO_ROOT / "docs" / "pipeline.svg")
    shutil.copy(png, tmp_path / "pipeline.svg")
    page = "<html><head><title>{t}</title></head><body>{nav}<article><h1>{t}</h1>{body}</article></body></html>"
    (tmp_path / "index.html").write_text(page.format(t="Home", nav=nav, body=""))
    (tmp_path / "good.html").write_text(page.format(t="Good", nav=nav, body='<img src="pipeline.svg">'))
    (tmp_path / "bad.html").write_text(page.format(
        t="Bad", nav=nav, body='<img src="missing.png"><pre>Traceback (most recent call last):</pre>'))
    results = {r.page: r for r in htmlcheck.check_book(tmp_path)}
    assert results["good.html"].ok and results["good.html"].n_images == 1
    problems = " ".join(results["bad.html"].problems)
    assert "missing.png" in problems and "traceback" in problems
    assert htmlcheck.main([str(tmp_path)]) == 1


def test_docstring_examples_run():
    import doctest

    from psma_lib import plots

    for module in (book, plots):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0


def test_intro_profile_table_matches_the_code():
    rows = {line.split("|")[1].strip(" `"): line for line in
            (book.REPO_ROOT / "intro.md").read_text().splitlines() if line.startswith("| `")}
    for name, prof in book.PROFILES.items():
        cells = [c.strip() for c in rows[name].split("|")]
        assert cells[3] == f"{prof.size_mm:g} mm at {prof.spacing_mm:g} mm"
        assert cells[4] == str(prof.epochs)
        assert all(b.replace("resnet", "") in cells[5] for b in prof.backbones)


def test_ensure_cv_runs_once_then_reuses_its_cached_result(tiny_crops, tmp_path, monkeypatch):
    # the classical Cox baseline on a tiny crops folder: a real `psma-pfs cv` run, seconds long
    monkeypatch.setattr(book, "ensure_crops", lambda s: tiny_crops)
    monkeypatch.setattr(book, "data_checksum", lambda s: "tiny")
    s = book.settings(profile="ci", output_dir=tmp_path, show_progress=False)
    run = book.ensure_cv(s, "clinical", "coxph")
    assert run.parent == tmp_path / "cv" and (run / "results.json").is_file()
    oof = book.read_ids_csv(run / "oof_predictions.csv")
    assert len(oof) == 24 and oof["fold"].nunique() == s.folds

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("a cached step ran again")

    monkeypatch.setattr(book, "_run_stage", must_not_run)
    assert book.ensure_cv(s, "clinical", "coxph") == run
    table = book.ablation_table(s, [{"modality": "clinical", "backbone": "—",
                                     "model": "Cox (lifelines)", "dir": run}])
    assert table.loc[0, "Paper's fold range"] == "0.53–0.65"
    groups = book.risk_groups(run)
    assert set(groups["group"]) <= {"high", "low"} and len(groups) == 24
    km, p = book.km_table(groups)
    assert 0 <= p <= 1 and set(km["Paper, months"]) <= {"19.7", "26.0"}
