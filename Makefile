# The two commands a new user needs: `make run` and `make test`.
# VENV can be moved (the dev container keeps it in /opt/venv).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.taskpool-installed

.PHONY: install run test soak bench lint container-test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/taskpool run --demo

test: $(STAMP)
	$(PY) -m pytest -q

soak: $(STAMP)
	$(PY) -m pytest -q -m soak -p no:cacheprovider

bench: $(STAMP)
	$(PY) bench/bench.py

lint: $(STAMP)
	$(PY) -m pip install -q -e '.[dev]'
	$(VENV)/bin/ruff check taskpool tests
	$(VENV)/bin/mypy taskpool

container-test:
	../shared/tools/container-check --devcontainer

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
