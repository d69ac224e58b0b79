"""The book's profiles, settings, the profile's run configurations and the stored chapters."""

from __future__ import annotations

import nbformat
import pytest

from psma_lib import book, runner
from psma_lib.errors import InputError
from psma_lib.vocabulary import DEFAULT_STEM

CHAPTER_FILES = sorted(runner.CHAPTERS_DIR.glob("*.ipynb"))


def test_profiles_scale_up_from_ci_to_paper():
    ci, quick, paper = (book.PROFILES[p] for p in ("ci", "quick", "paper"))
    assert ci.patients < quick.patients == paper.patients == 99
    assert ci.epochs < quick.epochs <= paper.epochs  # longer schedules over-fit (docs/METHOD.md)
    assert ci.size_mm <= quick.size_mm < paper.size_mm
    # ResNet-34/50 and the 3D r3d_18 only in paper: the quick book fits in 10 minutes on 2 cores
    assert ci.backbones == quick.backbones == ("resnet18",)
    assert set(paper.backbones) == {"resnet18", "resnet34", "resnet50", "r3d_18"}


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
    monkeypatch.chdir(runner.CHAPTERS_DIR)
    assert book.settings(profile="ci", output_dir="_build/y").output_dir == book.REPO_ROOT / "_build" / "y"
    assert book.resolve_path(tmp_path / "abs") == tmp_path / "abs"


def test_bad_parameters_raise_one_clear_input_error(tmp_path):
    with pytest.raises(InputError, match="unknown book profile 'huge'"):
        book.settings(profile="huge")
    with pytest.raises(InputError, match="unknown backbone"):
        book.settings(profile="ci", backbones=["vgg16"])
    with pytest.raises(InputError, match="manifest not found"):
        book.settings(profile="ci", manifest=tmp_path / "missing.yaml")
    s = book.settings(profile="ci", output_dir=tmp_path)
    with pytest.raises(InputError, match="unknown modality"):
        book.cv_config(s, "pet-only")
    with pytest.raises(InputError, match="no image backbone"):
        book.cv_config(s, "clinical", "mlp", "resnet50")


def test_reader_runs_take_the_given_reader_and_refuse_a_real_cohort_without_one(tmp_path, monkeypatch):
    weights = tmp_path / "reader.safetensors"
    weights.write_bytes(b"x")
    s = book.settings(profile="ci", output_dir=tmp_path, reader_weights=weights)
    assert book.reader_weights(s) == weights
    config = book.cv_config(s, "multimodal", "reader")
    assert (config.model, config.weights, config.aggregation) == ("reader", str(weights), "sum")
    with pytest.raises(InputError, match="reader weights not found"):
        book.settings(profile="ci", reader_weights=tmp_path / "missing.safetensors")
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text("cohort: {}\n")
    real = book.settings(profile="ci", output_dir=tmp_path, manifest=manifest)
    assert book.reader_weights(real) is None
    with pytest.raises(InputError, match="reader_weights"):
        book.cv_config(real, "imaging", "reader")
    assert book.reader_runs(real) == {}  # the chapters skip the reader there
    # the synthetic cohort's own reader: pretrained on another draw of the generator, the profile's size
    calls = []
    monkeypatch.setattr(book, "pretrained_encoder", lambda s, **kw: calls.append(kw) or weights)
    assert book.reader_weights(book.settings(profile="quick", output_dir=tmp_path, seed=3)) == weights
    assert calls == [dict(seed=3 + book.PRETRAIN_SEED_OFFSET, patients=book.PROFILES["quick"].pretrain_patients,
                          epochs=book.PROFILES["quick"].pretrain_epochs,
                          batch_size=book.PROFILES["quick"].pretrain_batch_size)]


def test_cv_configs_follow_the_profile(tmp_path):
    s = book.settings(profile="ci", output_dir=tmp_path)
    mm = book.cv_config(s, "multimodal")
    assert (mm.model, mm.backbone, mm.epochs, mm.aggregation, mm.n_bootstrap) == ("resnet", "resnet18", 2, "sum", 200)
    assert book.cv_config(s, "multimodal", backbone="resnet34").backbone == "resnet34"
    # the clinical MLP has its own, longer schedule and no backbone; coxph has no schedule at all
    mlp = book.cv_config(s, "clinical")
    assert (mlp.model, mlp.backbone, mlp.epochs, mlp.lr) == ("mlp", None, 300, 1e-2)
    assert book.cv_config(s, "clinical", "coxph").model == "coxph"
    defining = {name: book.cv_config(s, *run).run_defining()
                for name, run in (("mm", ("multimodal",)), ("img", ("imaging",)), ("mlp", ("clinical",)),
                                  ("cox", ("clinical", "coxph")))}
    assert len({str(sorted(d.items())) for d in defining.values()}) == 4
    other_seed = book.cv_config(book.settings(profile="ci", output_dir=tmp_path, seed=1), "multimodal")
    assert other_seed.run_defining() != mm.run_defining()
    # repeats draw new folds from seed + r; baselines differ only in their covariates
    assert book.cv_config(s, "multimodal", repeat=2).seed == s.seed + 2
    assert book.cv_config(s, "clinical", "coxph", covariates="count").covariates == "count"
    assert book.PROFILES["paper"].repeats >= 5 and book.PROFILES["quick"].repeats == 1


def test_cpu_profiles_keep_the_standard_stem_and_paper_takes_the_default(tmp_path):
    for profile in ("ci", "quick"):  # their 10-minute budgets on 2 cores; their runs keep their identity
        config = book.cv_config(book.settings(profile=profile, output_dir=tmp_path), "imaging")
        assert config.stem == "standard" and "stem" not in config.run_defining()
    paper = book.settings(profile="paper", output_dir=tmp_path)
    assert book.cv_config(paper, "multimodal").stem == DEFAULT_STEM == "no-maxpool"
    assert book.cv_config(paper, "multimodal", backbone="r3d_18").stem == "standard"
    book.cv_config(paper, "multimodal", backbone="r3d_18").validate()


def test_the_book_has_its_chapters_in_toc_order():
    assert [p.stem for p in CHAPTER_FILES] == list(runner.CHAPTERS)
    toc = (book.REPO_ROOT / "_toc.yml").read_text()
    positions = [toc.index(f"chapters/{name}") for name in runner.CHAPTERS]
    assert positions == sorted(positions)


@pytest.mark.parametrize("path", CHAPTER_FILES, ids=lambda p: p.stem)
def test_chapters_are_stored_without_outputs_and_with_one_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    names = ("profile", "output_dir", "manifest", "device", "seed", "epochs", "backbones")
    for name in names:
        assert f"{name} = " in tagged[0].source
    # the one-call preamble passes every parameter, and every page ends with its provenance
    start = code[code.index(tagged[0]) + 1].source
    assert "book.start(" in start and all(f"{n}={n}" in start for n in names)
    assert code[-1].source == "book.reproducibility_box(s)"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")


def test_intro_profile_table_matches_the_code():
    rows = {line.split("|")[1].strip(" `"): line for line in
            (book.REPO_ROOT / "intro.md").read_text().splitlines() if line.startswith("| `")}
    for name, prof in book.PROFILES.items():
        cells = [c.strip() for c in rows[name].split("|")]
        assert cells[3] == f"{prof.size_mm:g} mm at {prof.spacing_mm:g} mm"
        assert cells[4] == str(prof.epochs)
        assert all(b.replace("resnet", "") in cells[5] for b in prof.backbones)
        assert cells[6] == f"{prof.pretrain_patients} other synthetic patients, {prof.pretrain_epochs} epochs"
