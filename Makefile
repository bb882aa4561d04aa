# `make test` sets up a virtual environment in the checkout (CPU torch first, from the local wheel where there is one,
# so that no multi-GB CUDA build is pulled) and runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: install test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python benchmarks/benchmark_generation.py

clean:
	rm -rf $(VENV) build *.egg-info
