"""ONNX Runtime backend: the CPU provider here, the CUDA provider with IO binding on a GPU.

With IO binding, inputs and outputs stay torch CUDA tensors that ONNX Runtime reads and
writes in place, so a step copies nothing between host and device.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import onnxruntime as ort
import torch

from engine.artifacts import ONNX_FILE, onnx_key
from engine.backends.base import Runner
from engine.dtypes import BY_TORCH
from engine.errors import BackendUnavailable, NotBuilt
from engine.models.spec import ComponentSpec
from engine.store import Store


def session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    ort.set_default_logger_severity(3)
    return options


def onnxruntime_has_cuda() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


def providers_for(device: torch.device) -> list:
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if not onnxruntime_has_cuda():
        raise BackendUnavailable("onnxruntime has no CUDA provider here (install onnxruntime-gpu)")
    options = {
        "device_id": device.index or 0,
        "cudnn_conv_algo_search": "HEURISTIC",
        # ONNX Runtime works on torch's stream, so inputs written there are ready without a sync.
        "user_compute_stream": str(torch.cuda.current_stream(device).cuda_stream),
    }
    return [("CUDAExecutionProvider", options)]


class OnnxRuntimeRunner(Runner):
    backend = "onnxruntime"

    def __init__(self, spec: ComponentSpec, model: Path | bytes, precision: str, device: torch.device):
        """``model`` is a path (needed for external weights) or the graph's verified bytes."""
        super().__init__(spec, precision, device)
        providers = providers_for(device)
        source = model if isinstance(model, bytes) else str(model)
        try:
            self.session = ort.InferenceSession(source, session_options(), providers=providers)
        except Exception as error:  # onnxruntime raises its own untyped errors for unusable graphs
            raise BackendUnavailable(f"onnxruntime cannot load the graph: {error}") from error
        names = [item.name for item in self.session.get_inputs()]
        if sorted(names) != sorted(spec.input_names):
            raise BackendUnavailable(f"graph inputs {names} do not match the spec's {spec.input_names}")

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type == "cuda":
            return self._run_bound(inputs)
        feed = {name: tensor.numpy() for name, tensor in inputs.items()}
        outputs = self.session.run(self.spec.output_names, feed)
        return {name: torch.from_numpy(value) for name, value in zip(self.spec.output_names, outputs, strict=True)}

    def _run_bound(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        binding = self.session.io_binding()
        device_id = self.device.index or 0
        for name, tensor in inputs.items():
            binding.bind_input(
                name, "cuda", device_id, BY_TORCH[tensor.dtype].numpy, list(tensor.shape), tensor.data_ptr()
            )
        shapes = self.spec.output_shapes_from_inputs({name: tuple(t.shape) for name, t in inputs.items()})
        outputs = {}
        for tensor_spec in self.spec.outputs:
            dtype = tensor_spec.torch_dtype(self.precision)
            output = torch.empty(shapes[tensor_spec.name], dtype=dtype, device=self.device)
            binding.bind_output(
                tensor_spec.name, "cuda", device_id, BY_TORCH[dtype].numpy, list(output.shape), output.data_ptr()
            )
            outputs[tensor_spec.name] = output
        self.session.run_with_iobinding(binding)
        return outputs


def load_onnxruntime_runner(
    store: Store, spec: ComponentSpec, fingerprint: str, precision: str, device: torch.device
) -> OnnxRuntimeRunner:
    """The runner for a component's exported graph, checked against its manifest before use."""
    artifact = store.get(onnx_key(spec, fingerprint, precision))
    if artifact is None:
        raise NotBuilt(f"no {precision} ONNX export in {store.root}")
    if list(artifact.files) == [ONNX_FILE]:
        return OnnxRuntimeRunner(spec, artifact.read_verified(ONNX_FILE), precision, device)
    artifact.verify()  # weights in external data: check every file, then load by path
    return OnnxRuntimeRunner(spec, artifact.file(ONNX_FILE), precision, device)
