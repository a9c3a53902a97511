"""Artifact keys shared by the export stage (which publishes) and the worker (which looks up).

Both sides build keys here, so a change in how a graph is exported changes the key the
worker asks for, and an artifact from an older exporter is never served.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, replace

from engine.spec import ComponentSpec
from engine.store.artifact import ArtifactKey

ONNX_OPSET = 19
EXPORT_VERSION = 6
"""Bumped whenever export, cleanup or fp16 conversion changes what a graph computes, or what an
artifact holds (4: the weight map, and TensorRT engines refittable; 5: the UNet's prompt
sequence axis dynamic, for prompts past 77 tokens; 6: fp32 inputs, sinusoidal angles and RMS
norms kept fp32 throughout in half graphs)."""

ONNX_FILE = "model.onnx"
ENGINE_FILE = "engine.plan"


def spec_digest(spec: ComponentSpec) -> str:
    """Tensor names, shapes and dtypes are part of what an artifact promises."""
    return hashlib.sha256(repr(asdict(spec)).encode()).hexdigest()[:12]


def exporter_id(spec: ComponentSpec) -> str:
    return f"torchscript-opset{ONNX_OPSET}-v{EXPORT_VERSION}-spec{spec_digest(spec)}"


def onnx_key(spec: ComponentSpec, fingerprint: str, precision: str) -> ArtifactKey:
    return ArtifactKey(
        kind="onnx",
        component=spec.name,
        fingerprint=fingerprint,
        precision=precision,
        exporter=exporter_id(spec),
    )


def quantized_onnx_key(
    spec: ComponentSpec, fingerprint: str, precision: str, quantization: str, recipe: str
) -> ArtifactKey:
    """A quantized graph: the unquantized graph's key, its format and the hash of its calibration recipe;
    ``precision`` is what its unquantized layers run at."""
    return replace(onnx_key(spec, fingerprint, precision), quantization=quantization, recipe=recipe)


def calibration_key(spec: ComponentSpec, fingerprint: str, quantization: str, recipe: str) -> ArtifactKey:
    """Calibration statistics, shared by every export and engine of one recipe, whatever the GPU."""
    return replace(onnx_key(spec, fingerprint, "fp32"), kind="calibration", quantization=quantization, recipe=recipe)


def engine_key(
    spec: ComponentSpec,
    fingerprint: str,
    precision: str,
    gpu: str,
    tensorrt: str,
    profile: str,
    quantization: str | None = None,
    recipe: str | None = None,
) -> ArtifactKey:
    """An engine follows its ONNX export's key and adds the GPU, the TensorRT version and the profile."""
    return replace(
        onnx_key(spec, fingerprint, precision),
        kind="tensorrt",
        gpu=gpu,
        tensorrt=tensorrt,
        profile=profile,
        quantization=quantization,
        recipe=recipe,
    )
