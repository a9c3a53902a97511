"""The Runner interface every backend implements; the pipeline only ever sees this."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

from engine.common.errors import BackendUnavailable
from engine.spec import ComponentSpec, Shape

if TYPE_CHECKING:
    from engine.lora.library import WeightPatch

ComponentCall = Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]
"""How the pipeline runs a component: named tensors in, named tensors out (a Runner, or a chain of them)."""


class Runner(ABC):
    """Runs one component: named tensors in, named tensors out, on the worker's device."""

    backend: str
    quantization: str | None = None
    """fp8, int8 or nvfp4 where the runner serves a quantized graph (see ``engine.backends.quantized``)."""

    def __init__(self, spec: ComponentSpec, precision: str, device: torch.device):
        self.spec = spec
        self.precision = precision
        self.device = device
        self.weights_key: str | None = None
        """The key of the LoRA patch the weights carry; None for the base weights."""

    @property
    def precision_label(self) -> str:
        """The precision ``metrics.precisions`` names."""
        return self.precision

    def apply_patch(self, patch: WeightPatch | None) -> None:
        """Sets the weights to base + patch (None: the base weights), computed from the base every time,
        so no earlier patch leaves a trace. Raises BackendUnavailable where the backend cannot."""
        raise BackendUnavailable(f"{self.backend} cannot change its weights")

    def unsupported_reason(self, shapes: Mapping[str, Shape]) -> str | None:
        """Why this runner cannot take these input shapes, or None when it can."""
        return None

    @abstractmethod
    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Runs on inputs already in the spec's dtypes and on the runner's device."""

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.run(self.prepare(inputs))

    def prepare(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inputs in the dtype the graph expects, contiguous, on the device; no copy when they already are."""
        missing = set(self.spec.input_names) - set(inputs)
        if missing:
            raise KeyError(f"{self.spec.name}: missing inputs {sorted(missing)}")
        return {
            tensor.name: inputs[tensor.name]
            .to(device=self.device, dtype=tensor.torch_dtype(self.precision))
            .contiguous()
            for tensor in self.spec.inputs
        }
