"""Weights in external data, moved tensor by tensor so a 10 GB graph never sits in memory.

The raw export of a graph over 2 GiB keeps each weight in a file of its own next to the
graph. The optimized artifact keeps them all in one data file beside ``model.onnx``,
written here one tensor at a time, converted to fp16 or bf16 on the way where the graph's
conversion retyped the tensor. Peak memory is one chunk, whatever the model's size.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import BinaryIO

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

ALIGNMENT = 4096
"""Each tensor starts on a page boundary, so ONNX Runtime and TensorRT can map it in place."""

EXTERNAL_THRESHOLD = 1024
"""Tensors from this many bytes go to external data (smaller ones, like shapes and axes, stay inline
where constant folding reads them), as torch's exporter does for graphs over 2 GiB."""

CHUNK_BYTES = 64 * 2**20
"""Weights are copied (and converted) this many bytes at a time, a multiple of every element size."""


def data_file_name(graph_path: Path) -> str:
    return f"{graph_path.name}.data"


def external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Initializers whose bytes live outside the graph file (the exporter puts only weights there)."""
    return (tensor for tensor in model.graph.initializer if uses_external_data(tensor))


def externalize(source: Path) -> Path:
    """A copy of a graph with its inline weights moved to external data, so every later pass works
    on the structure alone whatever the graph's size. Graphs that already keep their weights outside
    (the exporter does so over 2 GiB, where inline is impossible) are returned as they are."""
    structure = onnx.load(str(source), load_external_data=False)
    if any(True for _ in external_tensors(structure)):
        return source
    del structure
    model = onnx.load(str(source))
    target = source.with_name(f"externalized-{source.name}")
    onnx.save_model(
        model,
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_file_name(target),
        size_threshold=EXTERNAL_THRESHOLD,
    )
    return target


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """A tensor's size from its type and dims, without reading its data."""
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _copy(source: Path, offset: int, length: int, out: BinaryIO, convert: Callable[[bytes], bytes] | None) -> int:
    """Copies ``length`` bytes of ``source`` from ``offset`` into ``out`` a chunk at a time, converted
    by ``convert`` where given; returns the bytes written."""
    written = 0
    with source.open("rb") as handle:
        handle.seek(offset)
        remaining = length
        while remaining:
            chunk = handle.read(min(CHUNK_BYTES, remaining))
            if not chunk:
                raise OSError(f"{source} ends {remaining} bytes before the {length} the graph expects at {offset}")
            remaining -= len(chunk)
            if convert is not None:
                chunk = convert(chunk)
            out.write(chunk)
            written += len(chunk)
    return written


def point_to(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Like onnx's ``set_external_data``, for a tensor whose data was never loaded."""
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


FP16_MIN_POSITIVE = 5.96e-08
FP16_MAX_FINITE = 65504.0
"""The bounds of onnxruntime's ``convert_np_to_float16``, whose conversion the fp16 graphs share."""


def saturating_fp16(values: np.ndarray) -> np.ndarray:
    """fp32 values as onnxruntime's fp16 converter writes them, bit for bit: tiny values keep their
    sign at the smallest subnormal, huge finite ones saturate, zero, inf and NaN stay. Edited in place
    on one copy (the converter makes several full-size passes: minutes over a UNet, and more memory)."""
    tensor = torch.from_numpy(np.array(values, dtype=np.float32))
    magnitude = tensor.abs()
    tiny = (magnitude > 0) & (magnitude < FP16_MIN_POSITIVE)
    huge = (magnitude > FP16_MAX_FINITE) & (magnitude < float("inf"))
    del magnitude
    tensor[tiny] = torch.copysign(torch.tensor(FP16_MIN_POSITIVE), tensor[tiny])
    tensor[huge] = torch.copysign(torch.tensor(FP16_MAX_FINITE), tensor[huge])
    return tensor.half().numpy()


def fp32_bytes_to_fp16(data: bytes) -> bytes:
    return saturating_fp16(np.frombuffer(data, dtype=np.float32)).tobytes()


def fp32_to_bf16(values: np.ndarray) -> np.ndarray:
    """Rounded to the nearest bf16, ties to even, as torch converts: bf16 has fp32's range, so
    nothing saturates."""
    return np.asarray(values, dtype=np.float32).astype(ml_dtypes.bfloat16)


def fp32_bytes_to_bf16(data: bytes) -> bytes:
    return fp32_to_bf16(np.frombuffer(data, dtype=np.float32)).tobytes()


CONVERSIONS: dict[str, Callable[[bytes], bytes]] = {"fp16": fp32_bytes_to_fp16, "bf16": fp32_bytes_to_bf16}


def stream_external_weights(
    model: onnx.ModelProto, source_dir: Path, target: Path, convert: Collection[str] = (), precision: str = "fp16"
) -> int:
    """Copies every external tensor of ``model`` (read relative to ``source_dir``) into one data file
    beside ``target``, converting the ones named in ``convert`` from fp32 to ``precision``, and points
    the graph at it.

    Returns the bytes written.
    """
    data_path = target.parent / data_file_name(target)
    written = 0
    with data_path.open("wb") as out:
        for tensor in external_tensors(model):
            info = ExternalDataInfo(tensor)
            source = source_dir / info.location
            offset = info.offset or 0
            length = info.length if info.length is not None else source.stat().st_size - offset
            out.write(b"\0" * (-out.tell() % ALIGNMENT))
            start = out.tell()
            conversion = CONVERSIONS[precision] if tensor.name in convert else None
            size = _copy(source, offset, length, out, conversion)
            if size != tensor_bytes(tensor):
                raise ValueError(f"{tensor.name}: {size} bytes of data for a tensor of {tensor_bytes(tensor)}")
            written += size
            point_to(tensor, data_path.name, start, size)
    return written
