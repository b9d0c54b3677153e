# rexport: `make install engine MODEL=resnet18` sets up and runs the main job; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch 2.13.0's CPU wheel is on this workplace's disk; elsewhere pip takes the build that fits.
TORCH ?= torch==2.13.0
MODEL ?= resnet18
OUT ?= artifacts/$(MODEL)
WEIGHTS ?=
CALIB ?= synthetic
VAL ?=
PRECISIONS ?= fp32,fp16,int8
BACKEND ?= auto
ARGS ?=

.PHONY: install engine demo test test-timm test-slow test-gpu gpu-check bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# CONFIG=run.toml: the run's settings from a file (rexport run --print-config writes one); then only the
# variables given on make's command line (or in the environment) override it, as flags do.
CONFIG ?=
given = $(or $(if $(CONFIG),,yes),$(filter command line environment,$(origin $(1))))
flag = $(if $(call given,$(1)),$(2))

engine: install
	$(BIN)/rexport run $(if $(CONFIG),--config $(CONFIG)) $(call flag,MODEL,--model $(MODEL)) \
	  $(call flag,OUT,--out $(OUT)) $(call flag,CALIB,--calib-data $(CALIB)) \
	  $(call flag,PRECISIONS,--precisions $(PRECISIONS)) $(call flag,BACKEND,--backend $(BACKEND)) \
	  $(if $(WEIGHTS),--weights $(WEIGHTS)) $(if $(VAL),--val-data $(VAL)) $(ARGS)

demo: install
	$(BIN)/python -m rexport.demo --out artifacts/demo

# one pytest-xdist worker per usable core, each pinned to its own core (tests/conftest.py), each test file
# on one worker (its fixtures are made once: a costly session fixture is used by one file only), the
# longest files first (conftest's order: xdist would otherwise order files by their number of tests);
# TEST_WORKERS=1 runs the suite in this process
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 1)
test: install
	$(BIN)/python -m pytest -q $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

# timm needs torchvision, which imports only beside PyPI's torch build (5.5 GB, CUDA): its own venv, so
# `make install` stays light for users and the main suite stays on the CPU wheel (it skips timm cleanly).
TIMM_VENV ?= .venv-timm
$(TIMM_VENV)/.installed: pyproject.toml
	test -x $(TIMM_VENV)/bin/python || $(PYTHON) -m venv $(TIMM_VENV)
	$(TIMM_VENV)/bin/pip install -q --upgrade pip
	$(TIMM_VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(TIMM_VENV)/bin/pip install -q -e ".[dev,timm]"
	touch $@

test-timm: $(TIMM_VENV)/.installed
	$(TIMM_VENV)/bin/python -m pytest -q tests/models/test_external.py

test-slow: install
	$(BIN)/python -m pytest -q -m slow

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu -rs

gpu-check: install
	bash scripts/gpu_check.sh

bench: install
	$(BIN)/pip install -q -e ".[dev,bench]"
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf artifacts build dist $(TIMM_VENV) *.egg-info benchmarks/results/*.tmp
