# Entry points: `make run` (whole service, embedded Redis + API + one worker), `make test` (lint,
# then the whole suite), and `make test-deploy` (both images built and the Compose stack run and
# checked; needs Docker or root). All bootstrap .venv on a fresh machine with only Python 3.11.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Pinned CPU build of torch, installed before anything else so no CUDA wheel is pulled: from a
# local wheel when pip's find-links has one, else from PyTorch's CPU index (on Linux, PyPI's torch
# wheels are CUDA builds of several GB). Override TORCH_CPU_INDEX for a mirror.
TORCH  ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PORT   ?= 8000

.PHONY: run test lint test-deploy venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	if $(BIN)/python -m pip install --quiet --dry-run --no-index --no-deps "$(TORCH)" >/dev/null 2>&1; \
	then $(BIN)/python -m pip install --quiet "$(TORCH)"; \
	else $(BIN)/python -m pip install --quiet --index-url "$(TORCH_CPU_INDEX)" "$(TORCH)"; fi
	$(BIN)/python -m pip install --quiet -e ".[client,worker,s3,dev]"
	touch $(STAMP)

run: $(STAMP)
	PORT=$(PORT) $(BIN)/star serve --port $(PORT)

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# ruff (pyflakes, no print in library code) on everything; mypy on the service packages (app,
# worker, client); settings in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# Installs Docker when missing (root), starts dockerd when none runs, builds test-only stand-ins for
# base images that cannot be pulled; see tests/deploy/stack/run.sh and docs/deploy.md.
test-deploy: $(STAMP)
	PYTHON=$(abspath $(BIN)/python) TORCH_SPEC="$(TORCH)" bash tests/deploy/stack/run.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
