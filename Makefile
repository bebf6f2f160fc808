# Two entry points: `make run` (the main job on the embedded demo) and `make test` (the whole suite).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# pip shows its progress (what it downloads and installs); --no-compile leaves byte-compiling to
# the first import, which compiles only the modules privml uses (faster install, smaller .venv).
PIP_INSTALL := $(PIP) install --progress-bar on --no-compile -c constraints.txt

.PHONY: run test install install-dev lint bench bench-quick browser

$(PY):
	@echo "== creating $(VENV)"
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

# What the demo needs: the core plus the 'he' extra (the demo checks encrypted inference).
$(VENV)/.installed: $(PY) pyproject.toml constraints.txt
	@echo "== installing privml (core + he) into $(VENV)"
	$(PIP_INSTALL) -e '.[he]'
	touch $@

$(VENV)/.installed-dev: $(PY) pyproject.toml constraints.txt
	@echo "== installing privml with its dev extras (all features, test and lint tools)"
	$(PIP_INSTALL) -e '.[dev]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	@echo "== privml run (embedded demo)"
	$(VENV)/bin/privml run

lint: install-dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy src

# The report test renders report.html in headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "== installing chromium (report rendering test)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null \
	  || { echo "chromium could not be installed (the report rendering test needs it)"; \
	       [ -z "$$CI" ] || exit 1; }; }

test: install-dev lint browser
	$(VENV)/bin/python -m pytest -n 2 --timeout 600 --durations=25

# Every benchmark at full size (JSON in benchmarks/results/), then the targets collected and the
# docs tables regenerated from it (benchmarks/targets.py, benchmarks/render_docs.py); what each
# script took is in docs/benchmarks.md (the runs table). Run nothing else meanwhile.
# bench-quick: every benchmark on tiny sizes, then the whole pipeline rendered into a copy of
# docs/ (a smoke run: docs/ and benchmarks/results/ untouched).
bench: install-dev
	$(PY) benchmarks/run_all.py

bench-quick: install-dev
	$(PY) benchmarks/run_all.py --quick
