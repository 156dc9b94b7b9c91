# The README's commands. Everything installs into .venv from scratch; `make setup` is idempotent.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: setup train test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pinned first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0 triton==3.7.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

train: setup
	$(PY) train.py $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

# ruff: lint (pyflakes, pycodestyle, bugbear, pyupgrade), import order, and formatting (config in pyproject.toml)
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: setup
	$(PY) -m benchmarks.step_time $(ARGS)

# Every method's small preset against its baseline over 3 seeds on CPU (~1 h on 2 cores; resumable)
# → benchmarks/results/reproduce/REPORT.md. ARGS="--dry-run" prints the plan, "--methods emoe,sgt --seeds 1" a subset.
.PHONY: reproduce
reproduce: setup
	$(PY) -m recipes.reproduce.suite $(ARGS)

clean:
	rm -rf $(VENV) runs multirun outputs .pytest_cache
