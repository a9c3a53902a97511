"""Graph cleanup and precision: constant folding, dead nodes, topological order, then fp16 or
bf16 (``export.precision``).

Every pass works on the graph without the weights that the exporter put in external
data (all of them, for a graph over 2 GiB): folding leaves nodes on those weights alone,
shape inference and the half-precision retyping read only their types and shapes, and the weights
are then streamed into the artifact (``export.weights``). A small graph and a 10 GB one
take the same passes, so they get the same fp32 islands, and memory stays bounded by
the graph's structure rather than its weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from onnx.external_data_helper import uses_external_data
from polygraphy.logger import G_LOGGER

from engine.spec import ComponentSpec
from export.precision import HALF_TYPES, to_half
from export.weights import external_tensors, externalize, stream_external_weights, tensor_bytes

log = logging.getLogger(__name__)
G_LOGGER.module_severity = G_LOGGER.ERROR


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
    if precision in HALF_TYPES:
        keep_fp32 = [t.name for t in (*spec.inputs, *spec.outputs) if t.keep_fp32]
        to_convert = to_half(model, keep_fp32, precision, infer_shapes(model).graph)
    external = any(True for _ in external_tensors(model))
    if external:
        stream_external_weights(model, source.parent, target, to_convert, precision)
    onnx.save_model(model, str(target))
    size = initializer_bytes(model)
    log.info(
        "optimized %s: %d -> %d nodes, %d MB of weights", target.name, nodes_before, len(model.graph.node), size >> 20
    )
    return GraphStats(nodes_before, len(model.graph.node), size, external)
