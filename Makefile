# The two commands of the README: `make book` (the main job) and `make test` (CI).
# Both create a local virtual environment on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PROFILE ?= quick

.PHONY: help venv test unit notebooks book-ci browser-check book lint bench clean browser

help:
	@echo "make book   - generate the synthetic cohort, run every chapter, build _build/html (profile=$(PROFILE))"
	@echo "make test   - lint, unit tests, nbval over the chapters, book build + headless-browser check"
	@echo "make bench  - data-preparation and training-throughput benchmarks (prints figures)"

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[book,test]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (psma)" >/dev/null
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check psma_lib tests bench chapters

# The unit tests and every docstring example of the library.
unit: $(STAMP)
	$(VENV)/bin/pytest --doctest-modules psma_lib tests

# Every chapter executed by nbval (lax: outputs are not compared) in the small `ci` profile, into
# that profile's results folder, emptied first so the code under test computes every result.
# book-ci then finds the cohort, crops and CV runs cached there and only re-executes the pages:
# `make test` runs the ci pipeline once.
CI_RESULTS := _build/results/ci
notebooks: $(STAMP)
	rm -rf $(CI_RESULTS)
	PSMA_BOOK_PROFILE=ci PSMA_BOOK_OUTPUT=$(CI_RESULTS) $(VENV)/bin/pytest --nbval-lax -p no:cacheprovider chapters/

# Debian's Chromium for the rendered-HTML check (installed once, as root).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null)

book-ci: $(STAMP) browser
	$(VENV)/bin/psma-pfs book --profile ci --output $(CI_RESULTS)
	$(PY) -m psma_lib.htmlcheck _build/html

test: lint unit notebooks book-ci

book: $(STAMP)
	$(VENV)/bin/psma-pfs book --profile $(PROFILE)

bench: $(STAMP)
	$(PY) bench/data_prep.py
	$(PY) bench/train_throughput.py

clean:
	rm -rf _build
