"""A device fault is fatal by its type, its device and the device still failing: never by its words."""

from __future__ import annotations

import pytest
import torch
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument

from engine.common.faults import DeviceExecutionError, is_unrecoverable

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
ILLEGAL = "CUDA error: an illegal memory access was encountered"


def fails(device: torch.device) -> bool:
    return True


def works(device: torch.device) -> bool:
    return False


@pytest.mark.parametrize(
    "error",
    [
        torch.AcceleratorError(ILLEGAL),
        torch.cuda.DeferredCudaCallError("CUDA call failed lazily"),
        DeviceExecutionError("unet: TensorRT execution failed"),
        Fail("CUDA failure 700: an illegal memory access was encountered"),
    ],
    ids=["torch", "torch.cuda", "tensorrt", "onnxruntime"],
)
def test_a_cuda_library_error_on_a_cuda_device_is_fatal_only_while_the_device_fails(error):
    assert is_unrecoverable(error, CUDA, fails)
    assert not is_unrecoverable(error, CUDA, works)
    assert not is_unrecoverable(error, CPU, fails)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError(ILLEGAL),
        ValueError("Port could not be cast to integer value as 'CUDA driver'"),
        InvalidArgument("illegal memory access"),
        torch.cuda.OutOfMemoryError("CUDA out of memory"),
    ],
    ids=["runtime-error", "request-text", "onnxruntime-argument", "out-of-memory"],
)
def test_other_errors_are_never_fatal_whatever_they_say(error):
    assert not is_unrecoverable(error, CUDA, fails)


def test_the_confirmation_is_asked_of_the_device_that_ran():
    asked: list[torch.device] = []
    is_unrecoverable(torch.AcceleratorError(ILLEGAL), torch.device("cuda:1"), lambda device: asked.append(device))
    assert asked == [torch.device("cuda:1")]
