# EFT Serve. `make run` sets up .venv, builds the demo family if absent, serves it over gRPC
# on a local Ray cluster and streams a demo request (Ctrl-C stops); `make test` sets up
# .venv and runs the test suite.
#
# Variables (override on the command line, e.g. `make test TORCH=torch==2.5.1+cu124`):
#   PYTHON       interpreter that creates .venv (Python >= 3.11)
#   TORCH        pip spec of torch installed into a venv that has none (default: the CPU build)
#   TORCH_INDEX  pip index torch comes from ('' for pip's own; the Dockerfile passes PyTorch's CPU or CUDA index)
#   CONSTRAINTS  pip constraints file pinning the tested dependency versions ('' for none)
#   EXTRAS       the project's extras to install (default dev: tp, plot, stubs, test; the image: tp,plot)
#   EDITABLE     -e for an editable install of this checkout (default); empty installs a built wheel
#   PYTEST_ARGS  extra pytest arguments, e.g. PYTEST_ARGS='-k speculative -x'
#   ARGS         extra arguments of bench/serving.py or bench/load.py, e.g. ARGS='--quick' or ARGS='--device cuda'

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= dev
EDITABLE ?= -e
CONSTRAINTS ?= constraints.txt
PYTEST_ARGS ?=
ARGS ?=
PIP_FLAGS ?= --quiet --progress-bar off --disable-pip-version-check

BIN := $(VENV)/bin
PROTOS := $(shell find proto -name '*.proto' 2>/dev/null)
STUBS_STAMP := services/pb/.stamp
CONSTRAINT_FLAG := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.DEFAULT_GOAL := help
.PHONY: help run eval test bench load install stubs constraints clean tools

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 14

run: install stubs  ## build the demo family (cached), serve it (gRPC 127.0.0.1:50051), stream a demo request; Ctrl-C stops
	$(BIN)/eft family build
	$(BIN)/eft serve --demo

eval: install stubs  ## reproduce the EFT paper's up-scaling and mixing results on the demo family
	$(BIN)/eft family build
	$(BIN)/eft eval --json eval.json --plot eval.png

test: install stubs tools  ## set up .venv (torch, the project, its test extra, gRPC stubs), the test tools, and run pytest
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install stubs  ## EFT serving vs its baselines, interleaved (about 8 min), one worker's decode step against a plain HF forward (about 1 min), then the coordinator's decide phase at real vocabularies (about 8 min); writes bench/results.json, bench/worker-results.json and bench/decide-results.json
	$(BIN)/eft family build
	$(BIN)/python bench/serving.py $(ARGS)
	$(BIN)/python bench/worker_batching.py --json bench/worker-results.json
	$(BIN)/python bench/decide.py

load: install stubs  ## 32 streaming clients for 60 s on the local Ray deployment, every token checked, then RSS over 500 requests; writes bench/load-results.json
	$(BIN)/eft family build
	$(BIN)/python bench/load.py $(ARGS)

install: $(VENV)/.installed  ## create .venv and install torch and the project (editable)

tools:  ## install the Debian tools the tests use when missing: prometheus (metrics test), openssl (TLS test CA)
	@missing=""; for tool in prometheus openssl; do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (apt) for the tests ..."; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

stubs: $(STUBS_STAMP)  ## generate the gRPC stubs from proto/ into services/pb/

constraints: install  ## re-pin constraints.txt to what .venv resolved (torch left to the user)
	$(BIN)/pip freeze --exclude-editable | grep -viE '^(torch|eft-serve)==' > constraints.txt

clean:  ## remove .venv, generated stubs and caches
	rm -rf $(VENV) services/pb/*/ $(STUBS_STAMP) .pytest_cache .hypothesis *.egg-info build dist eval.json eval.png

$(BIN)/python:
	@echo "[1/3] creating $(VENV) with $(PYTHON) ..."
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_FLAGS) --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	@echo "[2/3] torch ($(TORCH)): reused if $(VENV) has one, else installed (a CUDA build downloads several GB) ..."
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/pip install $(PIP_FLAGS) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) '$(TORCH)'
	@touch $@

$(VENV)/.installed: pyproject.toml setup.py $(CONSTRAINTS) $(VENV)/.torch
	@echo "[3/3] installing EFT Serve and its dependencies ([$(EXTRAS)], pinned by $(or $(CONSTRAINTS),nothing)): a few minutes on a fresh machine ..."
	$(BIN)/pip install $(PIP_FLAGS) $(CONSTRAINT_FLAG) $(EDITABLE) '.[$(EXTRAS)]'
	@touch $@

$(STUBS_STAMP): $(PROTOS) proto/generate.py $(VENV)/.installed
	$(BIN)/python proto/generate.py
	@touch $@
