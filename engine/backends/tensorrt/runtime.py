"""The TensorRT module and runtime: the full bindings or the lean runtime, version tags, the GPU's tag, a logger.

``import tensorrt`` happens here only, so CPU paths never need it.
"""

from __future__ import annotations

import logging
from types import ModuleType
from typing import Any

import torch

from engine.common.errors import BackendUnavailable

log = logging.getLogger(__name__)


def tensorrt_module() -> ModuleType:
    """The full TensorRT bindings, or the lean runtime (which runs version-compatible engines)."""
    try:
        import tensorrt

        return tensorrt
    except ImportError:
        pass
    try:
        import tensorrt_lean

        return tensorrt_lean
    except ImportError as error:
        raise BackendUnavailable("TensorRT is not installed (pip install '.[gpu]')") from error


COMPATIBLE_SUFFIX = "-vc"


def version_tags(trt: ModuleType) -> tuple[str, str]:
    """The tags of the engines this TensorRT builds: its exact version, and that version with ``-vc`` for a
    version-compatible engine (the builder's version is kept, as only that release and later ones load it)."""
    version = trt.__version__
    return version, f"{version}{COMPATIBLE_SUFFIX}"


def _release(version: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return None


def built_by_newer(tag: str, version: str) -> bool:
    """A version-compatible engine that a later release of this major version built: one this runtime cannot
    load, and one that says nothing is wrong with the store (a newer worker built it)."""
    built, running = _release(tag.removesuffix(COMPATIBLE_SUFFIX)), _release(version)
    if not tag.endswith(COMPATIBLE_SUFFIX) or built is None or running is None:
        return False
    return built[0] == running[0] and built > running


def version_refusal(tag: str, version: str) -> str | None:
    """Why a TensorRT of ``version`` cannot load an engine tagged ``tag``; None when it can.

    A plain engine loads only on the release that built it. A version-compatible one loads on that release
    and later ones of its major version, never on an older runtime: "engines built with version compatibility
    enabled using TensorRT 11.0 will be compatible with TensorRT 11.1 and later 11.x versions", and "engines
    built with newer versions do not work with older runtimes" (NVIDIA, TensorRT 11.1 documentation, Engine
    Compatibility: docs.nvidia.com/deeplearning/tensorrt/11.1.0/inference-library/engine-compatibility.html).
    """
    if tag == version:
        return None
    if not tag.endswith(COMPATIBLE_SUFFIX):
        return f"built by TensorRT {tag}, this worker runs {version}"
    builder = tag.removesuffix(COMPATIBLE_SUFFIX)
    built, running = _release(builder), _release(version)
    if built is None or running is None:
        return f"version-compatible, but its tag does not say which TensorRT release built it ({tag})"
    if built[0] != running[0]:
        return f"version-compatible, built by TensorRT {builder}, another major version than this worker's {version}"
    if built > running:
        return (
            f"version-compatible, built by TensorRT {builder}, newer than this worker's {version}: "
            "only that release and later ones load it"
        )
    return None


def gpu_tag(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def gpu_model(device: torch.device) -> str:
    """The GPU's model and memory, with no serial or UUID: what tells two GPUs of one compute capability apart."""
    properties = torch.cuda.get_device_properties(device)
    return f"{properties.name} {round(properties.total_memory / 2**30)}GB"


def make_logger(trt: ModuleType) -> Any:
    """TensorRT's messages into this process's logging, at matching levels."""
    severity = trt.ILogger.Severity
    levels = {
        severity.INTERNAL_ERROR: logging.CRITICAL,
        severity.ERROR: logging.ERROR,
        severity.WARNING: logging.WARNING,
        severity.INFO: logging.DEBUG,
        severity.VERBOSE: logging.DEBUG,
    }

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, level: Any, message: str) -> None:
            log.log(levels.get(level, logging.INFO), "tensorrt: %s", message)

    return Logger()


def make_runtime(trt: ModuleType, logger: Any = None) -> Any:
    runtime = trt.Runtime(logger or make_logger(trt))
    runtime.engine_host_code_allowed = True  # version-compatible engines carry their own runtime code
    return runtime
