"""Worker and export configuration, read from the environment once and validated.

Every knob is an environment variable of the same name in upper case (``MODEL``,
``ENGINE_DIR``, ``BACKEND``...), so a RunPod template configures the worker without
code changes. Everything else receives a ``Settings`` object instead of reading
``os.environ`` itself.
"""

from __future__ import annotations

import os
import tempfile
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engine.common.errors import ConfigError
from engine.sizes import parse_ranges

RUNPOD_VOLUME = Path("/runpod-volume")
RUNPOD_MODEL_CACHE = RUNPOD_VOLUME / "huggingface-cache" / "hub"
"""Where RunPod's "cached models" endpoint setting puts the model, in huggingface_hub's cache layout."""


class Backend(str, Enum):
    AUTO = "auto"
    TENSORRT = "tensorrt"
    ONNXRUNTIME = "onnxruntime"
    TORCH = "torch"


class TorchFallback(str, Enum):
    """When the torch weights behind the other backends are loaded: on first need, at start-up, or never."""

    LAZY = "lazy"
    EAGER = "eager"
    OFF = "off"


class EngineRefit(str, Enum):
    """Which weights engines can refit for LoRAs: matrices (what LoRAs change), also convolution kernels
    (LoCon), or none (LoRA requests then run the next backend)."""

    LINEAR = "linear"
    ALL = "all"
    NONE = "none"


class Precision(str, Enum):
    AUTO = "auto"
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class Quantize(str, Enum):
    """QUANTIZE: the denoiser's quantized graph or engine, served first where the store has one."""

    NONE = "none"
    AUTO = "auto"
    FP8 = "fp8"
    INT8 = "int8"
    NVFP4 = "nvfp4"


