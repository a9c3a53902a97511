"""Half precision for a traced fp32 graph, fp16 or bf16, with the sensitive parts kept in fp32.

TensorRT 11 takes precision from the ONNX file, so the graph is retyped here: weights and
activations in the half type, and these nodes kept in fp32 behind casts:

- normalizations and softmax (``FP32_OPS``), whose reductions overflow fp16 or lose the
  accuracy the image depends on;
- RMS norms as traced, ``x / sqrt(mean(x^2) + eps)``: the mean of squares overflows fp16
  from |x| of about 256;
- the angles of sinusoidal embeddings (timesteps, SDXL's sizes, Flux's rotary positions),
  which a half type rounds by a large fraction of a radian where diffusers computes in fp32;
- in bf16 graphs, Resize, which TensorRT does not run in bf16.

onnxruntime's fp16 converter places the casts. Between two kept nodes it still rounds through
fp16 (a cast down and straight back up); those round trips are removed, so each kept region
is fp32 throughout. A bf16 graph is the fp16 one with bf16 in place of fp16: same casts,
same kept nodes. Its weights are converted from their fp32 values, not from fp16.

The graph is read without the weights the exporter put in external data: only their declared
types change here, and ``export.weights`` converts their bytes as it streams them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import numpy as np
import onnx
from onnx import numpy_helper

from export.weights import external_tensors, fp32_to_bf16

FP32_OPS = [
    "InstanceNormalization",
    "GroupNormalization",
    "LayerNormalization",
    "Softmax",
    "ReduceMean",
    "Pow",
    "Sqrt",
]
"""Ops a half graph keeps in fp32 (with casts around them), on top of onnxruntime's own list."""

HALF_TYPES = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}

FP32_OPS_IN_BF16 = ["Resize"]
"""TensorRT has no bf16 Resize (NVIDIA's diffusion demo casts its inputs and outputs for the same reason):
the VAE's and UNet's upsamplers run in fp32 in a bf16 graph."""

PERIODIC_OPS = ("Sin", "Cos")
RMS_TAIL_OPS = ("Add", "Sqrt", "Reciprocal")
"""What follows an RMS norm's mean of squares, before it divides or multiplies its input."""


def name_nodes(model: onnx.ModelProto) -> None:
    """Gives every unnamed node a unique name: which nodes stay fp32 is decided by name."""
    taken = {node.name for node in model.graph.node}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"
            while node.name in taken:
                node.name += "_"
            taken.add(node.name)


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def rms_norm_nodes(model: onnx.ModelProto) -> list[str]:
    """Each RMS norm, from the square to the product or quotient with its input: our ``rms_norm``
    symbolic, diffusers' ``RMSNorm`` and T5's layer norm all trace to Pow, ReduceMean, Add, Sqrt
    (and Reciprocal), then Div or Mul."""
    producers = {output: node for node in model.graph.node for output in node.output}
    consumers = _consumers(model)
    found: list[str] = []
    for mean in (node for node in model.graph.node if node.op_type == "ReduceMean"):
        square = producers.get(mean.input[0])
        if square is None or square.op_type != "Pow":
            continue
        chain, tail = [square, mean], mean
        while len(consumers.get(tail.output[0], [])) == 1 and consumers[tail.output[0]][0].op_type in RMS_TAIL_OPS:
            tail = consumers[tail.output[0]][0]
            chain.append(tail)
        last = consumers.get(tail.output[0], [])
        if any(node.op_type == "Sqrt" for node in chain) and len(last) == 1 and last[0].op_type in ("Div", "Mul"):
            found.extend(node.name for node in (*chain, last[0]))
    return found


def angle_nodes(model: onnx.ModelProto, keep_fp32_io: list[str]) -> list[str]:
    """The sines and cosines, with every float node their angles are computed from.

    Only nodes that depend on no half-precision graph input are followed back: the angles come
    from timesteps and sizes (inputs kept in fp32), constants and integer shapes, never from the
    activations, so the region stays a few small tensors. Needs the graph's value types.
    """
    floats = {
        value.name
        for value in (*model.graph.input, *model.graph.value_info)
        if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    }
    tainted = {value.name for value in model.graph.input if value.name in floats and value.name not in keep_fp32_io}
    for node in model.graph.node:  # in topological order; a shape read from an activation is no activation
        if any(name in tainted for name in node.input):
            tainted.update(name for name in node.output if name in floats)
    producers = {output: node for node in model.graph.node for output in node.output}
    found: dict[str, None] = {}
    pending = [node for node in model.graph.node if node.op_type in PERIODIC_OPS and node.input[0] not in tainted]
    while pending:
        node = pending.pop()
        if node.name not in found:
            found[node.name] = None
            pending.extend(
                producers[name] for name in node.input if name in producers and name in floats and name not in tainted
            )
    return list(found)


