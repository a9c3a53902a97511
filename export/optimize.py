"""Graph cleanup and precision: constant folding, dead nodes, topological order, fp16.

TensorRT 11 takes precision from the ONNX file, so an fp16 graph is made here: weights
and activations in fp16, with normalizations and softmax kept in fp32 behind casts,
where fp16 overflows or loses the accuracy the image depends on.

Every pass works on the graph without the weights that the exporter put in external
data (all of them, for a graph over 2 GiB): folding leaves nodes on those weights alone,
shape inference and the fp16 retyping read only their types and shapes, and the weights
are then streamed into the artifact (``export.weights``). A small graph and a 10 GB one
take the same passes, so they get the same fp32 islands, and memory stays bounded by
the graph's structure rather than its weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import onnx
import onnx_graphsurgeon as gs
from onnx.external_data_helper import uses_external_data
from polygraphy.logger import G_LOGGER

from engine.models.spec import ComponentSpec
from export.weights import external_tensors, externalize, stream_external_weights, tensor_bytes

log = logging.getLogger(__name__)
G_LOGGER.module_severity = G_LOGGER.ERROR

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
    external_data: bool


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(tensor_bytes(t) for t in model.graph.initializer)


def _reads_external_weights(node: gs.Node) -> bool:
    return any(
        isinstance(tensor, gs.Constant)
        and isinstance(tensor._values, gs.ir.tensor.LazyValues)
        and tensor._values.tensor.data_location == onnx.TensorProto.EXTERNAL
        for tensor in node.inputs
    )


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with every intermediate tensor's type and shape, found without reading any weight.

    onnxruntime's symbolic inference (what polygraphy folds with) tries to read the value of
    every initializer an arithmetic node touches, so it sees the external weights as graph
    inputs of their declared type and shape; onnx's own inference is the fallback, as in polygraphy.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    view = onnx.ModelProto()
    view.CopyFrom(model)
    weights = [t for t in view.graph.initializer if uses_external_data(t)]
    inline = [t for t in view.graph.initializer if not uses_external_data(t)]
    view.graph.ClearField("initializer")
    view.graph.initializer.extend(inline)
    view.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in weights)
    # Its "cannot determine if ... < 0" warnings (a transformer's position-embedding crop) are unknowns it merges
    logging.getLogger("onnxruntime.tools.symbolic_shape_infer").setLevel(logging.ERROR)
    try:
        inferred = SymbolicShapeInference.infer_shapes(view, auto_merge=True)
    except Exception as error:  # its failures are untyped; onnx's inference still gives most shapes
        log.debug("symbolic shape inference failed, using onnx's: %s", error)
        inferred = onnx.shape_inference.infer_shapes(view)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    result.graph.ClearField("value_info")
    result.graph.value_info.extend(inferred.graph.value_info)
    return result


def fold_and_clean(model: onnx.ModelProto, max_passes: int = 8) -> onnx.ModelProto:
    """Removes dead nodes, folds constant subgraphs (shape arithmetic; the exporter already folded
    the weights) pass after pass until nothing changes, as polygraphy's folding does, and sorts the
    graph. Nodes on unloaded external weights are never evaluated."""
    for _ in range(max_passes):
        nodes_before = len(model.graph.node)
        graph = gs.import_onnx(infer_shapes(model))
        graph.cleanup().toposort()
        graph.fold_constants(error_ok=True, should_exclude_node=_reads_external_weights)
        model = gs.export_onnx(graph.cleanup().toposort())
        if len(model.graph.node) == nodes_before:
            break
    return model


@contextmanager
def _value_info_from_declared_shapes(float16: ModuleType) -> Iterator[None]:
    """onnxruntime's converter reads a converted initializer's whole data just to learn its shape,
    which fails (and would cost the model's size in memory) for weights in external data. For the
    conversion, it learns the shape from the tensor's declared dims instead: the same value info."""
    original = getattr(float16, "make_value_info_from_tensor", None)
    if original is None:
        raise RuntimeError("onnxruntime's fp16 converter changed: make_value_info_from_tensor is gone")
    float16.make_value_info_from_tensor = lambda tensor: onnx.helper.make_tensor_value_info(
        tensor.name, tensor.data_type, list(tensor.dims)
    )
    try:
        yield
    finally:
        float16.make_value_info_from_tensor = original


def to_fp16(model: onnx.ModelProto, keep_fp32_io: list[str]) -> set[str]:
    """Retypes the graph to fp16 in place; returns the external initializers whose data must be converted.

    onnxruntime's converter places its casts from the graph's value types, so shapes are
    inferred first, on the structure alone; for external tensors it only changes the
    declared type, and their bytes are converted when they are streamed.
    """
    from onnxruntime.transformers import float16

    model.graph.ClearField("value_info")
    model.graph.value_info.extend(infer_shapes(model).graph.value_info)
    was_fp32 = {t.name for t in external_tensors(model) if t.data_type == onnx.TensorProto.FLOAT}
    with _value_info_from_declared_shapes(float16):
        float16.convert_float_to_float16(
            model,
            keep_io_types=keep_fp32_io,
            op_block_list=float16.DEFAULT_OP_BLOCK_LIST + FP32_OPS,
            disable_shape_infer=True,
        )
    return {t.name for t in external_tensors(model) if t.name in was_fp32 and t.data_type == onnx.TensorProto.FLOAT16}


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
    """Reads an exported graph without its external weights, cleans it up, converts precision, and
    saves it; external weights go to one data file beside ``target``, read from ``source``'s folder."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # constant folding runs subgraphs in onnxruntime
    source = externalize(source)
    model = onnx.load(str(source), load_external_data=False)
    nodes_before = len(model.graph.node)
    model = fold_and_clean(model)
    stamp_interface(model, spec)
    to_convert: set[str] = set()
    if precision == "fp16":
        keep_fp32 = [t.name for t in (*spec.inputs, *spec.outputs) if t.keep_fp32]
        to_convert = to_fp16(model, keep_fp32)
    external = any(True for _ in external_tensors(model))
    if external:
        stream_external_weights(model, source.parent, target, to_convert)
    onnx.save_model(model, str(target))
    size = initializer_bytes(model)
    log.info(
        "optimized %s: %d -> %d nodes, %d MB of weights", target.name, nodes_before, len(model.graph.node), size >> 20
    )
    return GraphStats(nodes_before, len(model.graph.node), size, external)
