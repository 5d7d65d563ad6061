# The two commands a new user needs: `make run` and `make test`.
# VENV can be moved (the dev container keeps it in /opt/venv).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.taskpool-installed

.PHONY: install run test test-pythons soak bench timeline lint container-test clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dask]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/taskpool run --demo

test: $(STAMP)
	$(PY) -m pytest -q

# The suite (without soak, as `make test`) on every CPython that pyproject.toml claims
# (requires-python >=3.9: keep PYTHONS in step with it), each from pyenv in a venv of its
# own (.venv-3.X, made again when pyproject.toml changes). A version this machine lacks is
# skipped with a message; the target fails if the suite fails on any version it has.
# `make test-pythons PYTHONS="3.9 3.13" PYTEST_ARGS="tests/test_executor.py"` narrows it;
# SKIP_PYTHONS leaves out versions tested already (.ci/run: make test's).
PYTHONS ?= 3.9 3.10 3.11 3.12 3.13
SKIP_PYTHONS ?=
PYENV_ROOT ?= $(HOME)/.pyenv
PYTEST_ARGS ?=

test-pythons:
	@failed=""; \
	for v in $(filter-out $(SKIP_PYTHONS),$(PYTHONS)); do \
	  base=$$(ls -d $(PYENV_ROOT)/versions/$$v.* 2>/dev/null | grep -E "/$$v\.[0-9]+$$" \
	          | sort -V | tail -n 1); \
	  if [ -z "$$base" ] || [ ! -x "$$base/bin/python" ]; then \
	    echo "test-pythons: Python $$v is not under $(PYENV_ROOT)/versions: skipped"; \
	    continue; \
	  fi; \
	  venv=.venv-$$v; \
	  if [ ! "$$venv/.taskpool-installed" -nt pyproject.toml ] \
	     || [ "$$(readlink -f $$venv/bin/python)" != "$$(readlink -f $$base/bin/python)" ]; then \
	    echo "test-pythons: $$venv from $$base"; \
	    rm -rf $$venv && $$base/bin/python -m venv $$venv \
	      && $$venv/bin/python -m pip install -q --upgrade pip \
	      && $$venv/bin/python -m pip install -q -e '.[test,dask]' \
	      && touch $$venv/.taskpool-installed \
	      || { failed="$$failed $$v(install)"; continue; }; \
	  fi; \
	  echo "test-pythons: Python $$v ($$base)"; \
	  start=$$(date +%s); \
	  if $$venv/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS); then \
	    echo "test-pythons: Python $$v passed in $$(( $$(date +%s) - start )) s"; \
	  else \
	    echo "test-pythons: Python $$v FAILED in $$(( $$(date +%s) - start )) s"; \
	    failed="$$failed $$v"; \
	  fi; \
	done; \
	if [ -n "$$failed" ]; then echo "test-pythons: failed on:$$failed"; exit 1; fi

soak: $(STAMP)
	$(PY) -m pytest -q -m soak -p no:cacheprovider

# Bytecode first, as `pip install` leaves it: an editable install under
# PYTHONDONTWRITEBYTECODE (set in this dev machine) recompiles every module of ours at each
# start, 30-40 ms of every CLI run timed.
# GNU parallel (Debian's `parallel`) is a peer of the commands' bench: installed here when
# this is root with apt-get, else its row says it was skipped.
bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	@command -v parallel >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] \
	  && command -v apt-get >/dev/null 2>&1 && export DEBIAN_FRONTEND=noninteractive \
	  && { apt-get install -y -qq parallel >/dev/null 2>&1 \
	       || { apt-get update -qq >/dev/null 2>&1 \
	            && apt-get install -y -qq parallel >/dev/null 2>&1; }; }; } \
	  || echo "bench: GNU parallel is not installed and cannot be (needs root and apt-get): its row is skipped"
	$(PY) -m compileall -q taskpool
	$(PY) bench/bench.py

# The demo's timeline, drawn by `taskpool report` and rendered by headless Chromium to a
# PNG (README shows it). Needs Debian's chromium (apt-get install chromium).
CHROMIUM ?= chromium
timeline: $(STAMP)
	mkdir -p docs
	$(VENV)/bin/taskpool run --demo --quiet --events docs/demo-events.jsonl --log docs/demo.log
	$(VENV)/bin/taskpool report docs/demo-events.jsonl -o docs/timeline.html
	$(CHROMIUM) --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
	  --disable-background-networking --disable-component-update --disable-sync \
	  --user-data-dir=$$(mktemp -d) --window-size=1240,400 \
	  --screenshot=$(CURDIR)/docs/timeline.png file://$(CURDIR)/docs/timeline.html 2>/dev/null

lint: $(STAMP)
	$(PY) -m pip install -q -e '.[dev]'
	$(VENV)/bin/ruff check taskpool tests
	$(VENV)/bin/mypy taskpool
	$(VENV)/bin/lint-imports
	$(PY) tools/function_length.py taskpool

# Builds the Dockerfile and starts the dev container with docker or podman, running the demo
# in each (BASE_IMAGE=... to build on another base).
container-test:
	tools/container-check

clean:
	rm -rf $(VENV) .venv-3.* build *.egg-info .pytest_cache .mypy_cache .ruff_cache
