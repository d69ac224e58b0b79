"""Open the built HTML book in headless Chromium and check what a reader would see.

``python -m psma_lib.htmlcheck _build/html [--screenshots DIR]``

For every page in the book's table of contents (read from the built ``index.html``'s
navigation, plus the landing page) it checks that the page renders with a title, that every
``<img>`` loaded (``complete`` and ``naturalWidth > 0``) and that no cell output shows an error
(stderr/error output classes, or a Python ``Traceback``). It prints one line per page and a
summary and exits 1 if any page fails. Uses Debian's ``chromium`` with ``/usr/bin/chromedriver``
(``make browser``); selenium-manager is never asked to download anything.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROME_FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run", "--window-size=1280,1000",
)
# Output areas myst-nb/Jupyter give to errors and stderr; a traceback may also be plain text.
ERROR_SELECTORS = (".output.error", ".output.traceback", ".output.stderr", ".cell_output .stderr",
                   "div.output_error", "div.output_stderr")

_PAGE_STATE_JS = """
const imgs = Array.from(document.images);
const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0))
                   .map(i => i.getAttribute('src') || '(no src)');
const sel = arguments[0];
const errors = [];
for (const s of sel) { for (const el of document.querySelectorAll(s)) {
    errors.push(s + ': ' + el.innerText.slice(0, 200)); } }
const article = document.querySelector('article') || document.body;
const h1 = article.querySelector('h1');
return {title: document.title, h1: h1 ? h1.innerText : '', n_images: imgs.length,
        broken: broken, errors: errors,
        traceback: (article.innerText || '').includes('Traceback (most recent call last)')};
"""


@dataclass
class PageResult:
    """What one page showed: title, number of images, and every problem found."""

    page: str
    title: str = ""
    n_images: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def toc_pages(html_dir: Path) -> list[Path]:
    """Pages of the book: ``index.html`` (its landing page) and every local page linked from the
    sidebar navigation of the built ``intro.html``/``index.html``, in order, without duplicates.
    """
    from html.parser import HTMLParser

    class _Links(HTMLParser):
        def __init__(self):
            super().__init__()
            self.in_nav = 0
            self.links: list[str] = []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "nav" and "bd-links" in (a.get("class") or ""):
                self.in_nav += 1
            elif tag == "a" and self.in_nav and a.get("href"):
                self.links.append(a["href"])

        def handle_endtag(self, tag):
            if tag == "nav" and self.in_nav:
                self.in_nav -= 1

    start = html_dir / "intro.html"
    start = start if start.is_file() else html_dir / "index.html"
    parser = _Links()
    parser.feed(start.read_text(encoding="utf-8"))
    pages = [start]
    for href in parser.links:
        local = href.split("#")[0]
        if not local or "://" in local:
            continue
        path = (start.parent / local).resolve()
        if path not in pages:
            pages.append(path)
    return pages


def make_driver():
    """Headless Chromium through the system chromedriver (no selenium-manager download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = next((c for c in CHROMIUM_CANDIDATES if os.path.exists(c)), None)
    if binary is None or not os.path.exists(CHROMEDRIVER):
        raise SystemExit("htmlcheck: chromium/chromedriver not found; install them with "
                         "`make browser` (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='htmlcheck-chromium-')}")
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def check_page(driver, page: Path, screenshot_dir: Path | None = None) -> PageResult:
    """Load ``page`` and collect its problems (missing title, broken images, error output)."""
    driver.get(page.as_uri())
    driver.execute_script("window.scrollTo(0, document.body.scrollHeight);")  # load lazy images
    driver.execute_async_script(  # wait until every image has decoded (or failed)
        "const done = arguments[arguments.length - 1];"
        "Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null)))"
        ".then(() => done(null));")
    state = driver.execute_script(_PAGE_STATE_JS, list(ERROR_SELECTORS))
    result = PageResult(page=page.name, title=state["title"], n_images=state["n_images"])
    if not state["title"].strip() or not state["h1"].strip():
        result.problems.append("no title / no <h1> heading: the page did not render")
    result.problems += [f"image not loaded: {src}" for src in state["broken"]]
    result.problems += [f"error output: {e}" for e in state["errors"]]
    if state["traceback"]:
        result.problems.append("a Python traceback is shown on the page")
    if screenshot_dir is not None:
        screenshot_dir.mkdir(parents=True, exist_ok=True)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, min(max(height, 800), 16000))
        driver.execute_script("window.scrollTo(0, 0);")
        driver.save_screenshot(str(screenshot_dir / f"{page.stem}.png"))
        driver.set_window_size(1280, 1000)
    return result


def check_book(html_dir: str | os.PathLike, screenshot_dir: str | os.PathLike | None = None
               ) -> list[PageResult]:
    """Check every toc page of a built book; returns one :class:`PageResult` per page."""
    html_dir = Path(html_dir).resolve()
    if not (html_dir / "index.html").is_file():
        raise SystemExit(f"htmlcheck: {html_dir}/index.html not found; build the book first")
    pages = toc_pages(html_dir)
    driver = make_driver()
    try:
        driver.set_script_timeout(30)
        results = []
        for page in pages:
            if not page.is_file():
                results.append(PageResult(page=page.name, problems=["linked page does not exist"]))
                continue
            results.append(check_page(driver, page, Path(screenshot_dir) if screenshot_dir else None))
    finally:
        driver.quit()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m psma_lib.htmlcheck", description=__doc__.split("\n")[0])
    parser.add_argument("html_dir", help="the built book, e.g. _build/html")
    parser.add_argument("--screenshots", default=None, metavar="DIR",
                        help="save a full-page PNG of every page into DIR")
    args = parser.parse_args(argv)
    results = check_book(args.html_dir, args.screenshots)
    for r in results:
        status = "ok  " if r.ok else "FAIL"
        print(f"{status} {r.page:40s} images={r.n_images:3d}  {r.title}")
        for problem in r.problems:
            print(f"       - {problem}")
    failed = [r for r in results if not r.ok]
    print(f"htmlcheck: {len(results)} page(s), {sum(r.n_images for r in results)} image(s), "
          f"{len(failed)} failed")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