def join_fp32_islands(model: onnx.ModelProto, kept: set[str]) -> None:
    """Removes each cast down to fp16 and straight back up into a kept node, where the value came
    from a kept node or from an input kept in fp32 (the converter casts those down on entry: a
    timestep of 558.57 would reach the sines as 558.5), so the kept node reads the fp32 value."""
    producers = {output: node for node in model.graph.node for output in node.output}
    consumers = _consumers(model)
    graph_outputs = {value.name for value in model.graph.output}
    fp16, fp32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    fp32_inputs = {value.name for value in model.graph.input if value.type.tensor_type.elem_type == fp32}
    replaced: dict[str, str] = {}
    dropped: set[str] = set()  # node names: every node is named (``name_nodes``, and the converter names its casts)
    for up in model.graph.node:
        down = producers.get(up.input[0]) if up.op_type == "Cast" else None
        if down is None or down.op_type != "Cast" or _cast_target(up) != fp32 or _cast_target(down) != fp16:
            continue
        source = producers.get(down.input[0])
        from_fp32 = down.input[0] in fp32_inputs or (source is not None and source.name in kept)
        if not from_fp32 or up.output[0] in graph_outputs:
            continue
        replaced[up.output[0]] = down.input[0]
        dropped.add(up.name)
        if all(node.name in dropped for node in consumers[down.output[0]]) and down.output[0] not in graph_outputs:
            dropped.add(down.name)
    for node in model.graph.node:
        node.input[:] = [replaced.get(name, name) for name in node.input]
    kept_nodes = [node for node in model.graph.node if node.name not in dropped]
    del model.graph.node[:]
    model.graph.node.extend(kept_nodes)


def _cast_target(node: onnx.NodeProto) -> int | None:
    return next((attribute.i for attribute in node.attribute if attribute.name == "to"), None)


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


def _fp32_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The inline fp32 tensors (initializers, constants' values) by name, before the converter rounds them."""
    values = {
        tensor.name: numpy_helper.to_array(tensor)
        for tensor in model.graph.initializer
        if tensor.data_type == onnx.TensorProto.FLOAT and tensor.data_location != onnx.TensorProto.EXTERNAL
    }
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == onnx.TensorProto.FLOAT:
                values[f"{node.name}.{attribute.name}"] = numpy_helper.to_array(attribute.t)
    return values


def _bf16_tensor(tensor: onnx.TensorProto, original: np.ndarray | None) -> onnx.TensorProto:
    values = original if original is not None else numpy_helper.to_array(tensor).astype(np.float32)
    return numpy_helper.from_array(fp32_to_bf16(values), tensor.name)


def fp16_to_bf16(model: onnx.ModelProto, originals: dict[str, np.ndarray]) -> None:
    """Retypes every fp16 tensor, cast and value of a converted graph to bf16; inline values come
    from their fp32 originals (fp16's range would have clipped them)."""
    fp16, bf16 = onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        if value.type.tensor_type.elem_type == fp16:
            value.type.tensor_type.elem_type = bf16
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.data_type != fp16:
            continue
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor.data_type = bf16
        else:
            model.graph.initializer[index].CopyFrom(_bf16_tensor(tensor, originals.get(tensor.name)))
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.INT and attribute.name in ("to", "dtype") and attribute.i == fp16:
                attribute.i = bf16
            elif attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == fp16:
                attribute.t.CopyFrom(_bf16_tensor(attribute.t, originals.get(f"{node.name}.{attribute.name}")))


def to_half(model: onnx.ModelProto, keep_fp32_io: list[str], precision: str, value_info: onnx.GraphProto) -> set[str]:
    """Retypes the graph to ``precision`` (fp16 or bf16) in place; returns the external initializers
    whose data must be converted from fp32 as it is streamed. ``value_info`` holds the types and
    shapes of every tensor, inferred on the structure alone: the converter places its casts by them.
    """
    from onnxruntime.transformers import float16

    name_nodes(model)
    model.graph.ClearField("value_info")
    model.graph.value_info.extend(value_info.value_info)
    kept = rms_norm_nodes(model) + angle_nodes(model, keep_fp32_io)
    was_fp32 = {t.name for t in external_tensors(model) if t.data_type == onnx.TensorProto.FLOAT}
    originals = _fp32_values(model) if precision == "bf16" else {}
    fp32_ops = float16.DEFAULT_OP_BLOCK_LIST + FP32_OPS + (FP32_OPS_IN_BF16 if precision == "bf16" else [])
    with _value_info_from_declared_shapes(float16):
        float16.convert_float_to_float16(
            model,
            keep_io_types=keep_fp32_io,
            op_block_list=fp32_ops,
            node_block_list=kept,
            disable_shape_infer=True,
        )
    join_fp32_islands(model, set(kept) | {node.name for node in model.graph.node if node.op_type in set(fp32_ops)})
    if precision == "bf16":
        fp16_to_bf16(model, originals)
    return {t.name for t in external_tensors(model) if t.name in was_fp32 and t.data_type == HALF_TYPES[precision]}
