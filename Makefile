# The two commands a new user needs: `make run` and `make test`.
# VENV can be moved (the dev container keeps it in /opt/venv).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.taskpool-installed

.PHONY: install run test soak bench timeline lint container-test clean

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

soak: $(STAMP)
	$(PY) -m pytest -q -m soak -p no:cacheprovider

# Bytecode first, as `pip install` leaves it: an editable install under
# PYTHONDONTWRITEBYTECODE (set in this dev machine) recompiles every module of ours at each
# start, 30-40 ms of every CLI run timed.
bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
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

container-test:
	../shared/tools/container-check --devcontainer

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
