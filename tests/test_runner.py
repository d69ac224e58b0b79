"""The chapter runner (papermill, jupyter-book) and the rendered-HTML check; nbval executes the
chapters themselves."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import nbformat
import pytest

from psma_lib import book, runner
from psma_lib.errors import InputError


def test_post_processing_hides_the_injected_parameters_cell(tmp_path):
    # the runner's own path, with papermill told to inject the parameters without executing
    out = tmp_path / "04.ipynb"
    runner.execute_chapter(runner.CHAPTERS_DIR / "04_ablation.ipynb", out,
                           {"profile": "ci", "output_dir": str(tmp_path)}, prepare_only=True)
    nb = nbformat.read(out, as_version=4)
    injected = [c for c in nb.cells if runner.INJECTED_TAG in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "remove-cell" in injected[0].metadata.tags
    assert "profile = \"ci\"" in injected[0].source
    defaults = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(defaults) == 1 and "hide-cell" in defaults[0].metadata.tags
    others = [c for c in nb.cells if c not in injected + defaults]
    assert not any({"remove-cell", "hide-cell"} & set(c.metadata.get("tags", [])) for c in others)
    assert runner.hide_parameter_cells(nb) == 0  # idempotent


def test_chapter_selection_keeps_book_order():
    assert [p.stem for p in runner.chapter_paths(["04", "01"])] == ["01_data_preparation", "04_ablation"]
    assert len(runner.chapter_paths()) == 7
    with pytest.raises(InputError, match="unknown chapter"):
        runner.chapter_paths(["99"])


def test_building_html_refuses_a_tree_without_executed_chapters(tmp_path):
    with pytest.raises(InputError, match="chapters not executed yet"):
        runner.build_html_book(tmp_path)


def test_cli_parses_book_options():
    parser = argparse.ArgumentParser()
    runner.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["book", "--profile", "ci", "--chapters", "01", "04", "--no-html",
                              "--output", "out", "--manifest", "m.yaml"])
    assert (args.profile, args.chapters, args.no_html) == ("ci", ["01", "04"], True)
    assert (args.output, args.manifest) == ("out", "m.yaml")


def test_imports_stay_where_they_belong():
    # papermill and jupyter-book stay out of the chapters' own imports; torch out of the runner's
    import subprocess
    import sys

    code = ("import sys, psma_lib.book, psma_lib.report, psma_lib.analysis; "
            "print('psma_lib.runner' in sys.modules); "
            "from psma_lib import cli; cli.build_parser('book'); "
            "print('papermill' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"]


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


def test_book_cli_hands_the_lesion_reader_to_every_chapter(tmp_path, monkeypatch):
    (tmp_path / "reader.safetensors").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)  # a relative path is the caller's, as for --manifest
    seen = []
    monkeypatch.setattr(runner, "execute_chapter", lambda path, out, parameters: seen.append(parameters))
    parser = argparse.ArgumentParser()
    runner.register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["book", "--profile", "ci", "--output", "out", "--chapters", "01", "03",
                              "--reader-weights", "reader.safetensors"])
    assert args.func(args) == 0
    assert [p["reader_weights"] for p in seen] == [str(tmp_path / "reader.safetensors")] * 2
