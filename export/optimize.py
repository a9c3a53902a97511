"""Graph cleanup and precision: constant folding, dead nodes, topological order, fp16.

TensorRT 11 takes precision from the ONNX file, so an fp16 graph is made here: weights
and activations in fp16, with normalizations and softmax kept in fp32 behind casts,
where fp16 overflows or loses the accuracy the image depends on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from polygraphy.backend.onnx import fold_constants
from polygraphy.logger import G_LOGGER

from engine.models.spec import ComponentSpec

log = logging.getLogger(__name__)
G_LOGGER.module_severity = G_LOGGER.ERROR

TWO_GIB = 2**31
FP32_OPS = [
    "InstanceNormalization",
    "GroupNormalization",
    "LayerNormalization",
    "Softmax",
    "ReduceMean",
    "Pow",
    "Sqrt",
]
"""Ops an fp16 graph keeps in fp32 (with casts around them), on top of onnxruntime's own list."""


@dataclass(frozen=True)
class GraphStats:
    nodes_before: int
    nodes_after: int
    initializer_bytes: int


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def _cleanup(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    return gs.export_onnx(graph)


def to_fp16(model: onnx.ModelProto, keep_fp32_io: list[str], large: bool) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    return convert_float_to_float16(
        model,
        keep_io_types=keep_fp32_io,
        op_block_list=DEFAULT_OP_BLOCK_LIST + FP32_OPS,
        disable_shape_infer=large,
    )


def stamp_interface(model: onnx.ModelProto, spec: ComponentSpec) -> None:
    """Declares the graph's inputs and outputs exactly as the spec names them.

    Shape inference during folding renames output dimensions after the expressions that
    compute them ("floor(1.0*batch)"); the spec's names are what every stage agrees on.
    """
    tensors = {tensor.name: tensor for tensor in (*spec.inputs, *spec.outputs)}
    for value in (*model.graph.input, *model.graph.output):
        tensor = tensors[value.name]
        shape = value.type.tensor_type.shape
        del shape.dim[:]
        for size in tensor.shape:
            dim = shape.dim.add()
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size


def optimize(source: Path, target: Path, spec: ComponentSpec, precision: str) -> GraphStats:
    """Reads an exported graph, cleans it up, converts precision, and saves it (external data over 2 GiB)."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # constant folding runs subgraphs in onnxruntime
    model = onnx.load(str(source))
    nodes_before = len(model.graph.node)
    large = initializer_bytes(model) >= TWO_GIB
    model = _cleanup(model)
    model = fold_constants(model, allow_onnxruntime_shape_inference=not large, error_ok=True)
    model = _cleanup(model)
    stamp_interface(model, spec)
    if precision == "fp16":
        keep_fp32 = [t.name for t in (*spec.inputs, *spec.outputs) if t.keep_fp32]
        model = to_fp16(model, keep_fp32, large)
    size = initializer_bytes(model)
    external = size >= TWO_GIB
    onnx.save_model(
        model,
        str(target),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=f"{target.name}.data",
    )
    log.info("optimized %s: %d -> %d nodes", target.name, nodes_before, len(model.graph.node))
    return GraphStats(nodes_before, len(model.graph.node), size)
