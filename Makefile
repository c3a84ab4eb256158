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
	touch $@

setup: $(STAMP)

services:
	bash deploy/dev-services.sh

demo: setup
	$(VENV)/bin/specgate demo

test: setup services
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) specgate-data .pytest_cache
