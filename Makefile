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
HAS_GPU := $(shell command -v nvidia-smi 2>/dev/null)
ENGINE_EXTRAS := $(if $(HAS_GPU),gpu,dev)
PROMPT ?= a red fox in the snow, golden hour
# make run IMAGE=photo.jpg STRENGTH=0.6 for image-to-image; add MASK=mask.png to inpaint
IMAGE ?=
STRENGTH ?=
MASK ?=
RUN_ARGS := $(if $(IMAGE),--image "$(IMAGE)") $(if $(STRENGTH),--strength $(STRENGTH)) $(if $(MASK),--mask "$(MASK)")

.PHONY: install install-gpu run test lint engines perf verify-gpu clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "installing torch $(TORCH_VERSION) and the $(EXTRAS) dependencies into $(VENV) (a few minutes the first time)"
	$(BIN)/python -m pip install --progress-bar on torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --progress-bar on -e '.[$(EXTRAS)]'
	touch $@

install: $(STAMP)

install-gpu:
	$(MAKE) install EXTRAS=gpu

run: $(STAMP)
	MODEL=$(MODEL) $(BIN)/python -m engine --prompt "$(PROMPT)" --out outputs $(RUN_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(BIN)/python -m pytest

engines:
	@test -n "$(HAS_GPU)" || echo "no NVIDIA GPU here (nvidia-smi not found): exporting and validating ONNX only; TensorRT engines are built on the endpoint's GPU type"
	$(MAKE) install EXTRAS=$(ENGINE_EXTRAS)
	MODEL=$(MODEL) $(BIN)/python -m export

perf: $(STAMP)
	MODEL=$(MODEL) $(BIN)/python -m perf

# On a GPU machine with TensorRT: export, build, load, compare with PyTorch, time.
verify-gpu:
	@test -n "$(HAS_GPU)" || { echo "make verify-gpu needs an NVIDIA GPU and its driver (nvidia-smi not found); run it on a GPU pod of the endpoint's type"; exit 2; }
	$(MAKE) install EXTRAS=gpu
	MODEL=$(MODEL) $(BIN)/python -m perf.verify

clean:
	rm -rf $(VENV) outputs perf/results .pytest_cache .ruff_cache
