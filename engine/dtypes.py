"""The element types tensors take, as specs, torch, NumPy and TensorRT each name them: one table."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ElementType:
    name: str
    """As component specs write it."""
    torch: torch.dtype
    numpy: type | None
    """None where NumPy has no such type (bfloat16)."""
    tensorrt: str
    """The member name of TensorRT's ``DataType``."""


ELEMENT_TYPES = (
    ElementType("float32", torch.float32, np.float32, "FLOAT"),
    ElementType("float16", torch.float16, np.float16, "HALF"),
    ElementType("bfloat16", torch.bfloat16, None, "BF16"),
    ElementType("int64", torch.int64, np.int64, "INT64"),
    ElementType("int32", torch.int32, np.int32, "INT32"),
    ElementType("int8", torch.int8, np.int8, "INT8"),
    ElementType("uint8", torch.uint8, np.uint8, "UINT8"),
    ElementType("bool", torch.bool, np.bool_, "BOOL"),
)
BY_NAME = {element.name: element for element in ELEMENT_TYPES}
BY_TORCH = {element.torch: element for element in ELEMENT_TYPES}
BY_TENSORRT = {element.tensorrt: element for element in ELEMENT_TYPES}
