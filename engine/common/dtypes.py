"""The element types tensors take, as specs, torch, NumPy and TensorRT each name them: one table.

NumPy's bfloat16 is ml_dtypes', imported on first use: its extension takes about half a
second to load, which a worker on torch would pay at every cold start for nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ElementType:
    name: str
    """As component specs write it."""
    torch: torch.dtype
    numpy_name: str
    """NumPy's name for it; bfloat16 is ml_dtypes' type, as onnx reads it (NumPy has none of its own)."""
    tensorrt: str
    """The member name of TensorRT's ``DataType``."""
    onnx: int
    """``onnx.TensorProto``'s number (fixed by the ONNX standard), which onnxruntime's bindings also take."""

    @property
    def numpy(self) -> type:
        return bfloat16() if self.numpy_name == "bfloat16" else getattr(np, self.numpy_name)


ELEMENT_TYPES = (
    ElementType("float32", torch.float32, "float32", "FLOAT", 1),
    ElementType("float16", torch.float16, "float16", "HALF", 10),
    ElementType("bfloat16", torch.bfloat16, "bfloat16", "BF16", 16),
    ElementType("int64", torch.int64, "int64", "INT64", 7),
    ElementType("int32", torch.int32, "int32", "INT32", 6),
    ElementType("int8", torch.int8, "int8", "INT8", 3),
    ElementType("uint8", torch.uint8, "uint8", "UINT8", 2),
    ElementType("bool", torch.bool, "bool_", "BOOL", 9),
)
BY_NAME = {element.name: element for element in ELEMENT_TYPES}
BY_TORCH = {element.torch: element for element in ELEMENT_TYPES}
BY_TENSORRT = {element.tensorrt: element for element in ELEMENT_TYPES}

PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""What a component's float tensors and weights are at each precision a graph can have."""


def bfloat16() -> type:
    """ml_dtypes' bfloat16, imported here on first use."""
    import ml_dtypes

    return ml_dtypes.bfloat16


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's values as NumPy holds them, bfloat16 included (``Tensor.numpy`` refuses it)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(bfloat16())
    return tensor.numpy()


def from_numpy(values: np.ndarray) -> torch.Tensor:
    """The inverse of ``to_numpy``: ``torch.from_numpy`` does not know ml_dtypes' bfloat16."""
    if values.dtype.name == "bfloat16" and values.dtype == bfloat16():
        return torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(values)
