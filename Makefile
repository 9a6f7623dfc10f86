# vptrain: the two commands.  `make run` = set up + train the default job; `make test` = set up + test suite.
# Both create or refresh .venv idempotently. torch is pinned to 2.13.0 (CPU build) on this path;
# see README "Cluster install" for CUDA torch.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vptrain-installed
TORCH_PIN := torch==2.13.0
export DS_ACCELERATOR ?= cpu

.PHONY: run test setup lint plan clean help

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-install only when the dependency list changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e ".[test,slurm,data,hf]"
	@touch $(STAMP)

setup: $(STAMP)  ## create/refresh .venv

run: $(STAMP)  ## train the default job (CPU, gloo, 2-stage pipeline, synthetic data)
	$(BIN)/vptrain train $(ARGS)

plan: $(STAMP)  ## print the plan of the default job (no processes started)
	$(BIN)/vptrain plan $(ARGS)

# The unit tests are independent single processes: spread over every core (pytest-xdist). The
# distributed and Slurm tests start several ranks each and share one engine-matrix group
# (tests/distributed/_matrix_group.py) and one Slurm cluster, so they run in order after them.
TEST_WORKERS ?= auto

test: $(STAMP)  ## run the whole test suite
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) tests/unit $(PYTEST_ARGS)
	$(BIN)/python -m pytest -q tests --ignore=tests/unit $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check vptrain tests benchmarks

clean:  ## remove run outputs (keeps .venv)
	rm -rf runs outputs multirun
