"""PyTorch backend: the reference every export is checked against and the last fallback.

On a GPU it runs fp16 with diffusers' scaled-dot-product attention; inputs arrive on
the device already, so a step does no host-device copy and no synchronization.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from engine.backends.base import Runner
from engine.models.spec import ComponentSpec


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, spec: ComponentSpec, module: torch.nn.Module, precision: str, device: torch.device):
        super().__init__(spec, precision, device)
        self.module = module.to(device).eval()

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            outputs = self.module(*(inputs[name] for name in self.spec.input_names))
        return dict(zip(self.spec.output_names, outputs, strict=True))
