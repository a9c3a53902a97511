"""Each activation quantizer of a quantized graph against the fake-quantized module's, on the same values.

At the outputs, one value rounded a step apart and a quantizer slightly off look alike: both spread
over every output element through the layers after them, by about as much (tiny UNet: one flipped
activation moves the outputs by 1e-3 to 5.8e-3 of the largest on average, a quantizer 5% off or left
out by 4.7e-3 to 2.2e-2). Inside the network the two runs drift apart too: after one flip, later
quantizers' inputs differ slightly and round differently in up to 40% of their elements (FP8). So each
Q/DQ pair of the graph is checked on its own: onnxruntime gives the values its ``QuantizeLinear``
reads and what its ``DequantizeLinear`` returns, and the module's quantizer (a copy, ModelOpt's fake
quantization) is applied to the same values. Every enabled input quantizer must have its pair in the
graph (ModelOpt's exporter names the nodes after it) and no pair may lack a quantizer; within each
tensor, values may be a step apart only where one sits on a rounding tie (torch multiplies by
1/scale, onnxruntime divides): a few (``APART_FRACTION``). A scale a few percent off moves
every nonzero element.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from onnx import TensorProto, helper

from engine.backends.onnxruntime import OnnxRuntimeRunner
from engine.common.errors import ArtifactError
from engine.spec import ComponentSpec
from export.validate import Reference

PROBE_FILE = "probe.onnx"

APART = 1e-6
"""Elements further apart than this fraction of the tensor's largest value count as apart: equal codes
dequantize to within 3e-7 of it (float rounding of code x scale), codes one step apart differ by at
least 1/127 (INT8) or 1/(448 x 512) (FP8's smallest subnormal step) of the quantizer's amax."""

APART_FRACTION = 1e-3
APART_AT_LEAST = 8
"""A tensor passes with up to ``APART_FRACTION`` of its values apart, and never fewer than ``APART_AT_LEAST``.
Measured (tiny UNet, tiny SDXL, SD3 and Flux transformers; INT8 and FP8; every input quantizer at each
validation shape): at most 1 value apart in a tensor (1 of 2,560 to 131,072; most tensors none); full-size
SD 1.5 UNet INT8: 82 of 130.7 M values in 726 tensors, at most 4.9e-5 of one; with one quantizer's scale
5% off, 91% to 100% of its tensor's values apart (tiny UNet, each of its 66 in turn)."""


def input_quantizers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Copies of the module's enabled input quantizers, on the CPU, without SmoothQuant's pre-quantization scale
    (the graph multiplies by it before its ``QuantizeLinear``)."""
    found = {}
    for name, child in module.named_modules():
        if name.endswith("input_quantizer") and child.is_enabled:
            quantizer = copy.deepcopy(child).cpu()
            quantizer._enable_pre_quant_scale = False
            found[name] = quantizer
    return found


def graph_quantizers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """The module's quantizer name for each ``DequantizeLinear`` (standard or TensorRT's) of an input quantizer:
    ``/unet/mid_block/.../to_q/input_quantizer/DequantizeLinear`` -> ``unet.mid_block....to_q.input_quantizer``."""
    found = {}
    for node in graph.node:
        if node.op_type.endswith("DequantizeLinear"):
            path = node.name.strip("/").rpartition("/")[0]
            if path.endswith("input_quantizer"):
                found[path.replace("/", ".")] = node
    return found


@dataclass(frozen=True)
class QuantizerComparison:
    shape: str
    quantizer: str
    elements: int
    apart: int
    """Elements further apart than ``APART`` of the tensor's largest value."""

    @property
    def fraction(self) -> float:
        return self.apart / max(self.elements, 1)

    @property
    def passed(self) -> bool:
        return self.apart <= max(APART_AT_LEAST, APART_FRACTION * self.elements)


def pairs(graph: onnx.GraphProto, names: set[str], component: str) -> dict[str, tuple[str, str]]:
    """For each quantizer, the tensors its ``QuantizeLinear`` reads and its ``DequantizeLinear`` returns; raises
    where the graph's pairs and the quantizers differ."""
    found = graph_quantizers(graph)
    missing, extra = sorted(names - set(found)), sorted(set(found) - names)
    if missing or extra:
        details = [f"no Q/DQ pair for {', '.join(missing[:3])}"] if missing else []
        details += [f"a Q/DQ pair with no enabled quantizer: {', '.join(extra[:3])}"] if extra else []
        raise ArtifactError(
            f"{component}: the graph's Q/DQ pairs are not the module's quantizers: {'; '.join(details)}"
        )
    producers = {output: node for node in graph.node for output in node.output}
    return {name: (producers[found[name].input[0]].input[0], found[name].output[0]) for name in sorted(names)}


def compare_quantizers(
    spec: ComponentSpec,
    graph_path: Path,
    precision: str,
    references: list[Reference],
    quantizers: dict[str, torch.nn.Module],
) -> list[QuantizerComparison]:
    """Each quantizer's pair in the graph against the quantizer, at each reference's inputs. Runs a copy of the
    graph with the pairs' tensors as outputs, written beside it (it shares the graph's data file), removed after."""
    graph = onnx.load(str(graph_path), load_external_data=False)
    tensors = pairs(graph.graph, set(quantizers), spec.name)
    wanted = sorted({tensor for pair in tensors.values() for tensor in pair})
    graph.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in wanted)
    probe = graph_path.parent / PROBE_FILE
    onnx.save_model(graph, str(probe))
    try:
        runner = OnnxRuntimeRunner(spec, probe, precision, torch.device("cpu"))
        results = []
        for reference in references:
            feeds = {name: value.numpy() for name, value in runner.prepare(reference.inputs).items()}
            values = dict(zip(wanted, runner.session.run(wanted, feeds), strict=True))
            for name, (read, returned) in tensors.items():
                with torch.no_grad():
                    expected = quantizers[name](torch.from_numpy(values[read]).float())
                actual = torch.from_numpy(values[returned]).float()
                bound = APART * float(expected.abs().max())
                apart = int(((actual - expected).abs() > bound).sum())
                results.append(QuantizerComparison(reference.shape, name, expected.numel(), apart))
        return results
    finally:
        probe.unlink(missing_ok=True)


def check_quantizers(spec: ComponentSpec, results: list[QuantizerComparison]) -> dict:
    """Raises naming the quantizers with more values apart than ``APART_FRACTION`` allows; returns the summary
    for the manifest."""
    failures = [r for r in results if not r.passed]
    if failures:
        details = "; ".join(f"{r.quantizer} at {r.shape}: {r.apart} of {r.elements} values apart" for r in failures[:5])
        raise ArtifactError(
            f"{spec.name}: onnxruntime's Q/DQ pairs do not quantize as the module's quantizers do "
            f"(more than {APART_FRACTION:.1%} of a tensor's values a step or more apart): {details}"
        )
    worst = max(results, key=lambda r: r.fraction, default=None)
    return {
        "quantizers": len({r.quantizer for r in results}),
        "tensors": len(results),
        "values": sum(r.elements for r in results),
        "values_apart": sum(r.apart for r in results),
        "worst_fraction_apart": worst.fraction if worst else 0.0,
        "allowed_apart": f"max({APART_AT_LEAST}, {APART_FRACTION:g} x values) a tensor",
    }
