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


def version_tags(trt: ModuleType) -> tuple[str, str]:
    """The exact version an engine must match, and the tag of version-compatible engines it can run."""
    version = trt.__version__
    return version, f"{version.split('.')[0]}.x-vc"


def gpu_tag(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


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
