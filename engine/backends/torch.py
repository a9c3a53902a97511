"""PyTorch backend: the reference every export is checked against and the last fallback.

On a GPU it runs fp16 with diffusers' scaled-dot-product attention; inputs arrive on
the device already, so a step does no host-device copy and no synchronization. A lazy
runner loads its weights on first use, so a fallback costs nothing until it is needed; a
shared one runs another runner's module (the controlled UNet on the UNet's own weights).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

from engine.backends.base import Runner
from engine.common.errors import BackendUnavailable
from engine.spec import ComponentSpec

if TYPE_CHECKING:
    from engine.lora.library import WeightPatch


log = logging.getLogger(__name__)


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


class LazyTorchRunner(Runner):
    """A torch runner that loads its weights on first use, so a fallback costs nothing until needed."""

    backend = "torch"

    def __init__(self, spec: ComponentSpec, load: Callable[[], torch.nn.Module], precision: str, device: torch.device):
        super().__init__(spec, precision, device)
        self._load = load
        self._runner: TorchRunner | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        """Whether the weights are in memory already."""
        return self._runner is not None

    def ensure_loaded(self) -> TorchRunner:
        with self._lock:
            if self._runner is None:
                log.info("loading torch weights for %s", self.spec.name)
                self._runner = TorchRunner(self.spec, self._load(), self.precision, self.device)
            return self._runner

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.ensure_loaded().run(inputs)

    def apply_patch(self, patch: WeightPatch | None) -> None:
        if patch is None and self._runner is None:
            return  # not loaded yet: it will load the base weights
        self.ensure_loaded().apply_patch(patch)


class SharedTorchRunner(Runner):
    """A torch runner on another torch runner's module: the controlled UNet runs the UNet's own
    weights, so torch holds one copy, and one LoRA state, whose key it reads from that runner."""

    backend = "torch"

    def __init__(self, spec: ComponentSpec, owner: LazyTorchRunner, wrap: Callable[[torch.nn.Module], torch.nn.Module]):
        # not Runner.__init__: setting weights_key there would reset the owner's
        self.spec, self.precision, self.device = spec, owner.precision, owner.device
        self.owner = owner
        self._wrap = wrap
        self._module: torch.nn.Module | None = None

    @property
    def weights_key(self) -> str | None:  # type: ignore[override]
        return self.owner.weights_key

    @weights_key.setter
    def weights_key(self, key: str | None) -> None:
        self.owner.weights_key = key

    def apply_patch(self, patch: WeightPatch | None) -> None:
        self.owner.apply_patch(patch)

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._module is None:
            self._module = self._wrap(self.owner.ensure_loaded().module)
        with torch.inference_mode():
            outputs = self._module(*(inputs[name] for name in self.spec.input_names))
        return dict(zip(self.spec.output_names, outputs, strict=True))


class AdapterTorchRunner(SharedTorchRunner):
    """The IP denoiser on the UNet's torch runner: the UNet's weights (and LoRA state) are that runner's,
    the IP matrices are the wrapper's own, set from their base values as the patch asks. Its weights are
    the patch's only while the owner's are and its own were set last with that key (two IP denoisers
    share an owner: the plain and the controlled one)."""

    def __init__(
        self,
        spec: ComponentSpec,
        owner: LazyTorchRunner,
        wrap: Callable[[torch.nn.Module], torch.nn.Module],
        own_prefix: str,
    ):
        super().__init__(spec, owner, wrap)
        self.own_prefix = own_prefix
        self._own_base: dict[str, torch.Tensor] = {}
        self._own_key: str | None = None

    @property
    def weights_key(self) -> str | None:  # type: ignore[override]
        key = self.owner.weights_key
        return key if key == self._own_key else None

    @weights_key.setter
    def weights_key(self, key: str | None) -> None:
        self.owner.weights_key = self._own_key = key

    def _wrapped(self) -> torch.nn.Module:
        if self._module is None:
            self._module = self._wrap(self.owner.ensure_loaded().module)
            self._own_base = {
                name: parameter.detach().clone()
                for name, parameter in self._module.named_parameters()
                if name.startswith(self.own_prefix)
            }
        return self._module

    def apply_patch(self, patch: WeightPatch | None) -> None:
        names = set(patch.names) if patch is not None else set()
        own = {name for name in names if name.startswith(self.own_prefix)}
        self.owner.apply_patch(_Subset(patch, names - own) if patch is not None and names - own else None)
        parameters = dict(self._wrapped().named_parameters())
        with torch.no_grad():
            for name, base in self._own_base.items():
                value = base.float() + patch.delta(name, self.device) if patch is not None and name in own else base
                parameters[name].copy_(value.to(parameters[name].dtype))

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self._wrapped()
        return super().run(inputs)


class _Subset:
    """Some of a patch's parameters, under the patch's key."""

    def __init__(self, patch: WeightPatch, names: set[str]):
        self.key = patch.key
        self.names = sorted(names)
        self._patch = patch

    def delta(self, name: str, device: torch.device) -> torch.Tensor:
        return self._patch.delta(name, device)
