# The README's commands. Everything installs into .venv from scratch; `make setup` is idempotent.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=

# Which torch build `make setup` installs (torch 2.13.0 either way, then triton 3.7.1):
#   TORCH_BUILD=cpu   torch==2.13.0+cpu from TORCH_CPU_INDEX, PyTorch's CPU wheel index (about 190 MB). pip also
#                     looks in the sources its own configuration names, so a local wheel folder holding that file
#                     is used instead of the download (as on this project's CPU machines).
#   TORCH_BUILD=cuda  torch==2.13.0 from PyPI, which on Linux x86-64 is the CUDA build (several GB with its
#                     nvidia-* wheels).
# Default: cuda when `nvidia-smi -L` succeeds on this machine, cpu otherwise. Override, e.g.
#   make setup TORCH_BUILD=cuda      or      make setup TORCH_CPU_INDEX=https://my.mirror/whl/cpu
TORCH_BUILD     ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
ifeq ($(TORCH_BUILD),cpu)
TORCH_INSTALL := torch==2.13.0+cpu --extra-index-url $(TORCH_CPU_INDEX) --retries 1
else ifeq ($(TORCH_BUILD),cuda)
TORCH_INSTALL := torch==2.13.0
else
$(error TORCH_BUILD=$(TORCH_BUILD) is not one of: cpu, cuda)
endif

.PHONY: setup train test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned and of the chosen build (see TORCH_BUILD above); the project's own range (torch>=2.11)
	# is then already satisfied, so installing the project pulls no other torch
	$(PY) -m pip install -q $(TORCH_INSTALL) triton==3.7.1
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

# Every method's small preset against its baseline over 3 seeds on CPU (≤ 45 min on 2 cores by the suite's estimator;
# resumable) → benchmarks/results/reproduce/REPORT.md. SCALE=full: the core claims at the steps the power calculation
# asks for, cut to ≤ 2 h (resumable) → benchmarks/results/reproduce_full/REPORT.md.
# ARGS="--dry-run" prints the plan, "--methods emoe,sgt --seeds 1" a subset.
SCALE ?= small
.PHONY: reproduce
reproduce: setup
	$(PY) -m recipes.reproduce.suite --scale $(SCALE) $(ARGS)

# Registers / spills / shared memory of every kernel config for sm_90a and sm_80 (no GPU; cached in .cache/static-gates)
# → benchmarks/results/local/kernels_static.csv; ARGS="--out benchmarks/results" writes the tracked table.
.PHONY: static gpu-suite
static: setup
	$(PY) -m benchmarks.kernels_static $(ARGS)

# The prepared GPU suite (benchmarks/GPU_SUITE.md); on a CPU machine ARGS=--dry-run.
gpu-suite:
	$(PYTHON) -m benchmarks.gpu_suite $(ARGS)

clean:
	rm -rf $(VENV) runs multirun outputs .pytest_cache
