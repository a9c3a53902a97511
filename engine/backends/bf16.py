"""bf16 graphs on onnxruntime's CPU provider, whose kernels have no bf16 arithmetic.

The graph runs as a twin in which every node that reads or writes bf16 computes in fp32 on
its inputs cast up, and casts its outputs back down to bf16. Every tensor the graph holds in
bf16 is still rounded to bf16 where it is stored, while the arithmetic inside a node is
fp32, as a GPU kernel accumulates. The twin keeps the graph's inputs, outputs and weights
(so LoRA overrides of initializers still apply). It checks an export's structure, weights
and bf16 rounding on any machine; it does not run a bf16 kernel.
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

BF16 = onnx.TensorProto.BFLOAT16
FP32 = onnx.TensorProto.FLOAT

NATIVE_OPS = {"Cast"}
"""Ops onnxruntime's CPU provider runs on bf16 itself."""


def holds_bf16(model: onnx.ModelProto) -> bool:
    return any(tensor.data_type == BF16 for tensor in model.graph.initializer) or any(
        value.type.tensor_type.elem_type == BF16 for value in (*model.graph.input, *model.graph.output)
    )


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    values = (*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info)
    types = {value.name: value.type.tensor_type.elem_type for value in values}
    types.update((tensor.name, tensor.data_type) for tensor in model.graph.initializer)
    return types


def _upcast_attributes(node: onnx.NodeProto) -> None:
    """A constant's bf16 value (``Constant``, ``ConstantOfShape``) in fp32, which holds it exactly."""
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == BF16:
            values = numpy_helper.to_array(attribute.t).astype("float32")
            attribute.t.CopyFrom(numpy_helper.from_array(values, attribute.t.name))


def emulated_bf16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fp32-arithmetic twin of a bf16 graph (read without its external weights: they stay where they are)."""
    types = _tensor_types(model)
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    del twin.graph.node[:]
    upcast: dict[str, str] = {}

    def fp32_copy(name: str) -> str:
        if name not in upcast:
            upcast[name] = f"{name}::fp32"
            twin.graph.node.append(onnx.helper.make_node("Cast", [name], [upcast[name]], to=FP32))
        return upcast[name]

    for node in model.graph.node:
        reads = [types.get(name) == BF16 for name in node.input]
        writes = [types.get(name) == BF16 for name in node.output]
        if node.op_type in NATIVE_OPS or not (any(reads) or any(writes)):
            twin.graph.node.append(node)
            continue
        computed = onnx.NodeProto()
        computed.CopyFrom(node)
        computed.input[:] = [fp32_copy(name) if bf16 else name for name, bf16 in zip(node.input, reads, strict=True)]
        computed.output[:] = [
            f"{name}::computed" if bf16 else name for name, bf16 in zip(node.output, writes, strict=True)
        ]
        _upcast_attributes(computed)
        twin.graph.node.append(computed)
        for name, bf16 in zip(node.output, writes, strict=True):
            if bf16:
                twin.graph.node.append(onnx.helper.make_node("Cast", [f"{name}::computed"], [name], to=BF16))
    twin.graph.ClearField("value_info")
    return twin
