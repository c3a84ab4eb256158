# The two commands of the README's quick start: `make demo` and `make test`.
# Each sets up everything it needs on a fresh Debian machine (virtualenv, CPU PyTorch, the project,
# the Debian packages and services the tests use) and then runs.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.specgate-installed

.PHONY: all setup services demo test lint clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU PyTorch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# nnU-Net v2 without its declared dependencies: dynamic-network-architectures requires timm, which
	# requires torchvision, and torchvision's wheels would replace the CPU torch with a CUDA build (or break
	# beside it). What nnU-Net's planning, preprocessing and predictor import is the `nnunet` extra, which
	# `dev` includes; pip check would list timm, graphviz, imagecodecs, yacs, requests as missing: unused here.
	$(PY) -m pip install -q --no-deps nnunetv2==2.8.1 dynamic-network-architectures==0.4.4
	touch $@

setup: $(STAMP)

services:
	bash deploy/dev-services.sh

demo: setup
	$(VENV)/bin/specgate demo

test: setup services
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q --durations=40

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) specgate-data .pytest_cache
