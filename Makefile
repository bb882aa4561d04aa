# `make caption` and `make test` set up a virtual environment in the checkout (CPU torch first, from the local wheel
# where there is one, so that no multi-GB CUDA build is pulled); `make caption` then captions the sample images (or
# `IMAGES="a.png b.jpg"`) with the committed captioner, `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

IMAGES ?= $(sort $(wildcard examples/images/*.png))

.PHONY: install caption test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

caption: install
	@$(BIN)/palme-hf caption --model examples/captioner $(IMAGES)

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python benchmarks/benchmark_generation.py

clean:
	rm -rf $(VENV) build *.egg-info
