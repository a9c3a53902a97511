"""Which failures the worker survives and which mean the GPU (and so the worker) is gone."""

from __future__ import annotations

import torch

FATAL_CUDA_MESSAGES = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "uncorrectable ECC error",
    "CUDA error: misaligned address",
    "CUDA error: an illegal instruction",
    "CUDA driver",
    "CUDNN_STATUS_EXECUTION_FAILED",
    "CUBLAS_STATUS_EXECUTION_FAILED",
)
"""A CUDA context that raised one of these is corrupted: every later kernel fails too."""


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError)


def is_unrecoverable(error: BaseException) -> bool:
    """True when only a fresh process (a replaced worker) can serve again."""
    if is_out_of_memory(error):
        return False
    message = str(error)
    return any(text in message for text in FATAL_CUDA_MESSAGES)
