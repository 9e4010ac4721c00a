# dynlab: train and analyse dynamical-systems views of neural computation.
# Every target that runs Python installs the virtual environment first when it is missing or stale.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TASK   ?= waves
ARGS   ?=
SEEDS  ?= 0 1 2
PRESET ?=

# Threads for CPU training; Lightning and torch read these.
export OMP_NUM_THREADS ?= $(shell nproc 2>/dev/null || echo 2)

CONFIGS := --config configs/base.yaml --config configs/tasks/$(TASK).yaml $(if $(PRESET),--config configs/presets/$(PRESET).yaml)

.PHONY: help install train test test-full bench lint seeds compare study clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s "$$(printf '\t')"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install dynlab with its dev extras (idempotent)

train: $(STAMP)  ## train TASK (waves, hypersindy, raptor, vit) with ARGS="--flag=value ..." and PRESET=smoke|debug|ddp|gpu
	$(BIN)/dynlab fit $(CONFIGS) $(ARGS)

seeds: $(STAMP)  ## train TASK once per seed in SEEDS and aggregate the test metrics
	$(BIN)/python -m callbacks.seeds --task $(TASK) --seeds $(SEEDS) -- $(if $(PRESET),--config configs/presets/$(PRESET).yaml) $(ARGS)

study: $(STAMP)  ## Raptor study: digits teachers with drop_path_rate 0, 0.1, 0.3, 0.5, k = 2; table and plot (ARGS for more flags)
	$(BIN)/python -m lightning_modules.raptor.study --runs_root runs/study --figure docs/figures/raptor_study.png $(ARGS)

test: $(STAMP)  ## fast test tier (what CI runs)
	$(BIN)/python -m pytest -q

test-full: $(STAMP)  ## every tier except gpu when no CUDA is present: slow training runs and DDP on CPU
	$(BIN)/python -m pytest -q -m "not gpu or gpu"

bench: $(STAMP)  ## speed and memory benchmarks; prints ratios, writes docs/BENCHMARKS.md (BENCH_ARGS="--task waves --quick")
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

lint: $(STAMP)  ## ruff check
	$(BIN)/ruff check .

compare: $(STAMP)  ## regenerate the comparison table of TASK in docs/RESULTS.md (hypersindy: vs SINDy and E-SINDy)
	$(BIN)/python -m lightning_modules.$(TASK).compare $(ARGS)

clean:  ## remove run folders and cached data (keeps .venv)
	rm -rf runs data
