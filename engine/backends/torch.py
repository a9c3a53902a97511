"""PyTorch backend: the reference every export is checked against and the last fallback.

On a GPU it runs fp16 with diffusers' scaled-dot-product attention; inputs arrive on
the device already, so a step does no host-device copy and no synchronization.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from engine.backends.base import Runner
from engine.common.errors import BackendUnavailable
from engine.spec import ComponentSpec

if TYPE_CHECKING:
    from engine.lora.library import WeightPatch


class TorchRunner(Runner):
    backend = "torch"

    def __init__(self, spec: ComponentSpec, module: torch.nn.Module, precision: str, device: torch.device):
        super().__init__(spec, precision, device)
        self.module = module.to(device).eval()
        self._base: dict[str, torch.Tensor] = {}
        """Copies of the base values of the parameters a patch has changed, and only those."""

    def apply_patch(self, patch: WeightPatch | None) -> None:
        """In place: each changed parameter becomes base + delta (in fp32, then its own dtype); one no
        patch changes any more gets its base back, and its copy is dropped."""
        parameters = dict(self.module.named_parameters())
        wanted = set(patch.names) if patch is not None else set()
        missing = wanted - set(parameters)
        if missing:
            raise BackendUnavailable(f"the module has no parameters {sorted(missing)[:3]}")
        with torch.no_grad():
            for name in sorted(wanted | set(self._base)):
                parameter = parameters[name]
                base = self._base.setdefault(name, parameter.detach().clone())
                if patch is not None and name in wanted:
                    parameter.copy_((base.float() + patch.delta(name, self.device)).to(parameter.dtype))
                else:
                    parameter.copy_(base)
                    del self._base[name]
        self.weights_key = patch.key if patch is not None else None

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            outputs = self.module(*(inputs[name] for name in self.spec.input_names))
        return dict(zip(self.spec.output_names, outputs, strict=True))
