"""The denoiser's quantized graph or engine (QUANTIZE), served first where the store has one.

A quantized runner stands before the unquantized one of the same backend in the denoiser's
chain. Where the store has no quantized artifact for this model, GPU and TensorRT version, the
chain says so in ``metrics.fallbacks`` and the unquantized one serves. LoRAs: a quantized runner
takes none, so a request with LoRAs runs on the unquantized runner of the same backend, with the
reason in ``metrics.fallbacks`` (SmoothQuant folds a scale into INT8 weights, and calibrated
activation ranges do not hold for a LoRA's weights), while requests without LoRAs keep the
quantized one. ``metrics.precisions`` names the format: ``int8 (fp16 elsewhere)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from engine.backends.base import Runner
from engine.backends.tensorrt.loading import load_tensorrt
from engine.backends.tensorrt.runner import TensorRTBackend
from engine.common.errors import BackendUnavailable, NotBuilt
from engine.spec import ComponentSpec, Shape
from engine.store.artifact import Artifact
from engine.store.keys import ONNX_FILE, exporter_id
from engine.store.store import Store

TWIN_FILE = "twin.onnx"
"""A quantized graph with standard ops only (FP8's opset-21 twin), which onnxruntime runs."""


def quantized_name(component: str, quantization: str) -> str:
    """The quantized engine's name among the TensorRT backend's runners: ``unet.int8``."""
    return f"{component}.{quantization}"


class QuantizedRunner(Runner):
    """A runner over a quantized graph or engine: runs as the runner it wraps, takes no LoRA set."""

    def __init__(self, inner: Runner, quantization: str):
        super().__init__(inner.spec, inner.precision, inner.device)
        self.inner = inner
        self.quantization = quantization
        self.backend = inner.backend

    @property
    def precision_label(self) -> str:
        return f"{self.quantization} ({self.precision} elsewhere)"

    def apply_patch(self, patch: object) -> None:
        if patch is not None:
            raise BackendUnavailable(f"the {self.quantization} graph takes no LoRAs; the unquantized one runs them")

    def unsupported_reason(self, shapes: Mapping[str, Shape]) -> str | None:
        return self.inner.unsupported_reason(shapes)

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.inner.run(inputs)


def newest_quantized(
    store: Store, kind: str, spec: ComponentSpec, fingerprint: str, precision: str, quantization: str, **fields
) -> Artifact | None:
    """The most recently published artifact of this format (of any calibration recipe) from this exporter."""
    found = [
        artifact
        for artifact in store.find(
            kind=kind, component=spec.name, fingerprint=fingerprint, precision=precision, quantization=quantization
        )
        if artifact.key.exporter == exporter_id(spec) and all(getattr(artifact.key, k) == v for k, v in fields.items())
    ]
    return max(found, key=lambda artifact: artifact.manifest.get("created", 0.0), default=None)


def load_quantized_onnxruntime(
    store: Store, spec: ComponentSpec, fingerprint: str, precision: str, quantization: str, device: torch.device
) -> QuantizedRunner:
    from engine.backends.onnxruntime import OnnxRuntimeRunner

    artifact = newest_quantized(store, "onnx", spec, fingerprint, precision, quantization)
    if artifact is None:
        raise NotBuilt(f"no {quantization} ONNX export in the engine store")
    artifact.verify()
    graph = TWIN_FILE if TWIN_FILE in artifact.files else ONNX_FILE
    return QuantizedRunner(OnnxRuntimeRunner(spec, artifact.file(graph), precision, device), quantization)


def load_quantized_tensorrt(
    backend: TensorRTBackend,
    store: Store,
    component: tuple[ComponentSpec, str, str],
    quantization: str,
    device: torch.device,
    gpu: str,
    use_cuda_graphs: bool,
    max_shapes: int,
    profile_label: str,
) -> None:
    """The quantized engine, taken into ``backend`` as ``unet.int8`` (its stream, scratch and CUDA graphs), or
    the reason it is not there in ``backend.unavailable`` under that name."""
    spec = component[0]
    name = quantized_name(spec.name, quantization)
    loaded = load_tensorrt(
        store,
        {spec.name: component},
        device,
        gpu,
        use_cuda_graphs,
        max_shapes=max_shapes,
        profile_labels={spec.name: profile_label},
        quantization=quantization,
    )
    runners = {name: loaded.runners[spec.name]} if spec.name in loaded.runners else {}
    reasons = {name: loaded.unavailable[spec.name]} if spec.name in loaded.unavailable else {}
    renamed = TensorRTBackend(runners, reasons, loaded.scratch)
    backend.adopt(renamed)
    if loaded.missing:
        backend.missing.append(name)