def default_cache_dir() -> Path:
    """Local cache for built-in models and, off RunPod, the engine store."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "trt-diffusion-worker"


def default_engine_dir() -> Path:
    """The network volume when mounted, so every worker of an endpoint shares one store."""
    if RUNPOD_VOLUME.is_dir():
        return RUNPOD_VOLUME / "engines"
    return default_cache_dir() / "engines"


def default_export_work_dir() -> Path:
    """Local disk for raw exports: only finished artifacts go to the (network) engine store."""
    return Path(tempfile.gettempdir()) / "trt-diffusion-export"


class Settings(BaseSettings):
    """All configuration of the worker, the export stage and the benchmarks."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore", protected_namespaces=())

    model: str = Field("tiny", description="built-in name, local diffusers folder, or hub id")
    model_revision: str | None = Field(
        None, description="hub revision when MODEL is a hub id: a branch or tag, or a commit hash"
    )
    model_cache_dir: Path = Field(
        RUNPOD_MODEL_CACHE,
        description="RunPod's model cache (huggingface_hub's layout), read first for a hub id, with no network call",
    )
    cache_dir: Path = Field(default_factory=default_cache_dir)
    engine_dir: Path = Field(default_factory=default_engine_dir)
    export_work_dir: Path = Field(
        default_factory=default_export_work_dir, description="local folder for raw exports (as large as the weights)"
    )

    backend: Backend = Backend.AUTO
    component_backends: Annotated[dict[str, Backend], NoDecode] = Field(
        default_factory=dict, description="per-component override, e.g. 'unet=tensorrt,vae_decoder=torch'"
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    precision: Precision = Precision.AUTO
    quantize: Quantize = Field(
        Quantize.NONE,
        description="the denoiser quantized (changes images; opt in): fp8, int8, nvfp4, or auto by the GPU's "
        "compute capability (nvfp4 from 10.0, fp8 from 8.9, int8 from 8.0); `make engines` exports it",
    )
    calib_steps: int = Field(20, ge=1, description="denoising steps per calibration prompt (QUANTIZE)")
    calib_size: int = Field(512, ge=64, description="image side calibration runs at (QUANTIZE)")

    max_image_side: int = Field(2048, ge=64)
    min_image_side: int = Field(64, ge=8)
    max_image_pixels: int = Field(2048 * 2048, ge=64 * 64)
    max_steps: int = Field(150, ge=1)
    default_steps: int = Field(25, ge=1)
    max_images: int = Field(4, ge=1, description="images per request, all prompts together")
    max_prompts: int = Field(4, ge=1)
    max_timeout_s: float = Field(600.0, gt=0)
    max_input_image_bytes: int = Field(20_000_000, gt=0, description="largest image-to-image input")
    download_timeout_s: float = Field(
        60.0, gt=0, description="longest a URL download (image or LoRA) may take; a request's timeout_s can shorten it"
    )
    download_min_bytes_per_s: float = Field(
        50_000.0, ge=0, description="slowest a download's server may send, after its first 5 s; 0: no minimum"
    )
    max_prompt_chunks: int = Field(
        3, ge=1, le=16, description="chunks of 75 tokens a prompt may use; engines are built to cover them"
    )
    max_prompt_weight: float = Field(3.0, gt=0, description="largest weight a prompt's (text:weight) may give, ±")

    lora_dir: Path | None = Field(
        None,
        description="LoRA files a request names; URL downloads go to its cache/. Default: loras/ on the network "
        "volume when it is mounted, else under CACHE_DIR",
    )
    max_loras: int = Field(4, ge=0, description="LoRAs per request")
    max_lora_bytes: int = Field(2_000_000_000, gt=0, description="largest LoRA file a request may download")
    lora_cache_gb: float = Field(
        4.0, gt=0, description="size cap of LORA_DIR/cache (URL downloads); least recently used files go first"
    )
    lora_memory_gb: float = Field(2.0, gt=0, description="memory the LoRA files read last are kept in, parsed")
    lora_sessions: int = Field(
        2, ge=1, description="onnxruntime sessions with LoRA weights kept per component (least recently used out)"
    )

    controlnet_dir: Path | None = Field(
        None,
        description="ControlNet folders (diffusers' layout) a request names. Default: controlnets/ on the network "
        "volume when it is mounted, else under CACHE_DIR",
    )
    max_controlnets: int = Field(2, ge=0, description="ControlNets per request")
    ip_adapter_dir: Path | None = Field(
        None,
        description="IP-Adapter files (safetensors, each with its image_encoder/ folder beside it) a request names. "
        "Default: ip_adapters/ on the network volume when it is mounted, else under CACHE_DIR",
    )
    max_ip_adapters: int = Field(
        1, ge=0, le=2, description="IP-Adapters per request: the IP denoisers have one or two adapter slots"
    )
    preload_controlnets: str = Field(
        "",
        description="ControlNets of CONTROLNET_DIR (comma-separated names, or 'all' for every one that fits the "
        "model) whose runners load at start-up, so the first request that names one does not wait for them",
    )

    engine_profiles: str | None = Field(
        None,
        description="size ranges engines cover, 'MIN-MAX@OPTxBATCH' or static 'SIZExBATCH', comma-separated; "
        "default: half to 1.5 times the model's native side at batch 2",
    )
    engine_workspace_gb: float = Field(8.0, gt=0)
    engine_optimization_level: int = Field(3, ge=0, le=5)
    engine_version_compatible: bool = False
    engine_refit: EngineRefit = Field(
        EngineRefit.LINEAR, description="weights engines can refit for LoRAs: linear, all (with conv kernels), none"
    )
    cuda_graphs: bool = Field(True, description="capture each engine's optimum shapes as CUDA graphs at warm-up")
    cuda_graph_shapes: int = Field(
        4, ge=1, description="input shapes per engine kept with their own execution context and buffers (LRU)"
    )
    torch_fallback: TorchFallback = Field(
        TorchFallback.LAZY,
        description="lazy: load torch weights when a fallback first needs them; eager: at start-up; "
        "off: refuse what no engine or graph covers",
    )
    lock_stale_s: float = Field(120.0, gt=0, description="a build lock not refreshed for this long is taken over")
    lock_heartbeat_s: float = Field(10.0, gt=0)

    warmup: bool = Field(False, description="run one small generation at start-up")
    ready_file: Path = Field(Path("/tmp/worker-ready"), description="written with the pid once the worker serves")
    progress_every: int = Field(5, ge=1, description="denoising steps between progress updates")
    min_free_disk_gb: float = Field(1.0, ge=0)
    min_free_memory_gb: float = Field(1.0, ge=0, description="fitness threshold, and headroom the memory guard keeps")
    memory_guard: bool = Field(True, description="refuse a request whose estimated peak does not fit free memory")

    bucket_endpoint_url: str | None = None
    bucket_access_key_id: str | None = None
    bucket_secret_access_key: str | None = None
    bucket_name: str | None = Field(None, description="default: runpod's month-year bucket name")
    max_inline_bytes: int = Field(
        9_500_000, gt=0, description="largest inline response; RunPod accepts 10 MB on /run and 20 MB on /runsync"
    )
    always_upload: bool = Field(False, description="upload every image when a bucket is configured")
    bucket_url_expiry_s: int = Field(
        7 * 24 * 3600, ge=1, le=7 * 24 * 3600, description="lifetime of an uploaded image's presigned URL (S3's most)"
    )

    port: int = Field(80, ge=1, le=65535, description="HTTP mode (python -m engine.serve): the API's port")
    port_health: int | None = Field(
        None, ge=1, le=65535, description="HTTP mode: the port of GET /ping (RunPod's health check); default PORT"
    )
    http_max_waiting: int = Field(
        2, ge=0, description="HTTP mode: requests waiting while one generates; one more is refused with 429"
    )
    http_max_body_bytes: int = Field(64_000_000, gt=0, description="HTTP mode: the largest request body")
    http_host: str = Field("0.0.0.0", description="HTTP mode: the address the server listens on")

    log_level: str = "INFO"

    @field_validator("component_backends", mode="before")
    @classmethod
    def _parse_component_backends(cls, value: object) -> object:
        if isinstance(value, str):
            pairs = [item.split("=", 1) for item in value.replace(";", ",").split(",") if item.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError("expected 'component=backend' pairs separated by commas")
            return {name.strip(): backend.strip() for name, backend in pairs}
        return value

    @model_validator(mode="after")
    def _default_folders(self) -> Settings:
        if self.lora_dir is None:
            self.lora_dir = RUNPOD_VOLUME / "loras" if RUNPOD_VOLUME.is_dir() else self.cache_dir / "loras"
        if self.controlnet_dir is None:
            on_volume = RUNPOD_VOLUME.is_dir()
            self.controlnet_dir = (RUNPOD_VOLUME if on_volume else self.cache_dir) / "controlnets"
        if self.ip_adapter_dir is None:
            self.ip_adapter_dir = (RUNPOD_VOLUME if RUNPOD_VOLUME.is_dir() else self.cache_dir) / "ip_adapters"
        return self

    @model_validator(mode="after")
    def _check_ranges(self) -> Settings:
        if self.min_image_side > self.max_image_side:
            raise ValueError("MIN_IMAGE_SIDE is above MAX_IMAGE_SIDE")
        if self.engine_profiles:
            parse_ranges(self.engine_profiles, native_size=512, max_images=self.max_images)  # syntax only
        if self.default_steps > self.max_steps:
            raise ValueError("DEFAULT_STEPS is above MAX_STEPS")
        return self

    @property
    def bucket_configured(self) -> bool:
        return bool(self.bucket_endpoint_url and self.bucket_access_key_id and self.bucket_secret_access_key)

    @property
    def requires_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def backend_for(self, component: str) -> Backend:
        return self.component_backends.get(component, self.backend)


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment (and overrides); a bad value raises ConfigError with one line per
    variable, named as it is set (``BACKEND``, not ``backend``), and what it got."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        problems = []
        for item in error.errors(include_url=False):
            name = "_".join(str(part) for part in item["loc"]).upper() or "settings"
            message = item["msg"].removeprefix("Value error, ")
            got = f" (got {item['input']!r})" if item["loc"] and not isinstance(item["input"], dict) else ""
            problems.append(f"{name}: {message}{got}")
        raise ConfigError("; ".join(problems)) from None
