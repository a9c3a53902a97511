"""The device and precision the worker, the export and the benchmarks run on, from ``DEVICE`` and ``PRECISION``."""

from __future__ import annotations

import torch

from engine.common.errors import WorkerError
from engine.settings import Precision, Quantize


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WorkerError(f"DEVICE={name} but no CUDA device is visible")
    return device


def resolve_precision(precision: Precision, device: torch.device) -> str:
    """``auto`` is fp16 on a GPU (with bf16 where a checkpoint is bf16: see the families'
    ``component_precision``) and fp32 on the CPU; bf16 also runs on the CPU, fp16 does not."""
    if precision is Precision.AUTO:
        return "fp16" if device.type == "cuda" else "fp32"
    if precision is Precision.FP16 and device.type != "cuda":
        raise WorkerError("PRECISION=fp16 needs a CUDA device; use fp32 on the CPU")
    return precision.value


def auto_quantization(capability: tuple[int, int] | None) -> str | None:
    """The format a GPU of this compute capability runs fastest: nvfp4 from Blackwell (10.0), fp8 from Ada
    (8.9), int8 from Ampere (8.0); none below, and none without a GPU."""
    if capability is None:
        return None
    if capability >= (10, 0):
        return "nvfp4"
    if capability >= (8, 9):
        return "fp8"
    if capability >= (8, 0):
        return "int8"
    return None


def resolve_quantization(quantize: Quantize, device: torch.device) -> str | None:
    """QUANTIZE for this device: a format name, or None for unquantized."""
    if quantize is Quantize.NONE:
        return None
    if quantize is Quantize.AUTO:
        return auto_quantization(torch.cuda.get_device_capability(device) if device.type == "cuda" else None)
    return quantize.value
