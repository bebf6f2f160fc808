# Two entry points: `make run` (the main job on the embedded demo) and `make test` (the whole suite).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

.PHONY: run test install install-dev lint

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(VENV)/.installed: $(PY) pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e .
	touch $@

$(VENV)/.installed-dev: $(PY) pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(VENV)/bin/privml run

lint: install-dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy src

test: install-dev lint
	$(VENV)/bin/python -m pytest -n 2 --timeout 600
