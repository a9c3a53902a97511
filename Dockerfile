# RunPod serverless worker: TensorRT engines on the GPU, ONNX Runtime / PyTorch fallback.
#
#   docker build -t trt-diffusion-worker .
#   docker build --build-arg BAKE_MODEL=stable-diffusion-v1-5/stable-diffusion-v1-5 \
#                --build-arg MODEL_PATH=/models/baked -t trt-diffusion-worker:sd15 .
#
# By default the model and the engine store are read from the network volume
# (/runpod-volume); BAKE_MODEL downloads a hub model into the image instead, the same
# files as the worker's own hub download (engine/models/sources.py).

ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

# ---- build: a Python and a virtual environment with the worker's dependencies ----
FROM ${CUDA_IMAGE} AS build
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN uv python install 3.12 && uv venv --python 3.12 /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
# torch's PyPI build for Linux ships its CUDA libraries; TensorRT comes with the gpu extra.
RUN uv pip install torch==2.13.0 && uv pip install -r pyproject.toml --extra gpu && touch /opt/venv/.installed-gpu
ARG BAKE_MODEL=""
RUN mkdir -p /models && if [ -n "$BAKE_MODEL" ]; then \
      python -c "import sys; from huggingface_hub import snapshot_download; \
snapshot_download(sys.argv[1], local_dir='/models/baked', \
allow_patterns=['model_index.json', '*/*.json', '*/*.txt', '*/*.model', '*/*.safetensors'], \
ignore_patterns=['*.fp16.*', '*non_ema*', 'safety_checker/*'])" \
      "$BAKE_MODEL"; \
    fi

# ---- runtime: the environment, the baked model if any, and the worker's code ----
FROM ${CUDA_IMAGE}
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
COPY --from=build /models /models
WORKDIR /app
COPY handler.py Makefile pyproject.toml README.md ./
COPY engine ./engine
COPY export ./export
COPY perf ./perf

ARG MODEL_PATH=/runpod-volume/model
# Defaults, each overridable in the endpoint's template (see README, Configuration).
ENV VIRTUAL_ENV=/opt/venv \
    VENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MODEL=${MODEL_PATH} \
    ENGINE_DIR=/runpod-volume/engines \
    CACHE_DIR=/runpod-volume/cache \
    HF_HOME=/runpod-volume/huggingface \
    DEVICE=cuda \
    BACKEND=auto \
    WARMUP=1 \
    READY_FILE=/tmp/worker-ready

# The worker's bytecode, compiled once here: a fresh container has no __pycache__, so every cold start
# would compile each module again (the venv's packages are compiled at install, UV_COMPILE_BYTECODE).
RUN python -m compileall -q engine export perf

# Serverless workers serve no HTTP: healthy means the worker finished starting (it
# writes its pid to READY_FILE) and that process is still alive.
HEALTHCHECK --interval=30s --timeout=5s --start-period=900s --retries=3 \
    CMD ["/bin/sh", "-c", "test -s \"$READY_FILE\" && kill -0 \"$(cat \"$READY_FILE\")\""]

# Queue endpoints run the handler. Load-balancing endpoints run HTTP mode instead: set the template's container
# start command to `python -u -m engine.serve`; it listens on PORT (80 by default) with /ping on PORT_HEALTH.
EXPOSE 80
CMD ["python", "-u", "handler.py"]
