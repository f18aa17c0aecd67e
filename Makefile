# contimg-supervisor: `make demo` runs the main job, `make test` runs the whole test suite.
# Both create (or reuse) .venv in the repository root and install everything into it.
# matplotlib is pinned through the project for the image previews.

SHELL := /bin/bash
VENV := .venv
# The first of python3.12, python3.11, python3 that actually runs and is >= 3.11
# (on pyenv machines python3.12 may be a shim that fails unless selected).
PYTHON ?= $(shell for p in python3.12 python3.11 python3; do \
	if command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; then \
	echo $$p; break; fi; done)
STAMP := $(VENV)/.installed
DEMO_WORKSPACE ?= demo-workspace
PYTEST_ARGS ?=

.PHONY: demo test lint bench clean tools reliability science

# Optional Debian tools (systemd-analyze, promtool): scripts/install-debian-tools.sh.
TOOLS_STAMP := $(VENV)/.tools

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: need Python >= 3.11 (python3.12, python3.11 or python3)"; exit 2; }
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/contimg-supervisor --workspace $(DEMO_WORKSPACE) demo

test: $(STAMP) $(TOOLS_STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

tools: $(TOOLS_STAMP)

$(TOOLS_STAMP): $(STAMP) scripts/install-debian-tools.sh
	@bash scripts/install-debian-tools.sh $(VENV)/bin
	@touch $(TOOLS_STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(DEMO_WORKSPACE) .pytest_cache

# Orchestration overhead (vs the spawn + fsync floor and Prefect 3 in its own venv), cold
# start, RSS, claims at 1M rows; then a backlog of full-size groups through the real stages,
# one full-size calibrator group alone with threads granted and with one thread per worker
# (the real-time case), and the convert worker's peak memory on one full-size group (22 min
# 34 s on this 2-core machine, 2026-11-27). The last line is one JSON object. Results:
# bench/RESULTS.md.
# ORCH_ARGS="--no-prefect --rows 100000" FULL_ARGS="--groups 2 --antennas 32 --channels 16"
# for a quick run.
ORCH_ARGS ?=
FULL_ARGS ?= --latency
bench: $(STAMP) $(TOOLS_STAMP)
	$(VENV)/bin/python bench/all.py "$(ORCH_ARGS)" "$(FULL_ARGS)"

# Chaos at scale, claim races and the bad-input catalogue; the last line is one JSON object.
# RELIABILITY_ARGS="--groups 20 --kills 30 --claims 500" for a quick run.
RELIABILITY_ARGS ?= --groups 200 --kills 1000 --claims 10000
reliability: $(STAMP) $(TOOLS_STAMP)
	$(VENV)/bin/python bench/reliability.py $(RELIABILITY_ARGS)

# Accuracy at full size against the simulator's truth: a calibrator and 3 target groups with
# interference and two dead antennas (~25 min on 2 cores); the last line is one JSON object.
# SCIENCE_ARGS="--antennas 32 --channels 16" for a quick run.
SCIENCE_ARGS ?=
science: $(STAMP) $(TOOLS_STAMP)
	$(VENV)/bin/python bench/science.py $(SCIENCE_ARGS)
