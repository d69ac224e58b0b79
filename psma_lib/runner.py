"""``psma-pfs book``: execute the chapters with papermill and build the HTML book.

Executed notebooks go to ``_build/book/<profile>/chapters/`` beside copies of the book's
``_config.yml``, ``_toc.yml`` and ``intro.md``; jupyter-book (no execution, warnings are errors)
builds that tree into ``_build/html``. The chapters find their cached results in the output folder
(see :mod:`psma_lib.pipeline`), so re-running the book after ``nbval`` or an earlier run only
re-executes the pages.

>>> [p.name for p in chapter_paths(["04"])]
['04_ablation.ipynb']
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .book import PROFILES, REPO_ROOT, settings
from .errors import InputError

CHAPTERS_DIR = REPO_ROOT / "chapters"
BUILD_DIR = REPO_ROOT / "_build"
CHAPTERS = (
    "01_data_preparation",
    "02_clinical_baseline",
    "03_resnet_cox_model",
    "04_ablation",
    "05_kaplan_meier",
    "06_what_do_the_images_add",
    "07_discussion",
)
BOOK_FILES = ("_config.yml", "_toc.yml", "intro.md", "docs/pipeline.svg")
INJECTED_TAG = "injected-parameters"


def hide_parameter_cells(nb) -> int:
    """Tag papermill's injected cell ``remove-cell`` and fold the defaults cell (``hide-cell``).

    The injected cell only repeats the run's parameters, which each chapter shows as a table;
    returns the number of cells changed. Works on an ``nbformat`` notebook in place.
    """
    changed = 0
    for cell in nb.cells:
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        new = ("remove-cell" if INJECTED_TAG in tags else
               "hide-cell" if "parameters" in tags else None)
        if new and new not in tags:
            tags.append(new)
            changed += 1
    return changed


def chapter_paths(chapters: Sequence[str] | None = None) -> list[Path]:
    """Chapter notebooks to run, in book order; ``chapters`` selects by number or name prefix."""
    names = list(CHAPTERS)
    if chapters:
        wanted = [str(c) for c in chapters]
        names = [n for n in CHAPTERS if any(n.startswith(w) for w in wanted)]
        unmatched = [w for w in wanted if not any(n.startswith(w) for n in CHAPTERS)]
        if unmatched:
            raise InputError(f"unknown chapter(s) {unmatched}; chapters are {list(CHAPTERS)}")
    return [CHAPTERS_DIR / f"{n}.ipynb" for n in names]


def execute_chapter(path: Path, out: Path, parameters: dict, prepare_only: bool = False) -> None:
    """Execute one chapter with papermill (cwd ``chapters/``, kernel ``python3``) into ``out``,
    then hide its parameter cells (:func:`hide_parameter_cells`).

    ``prepare_only`` injects the parameters without running anything (papermill's own option).
    A failing cell raises :class:`InputError` naming the chapter and the executed notebook.
    """
    import nbformat
    import papermill

    try:
        papermill.execute_notebook(str(path), str(out), parameters=parameters,
                                   cwd=str(CHAPTERS_DIR), kernel_name="python3",
                                   progress_bar=False, prepare_only=prepare_only)
    except papermill.PapermillExecutionError as exc:
        raise InputError(f"chapter {path.stem} failed: {exc.ename}: {exc.evalue} "
                         f"(the executed notebook shows the traceback: {out})") from exc
    nb = nbformat.read(out, as_version=4)
    hide_parameter_cells(nb)
    nbformat.write(nb, out)


def run_book(profile: str = "quick", output_dir: str | os.PathLike | None = None,
             manifest: str | os.PathLike | None = None, chapters: Sequence[str] | None = None,
             build_html: bool = True, device: str = "auto", seed: int = 0,
             reader_weights: str | os.PathLike | None = None) -> Path:
    """Execute the chapters with papermill, then build the HTML book into ``_build/html``.

    Nothing is written outside ``_build/`` (and the output folder). Returns the build tree.
    """
    s = settings(profile=profile, output_dir=output_dir, manifest=manifest, device=device, seed=seed,
                 reader_weights=reader_weights)
    params = {"profile": s.profile, "output_dir": str(s.output_dir),
              "manifest": str(s.manifest) if s.manifest else None, "device": s.device,
              "seed": s.seed, "reader_weights": str(s.reader_weights) if s.reader_weights else None}
    tree = BUILD_DIR / "book" / s.profile
    (tree / "chapters").mkdir(parents=True, exist_ok=True)
    paths = chapter_paths(chapters)
    start = time.monotonic()
    for i, path in enumerate(paths, 1):
        out = tree / "chapters" / path.name
        t0 = time.monotonic()
        print(f"[book {i}/{len(paths)}] {path.stem}: running (profile {s.profile}) ...", flush=True)
        execute_chapter(path, out, params)
        print(f"[book {i}/{len(paths)}] {path.stem}: done in {time.monotonic() - t0:.0f} s "
              f"(total {time.monotonic() - start:.0f} s)", flush=True)
    if build_html:
        build_html_book(tree)
        print(f"[book] HTML in {BUILD_DIR / 'html'} (total {time.monotonic() - start:.0f} s)")
    return tree


def build_html_book(tree: Path) -> Path:
    """Copy the book's sources into ``tree`` and build it with jupyter-book into ``_build/html``.

    Every chapter in ``_toc.yml`` must already be executed into ``tree/chapters``.
    """
    for name in BOOK_FILES:
        target = tree / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, target)
    missing = [p.name for p in chapter_paths() if not (tree / "chapters" / p.name).is_file()]
    if missing:
        raise InputError(f"cannot build the HTML book: chapters not executed yet: {missing} "
                         f"(run them, e.g. psma-pfs book --chapters 01 ...)", file=str(tree))
    site = tree / "site"
    jb = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(jb) if jb.exists() else "jupyter-book", "build", str(tree), "--path-output",
           str(site), "--builder", "html", "-W", "-n", "--keep-going"]
    print("[book] building HTML:", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-6000:] + done.stderr[-6000:])
        raise InputError(f"jupyter-book build failed (exit {done.returncode}); see output above",
                         file=str(tree))
    html_dir = BUILD_DIR / "html"
    if html_dir.exists():
        shutil.rmtree(html_dir)
    shutil.copytree(site / "_build" / "html", html_dir)
    return html_dir


def register_cli(subparsers) -> None:
    """``psma-pfs book --profile {ci,quick,paper} [--output DIR] [--manifest PATH] ...``."""
    p = subparsers.add_parser(
        "book", help="run every chapter with papermill and build the HTML book (_build/html)",
        description="Execute the chapters in order (papermill) and build the HTML book.")
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick",
                   help="ci (minutes), quick (default, <= 10 min on 2 cores), paper (one GPU)")
    p.add_argument("--output", default=None,
                   help="results folder (default _build/results/<profile>)")
    p.add_argument("--manifest", default=None,
                   help="a real cohort's manifest.yaml (default: the synthetic cohort)")
    p.add_argument("--chapters", nargs="+", default=None, metavar="NN",
                   help="run only these chapters (e.g. 01 04); implies --no-html unless all run")
    p.add_argument("--no-html", action="store_true", help="execute the chapters only")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reader-weights", default=None, metavar="FILE",
                   help="the lesion reader of the reader runs (psma-pfs pretrain on other patients' scans with "
                        "lesion masks); default: pretrained on another synthetic cohort (synthetic data only)")
    p.set_defaults(func=_cli_book)


def _cli_book(args) -> int:
    # Paths on the command line are relative to the caller's cwd, not the repository root.
    output = os.path.abspath(args.output) if args.output else None
    manifest = os.path.abspath(args.manifest) if args.manifest else None
    reader = os.path.abspath(args.reader_weights) if args.reader_weights else None
    partial = args.chapters is not None and len(chapter_paths(args.chapters)) < len(CHAPTERS)
    run_book(args.profile, output, manifest, args.chapters,
             build_html=not (args.no_html or partial), device=args.device, seed=args.seed, reader_weights=reader)
    return 0
