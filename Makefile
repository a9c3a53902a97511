# Two commands set everything up: `make run` (one image and its metrics) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 resolves to the CPU build on CPU-only hosts and to the CUDA build on GPU hosts.
TORCH_VERSION ?= 2.13.0
EXTRAS ?= dev
STAMP := $(VENV)/.installed-$(EXTRAS)
MODEL ?= tiny
comma := ,
# On a machine with an NVIDIA GPU, `make engines` also installs TensorRT to build engines.
ENGINE_EXTRAS := $(if $(shell command -v nvidia-smi 2>/dev/null),dev$(comma)gpu,dev)
PROMPT ?= a red fox in the snow, golden hour

.PHONY: install install-gpu run test lint engines perf verify-gpu clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

install: $(STAMP)

install-gpu:
	$(MAKE) install EXTRAS=dev,gpu

run: $(STAMP)
	MODEL=$(MODEL) $(BIN)/python -m engine --prompt "$(PROMPT)" --out outputs

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(BIN)/python -m pytest

engines:
	$(MAKE) install EXTRAS=$(ENGINE_EXTRAS)
	MODEL=$(MODEL) $(BIN)/python -m export

perf: $(STAMP)
	MODEL=$(MODEL) $(BIN)/python -m perf

# On a GPU machine with TensorRT: export, build, load, compare with PyTorch, time.
verify-gpu:
	$(MAKE) install EXTRAS=dev,gpu
	MODEL=$(MODEL) $(VENV)/bin/python -m export.verify

clean:
	rm -rf $(VENV) outputs perf/results .pytest_cache .ruff_cache
