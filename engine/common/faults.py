"""Which failures the worker survives and which mean the GPU (and so the worker) is gone.

A worker is replaced only for a real device fault: an error of a type the CUDA libraries raise
(torch, onnxruntime, TensorRT's runner), raised on a CUDA device, and confirmed by the device
still failing afterwards. What an error's message says never decides it: messages can quote
request data.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

DeviceCheck = Callable[[torch.device], bool]
"""Whether a device still fails: the confirmation a fault is fatal."""


class DeviceExecutionError(RuntimeError):
    """A backend's kernel launch on the GPU reported failure (TensorRT's execute returning false)."""


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError)


def _cuda_error_types() -> tuple[type[BaseException], ...]:
    """The exception types CUDA failures arrive as; onnxruntime's only once something imported it."""
    types: list[type[BaseException]] = [
        torch.AcceleratorError,
        torch.cuda.CudaError,
        torch.cuda.DeferredCudaCallError,
        DeviceExecutionError,
    ]
    ort_errors = sys.modules.get("onnxruntime.capi.onnxruntime_pybind11_state")
    if ort_errors is not None:  # onnxruntime reports a CUDA failure as one of these, whatever it was
        types += [getattr(ort_errors, name) for name in ("Fail", "RuntimeException", "EPFail", "EngineError")]
    return tuple(types)


def device_still_fails(device: torch.device) -> bool:
    """A corrupted CUDA context fails every later call; a synchronize and one tiny kernel say whether it is."""
    try:
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).add_(1).item()
    except Exception as error:
        log.critical("the device still fails: %s", error)
        return True
    return False


def is_device_error(error: BaseException, device: torch.device) -> bool:
    """An error of a CUDA library's type, raised while running on a CUDA device (out of memory aside)."""
    return device.type == "cuda" and not is_out_of_memory(error) and isinstance(error, _cuda_error_types())


def is_unrecoverable(error: BaseException, device: torch.device, still_fails: DeviceCheck = device_still_fails) -> bool:
    """True when only a fresh process (a replaced worker) can serve again: a device error after which
    ``still_fails`` (by default a ``torch.cuda.synchronize``) finds the device still broken."""
    return is_device_error(error, device) and still_fails(device)


@dataclass(frozen=True)
class DeviceFaults:
    """The worker's judge of its device's faults; ``still_fails`` is the confirmation, a synchronize by default."""

    device: torch.device
    still_fails: DeviceCheck = device_still_fails

    def unrecoverable(self, error: BaseException) -> bool:
        return is_unrecoverable(error, self.device, self.still_fails)
