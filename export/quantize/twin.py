"""A quantized graph onnxruntime can run on the CPU, for checking it against the fake-quantized module.

INT8 graphs hold standard ``QuantizeLinear``/``DequantizeLinear`` and run as they are. FP8 graphs hold
TensorRT's ``trt::TRT_FP8QuantizeLinear``/``TRT_FP8DequantizeLinear``, which onnxruntime cannot
load; their twin swaps each for the standard opset-21 op with a ``FLOAT8E4M3FN`` zero point, which
onnxruntime's CPU kernels run (round to nearest even, saturating at ±448 x scale, as TensorRT's FP8
conversion does). The twin shares the graph's data file; only its structure is rewritten.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

TRT_DOMAIN = "trt"
FP8_OPS = {"TRT_FP8QuantizeLinear": "QuantizeLinear", "TRT_FP8DequantizeLinear": "DequantizeLinear"}
TWIN_OPSET = 21
"""The first opset whose QuantizeLinear/DequantizeLinear take float8 (and per-axis scales, as before)."""


def has_trt_ops(graph: onnx.GraphProto) -> bool:
    return any(node.domain == TRT_DOMAIN for node in graph.node)


def standard_fp8(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with TensorRT's FP8 Q/DQ ops as standard ones, at opset 21; any other ``trt::`` op is refused."""
    graph = model.graph
    zero_point = "fp8_zero_point"
    rewritten = 0
    quantized: set[str] = set()
    for node in graph.node:
        if node.domain != TRT_DOMAIN:
            continue
        if node.op_type not in FP8_OPS:
            raise ValueError(f"no standard twin for trt::{node.op_type}")
        node.domain = ""
        node.op_type = FP8_OPS[node.op_type]
        if node.op_type == "QuantizeLinear":
            del node.input[2:]
            node.input.append(zero_point)
            quantized.update(node.output)
        del node.attribute[:]  # the TensorRT ops' only attribute (saturate) is the standard ops' default
        rewritten += 1
    for info in graph.value_info:  # shape inference typed TensorRT's FP8 outputs as uint8
        if info.name in quantized:
            info.type.tensor_type.elem_type = TensorProto.FLOAT8E4M3FN
    if rewritten:
        graph.initializer.append(helper.make_tensor(zero_point, TensorProto.FLOAT8E4M3FN, [], [0.0]))
    imports = [o for o in model.opset_import if o.domain not in ("", TRT_DOMAIN)]
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", TWIN_OPSET), *imports])
    return model


def cpu_twin(graph_path: Path, twin_path: Path) -> Path:
    """The path of a graph onnxruntime's CPU provider runs: the graph itself, or its FP8 twin written beside it
    (``twin_path`` in the same folder, so the data file is shared)."""
    model = onnx.load(str(graph_path), load_external_data=False)
    if not has_trt_ops(model.graph):
        return graph_path
    if twin_path.parent != graph_path.parent:
        raise ValueError("the twin must sit beside its graph, to share its data file")
    onnx.save_model(standard_fp8(model), str(twin_path))
    return twin_path
