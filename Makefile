# rlekf — `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# tested torch release; override e.g. `make install TORCH="torch==2.5.1"` (a CUDA wheel index
# can be given with TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu124")
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed
ARGS ?=
export WANDB_MODE ?= offline

.PHONY: help install train train-adam eval export md sweep report bench profile bench-dist test test-full test-interop lint format clean clean-logs

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" $(TORCH_INDEX)
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install the project (pinned torch, override with TORCH=...)

train: $(STAMP) ## train on the embedded EMT Cu data with RLEKF (extra Hydra overrides: ARGS="...")
	$(BIN)/rlekf-train $(ARGS)

train-adam: $(STAMP) ## same data and model with the Adam baseline
	$(BIN)/rlekf-train optim=adam $(ARGS)

eval: $(STAMP) ## evaluate a checkpoint: make eval CKPT=logs/.../checkpoints/last.ckpt
	$(BIN)/rlekf-eval ckpt_path=$(CKPT) $(ARGS)

export: $(STAMP) ## export a checkpoint to TorchScript: make export CKPT=... [OUT=model.pt]
	$(BIN)/rlekf-export $(CKPT) $(if $(OUT),-o $(OUT)) $(ARGS)

md: $(STAMP) ## NVE MD of 108-atom fcc Cu: make md MODEL=....ckpt|.pt [ARGS="--steps 5000"]
	$(BIN)/rlekf-md $(MODEL) $(ARGS)

SWEEP ?= block_size
# the latest multirun of SWEEP; override with SWEEP_DIR=logs/sweep_<name>/multiruns/<date>
SWEEP_DIR ?= $(lastword $(sort $(wildcard logs/sweep_$(SWEEP)/multiruns/*)))

sweep: $(STAMP) ## grid sweep from configs/sweep/: make sweep SWEEP=block_size [ARGS="hydra/launcher=slurm"]
	$(BIN)/rlekf-train sweep=$(SWEEP) $(ARGS)

report: $(STAMP) ## tables + plots of the latest run of a sweep: make report SWEEP=block_size
	@test -n "$(SWEEP_DIR)" || { echo "no multirun under logs/sweep_$(SWEEP)/multiruns (give SWEEP_DIR=...)"; exit 1; }
	$(BIN)/rlekf-report $(SWEEP_DIR)

PRESET ?= quick
bench: $(STAMP) ## RLEKF vs Adam + Kalman-update microbenchmark: make bench [PRESET=full] [ARGS=...]
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(nproc)} $(BIN)/rlekf-bench --preset $(PRESET) $(ARGS)

PROFILE_DATA ?= cu_pwmat
profile: $(STAMP) ## where a training step's time goes (P update, forward, backward, data) per optimizer: make profile [PROFILE_DATA=cu_emt] [ARGS="--batches 40"]
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(nproc)} $(BIN)/rlekf-bench --profile --data $(PROFILE_DATA) $(ARGS)

RANKS ?= 1 2
bench-dist: $(STAMP) ## sharded RLEKF: memory per rank and time per update vs ranks: make bench-dist [RANKS="1 2 4"] [ARGS="--device cuda"]
	$(BIN)/rlekf-bench-dist --ranks $(RANKS) $(ARGS)

test: $(STAMP) ## run the test suite (without slow tests)
	$(BIN)/python -m pytest -m "not slow" -q --durations=30 $(ARGS)

test-full: $(STAMP) ## run every test, slow ones included
	$(BIN)/python -m pytest -q $(ARGS)

# DeePMD-kit + LAMMPS for the interop checks, in their own venv: deepmd-kit pins its own torch
# (3.2.0 wants torch==2.11.0), which differs from ours, so it never goes into $(VENV)
INTEROP_VENV ?= .venv-interop
DEEPMD_KIT ?= deepmd-kit[torch,lmp]==3.2.0
# the wheel's C++ library (LAMMPS plugin) dlopens libcudart.so.12 even on a CPU-only machine
INTEROP_EXTRA ?= nvidia-cuda-runtime-cu12
INTEROP_STAMP := $(INTEROP_VENV)/.installed

$(INTEROP_STAMP): pyproject.toml
	@test -x $(INTEROP_VENV)/bin/python || $(PY) -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/python -m pip install -q "$(DEEPMD_KIT)" $(INTEROP_EXTRA) -e '.[dev]'
	@touch $(INTEROP_STAMP)

test-interop: $(INTEROP_STAMP) ## DeePMD-kit 3.2 + LAMMPS checks of rlekf-export --format deepmd (own venv, not in `make test`)
	$(INTEROP_VENV)/bin/python -m pytest tests/interop -q -p no:cacheprovider $(ARGS)

lint: $(STAMP) ## ruff check
	$(BIN)/ruff check src tests

format: $(STAMP) ## ruff format + fix
	$(BIN)/ruff format src tests && $(BIN)/ruff check --fix src tests

clean: ## remove caches (keeps .venv, data and logs)
	rm -rf .pytest_cache .ruff_cache build dist src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

clean-logs: ## remove all run outputs under logs/
	rm -rf logs/* && touch logs/.gitkeep
