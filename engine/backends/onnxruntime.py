"""ONNX Runtime backend: the CPU provider here, the CUDA provider with IO binding on a GPU.

With IO binding, inputs and outputs stay torch tensors that ONNX Runtime reads and writes
in place, so a step on a GPU copies nothing between host and device, and bf16 tensors (which
NumPy lacks) pass as they are. On the CPU, a bf16 graph runs as its fp32-arithmetic twin
(``engine.backends.bf16``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import onnxruntime as ort
import torch

from engine.backends.base import Runner
from engine.common.dtypes import BY_TORCH, to_numpy
from engine.common.errors import BackendUnavailable, NotBuilt
from engine.spec import ComponentSpec
from engine.store.keys import ONNX_FILE, onnx_key
from engine.store.store import Store
from engine.store.weightmap import WEIGHT_MAP_FILE, WeightMap

if TYPE_CHECKING:
    from engine.lora.library import WeightPatch

log = logging.getLogger(__name__)


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

    def __init__(
        self,
        spec: ComponentSpec,
        model: Path | bytes,
        precision: str,
        device: torch.device,
        weight_map: WeightMap | None = None,
        lora_sessions: int = 2,
    ):
        """``model`` is a path (needed for external weights) or the graph's verified bytes; with a
        ``weight_map`` the runner can serve LoRA sets, keeping ``lora_sessions`` of them."""
        super().__init__(spec, precision, device)
        self.source = model if isinstance(model, bytes) else str(model)
        self.external_folder = None if isinstance(model, bytes) else model.parent
        if precision == "bf16" and device.type != "cuda":
            self._emulate_bf16()
        self.weight_map = weight_map
        self.lora_sessions = lora_sessions
        self.base_session = self.session = self._session(session_options())
        self._patched: OrderedDict[str, tuple[ort.InferenceSession, list[ort.OrtValue]]] = OrderedDict()
        names = [item.name for item in self.session.get_inputs()]
        if sorted(names) != sorted(spec.input_names):
            raise BackendUnavailable(f"graph inputs {names} do not match the spec's {spec.input_names}")

    def _emulate_bf16(self) -> None:
        """Swaps a bf16 graph for its twin, which reads the same external weights from their folder."""
        import onnx

        from engine.backends.bf16 import emulated_bf16, holds_bf16

        if isinstance(self.source, bytes):
            graph = onnx.load_from_string(self.source)
        else:
            graph = onnx.load(self.source, load_external_data=False)
        if holds_bf16(graph):
            self.source = emulated_bf16(graph).SerializeToString()

    def _session(self, options: ort.SessionOptions) -> ort.InferenceSession:
        if isinstance(self.source, bytes) and self.external_folder is not None:
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(self.external_folder)
            )
        try:
            return ort.InferenceSession(self.source, options, providers=providers_for(self.device))
        except Exception as error:  # onnxruntime raises its own untyped errors for unusable graphs
            log.warning("onnxruntime cannot load %s: %s", self.spec.name, error)  # its text names the files
            raise BackendUnavailable("onnxruntime cannot load the graph (the worker logged why)") from error

    def apply_patch(self, patch: WeightPatch | None) -> None:
        """Switches to a session whose patched initializers are overridden with base + delta;
        sessions are kept per LoRA set, least recently used out."""
        if patch is None:
            self.session = self.base_session
            return
        cached = self._patched.get(patch.key)
        if cached is None:
            cached = self._patched[patch.key] = self._patched_session(patch)
            while len(self._patched) > self.lora_sessions:
                self._patched.popitem(last=False)
        self._patched.move_to_end(patch.key)
        self.session = cached[0]

    def _patched_session(self, patch: WeightPatch) -> tuple[ort.InferenceSession, list[ort.OrtValue]]:
        if self.weight_map is None:
            raise BackendUnavailable("the graph has no weight map; export it again to serve LoRAs")
        unpatchable = self.weight_map.cannot_patch(patch.names)
        if unpatchable:
            raise BackendUnavailable(f"the graph's weight map cannot patch {', '.join(unpatchable[:3])}")
        names, values = [], []  # the session reads the values in place: they live as long as it does
        for name in patch.names:
            delta = patch.delta(name, torch.device("cpu"))
            for weight in self.weight_map.by_parameter.get(name, []):
                names.append(weight.initializer)
                value = self.weight_map.patched_value(weight, delta, torch.device("cpu"))
                values.append(
                    ort.OrtValue.ortvalue_from_numpy_with_onnx_type(to_numpy(value), BY_TORCH[value.dtype].onnx)
                )
        options = session_options()
        # The patched weights are all external data, and are given as such: with ``add_initializer``,
        # onnxruntime 1.32 at ORT_ENABLE_ALL keeps an fp16 graph's original weights on the CPU
        # (measured: the output did not change at all), while external initializers are honoured.
        options.add_external_initializers(names, values)
        return self._session(options), values

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        binding = self.session.io_binding()
        where, device_id = self.device.type, self.device.index or 0
        for name, tensor in inputs.items():
            binding.bind_input(
                name, where, device_id, BY_TORCH[tensor.dtype].onnx, list(tensor.shape), tensor.data_ptr()
            )
        shapes = self.spec.output_shapes_from_inputs({name: tuple(t.shape) for name, t in inputs.items()})
        outputs = {}
        for tensor_spec in self.spec.outputs:
            dtype = tensor_spec.torch_dtype(self.precision)
            output = torch.empty(shapes[tensor_spec.name], dtype=dtype, device=self.device)
            binding.bind_output(
                tensor_spec.name, where, device_id, BY_TORCH[dtype].onnx, list(output.shape), output.data_ptr()
            )
            outputs[tensor_spec.name] = output
        self.session.run_with_iobinding(binding)
        return outputs


def load_onnxruntime_runner(
    store: Store,
    spec: ComponentSpec,
    fingerprint: str,
    precision: str,
    device: torch.device,
    lora_sessions: int = 2,
) -> OnnxRuntimeRunner:
    """The runner for a component's exported graph, checked against its manifest before use."""
    artifact = store.get(onnx_key(spec, fingerprint, precision))
    if artifact is None:
        raise NotBuilt(f"no {precision} ONNX export in the engine store")
    artifact.verify()  # check every file (the graph, its weights, its weight map), then load by path
    weight_map = None
    if WEIGHT_MAP_FILE in artifact.files:
        try:
            weight_map = WeightMap.read(artifact.path)
        except ValueError as error:  # the graph still serves, only not with LoRAs
            log.warning("%s: no LoRAs on onnxruntime: %s", spec.name, error)
    return OnnxRuntimeRunner(spec, artifact.file(ONNX_FILE), precision, device, weight_map, lora_sessions)
