"""The device and precision the worker, the export and the benchmarks run on, from ``DEVICE`` and ``PRECISION``."""

from __future__ import annotations

import torch

from engine.common.errors import WorkerError
from engine.settings import Precision


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
