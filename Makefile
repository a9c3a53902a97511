# Two commands set everything up: `make run` (one image and its metrics) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 resolves to the CPU build on CPU-only hosts and to the CUDA build on GPU hosts.
TORCH_VERSION ?= 2.13.0
EXTRAS ?= dev
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
MODEL ?= tiny
# On a machine with an NVIDIA GPU, `make engines` installs TensorRT (the gpu extra) to build engines.
ENGINE_EXTRAS := $(if $(shell command -v nvidia-smi 2>/dev/null),gpu,dev)
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
	$(MAKE) install EXTRAS=gpu

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
	$(MAKE) install EXTRAS=gpu
	MODEL=$(MODEL) $(BIN)/python -m export.verify

clean:
	rm -rf $(VENV) outputs perf/results .pytest_cache .ruff_cache
