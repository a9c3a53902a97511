# Two commands set everything up: `make run` (one image and its metrics) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch==2.13.0 resolves to the CPU build on CPU-only hosts and to the CUDA build on GPU hosts.
TORCH_VERSION ?= 2.13.0
EXTRAS ?= dev
STAMP := $(VENV)/.installed-$(EXTRAS)
MODEL ?= tiny
PROMPT ?= a red fox in the snow, golden hour

.PHONY: install install-gpu run test lint engines perf verify-gpu docker clean

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

engines: $(STAMP)
	MODEL=$(MODEL) $(BIN)/python -m export

perf: $(STAMP)
	MODEL=$(MODEL) $(BIN)/python -m perf

clean:
	rm -rf $(VENV) outputs perf/results .pytest_cache .ruff_cache
