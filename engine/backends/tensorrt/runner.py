"""The TensorRT runner: a component's engines behind the Runner interface, each call on the covering engine
tuned closest to its shapes; and the worker's set of them, which share one scratch buffer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.backends.base import Runner
from engine.backends.tensorrt.engine import LoadedEngine
from engine.common.errors import BackendUnavailable
from engine.spec import ComponentSpec, Shape
from engine.store.profiles import Profile, choose
from engine.store.weightmap import WeightMap

if TYPE_CHECKING:
    from engine.lora.library import WeightPatch


class TensorRTRunner(Runner):
    """One component's engines behind the Runner interface."""

    backend = "tensorrt"

    def __init__(
        self,
        spec: ComponentSpec,
        engines: Sequence[LoadedEngine],
        precision: str,
        device: torch.device,
        stream: torch.cuda.Stream | None,
    ):
        super().__init__(spec, precision, device)
        self.engines = list(engines)
        self.stream = stream
        self.weight_map: WeightMap | None = None
        """The map of the graph the engines were built from, which LoRA refits go through."""
        self._patched: set[str] = set()
        """Parameters a refit has changed from their base values."""

    def apply_patch(self, patch: WeightPatch | None) -> None:
        """Refits every engine of the component (see ``LoadedEngine.refit``)."""
        if self.weight_map is None:
            raise BackendUnavailable("the engine's ONNX export has no weight map; export it again to serve LoRAs")
        wanted = set(patch.names) if patch is not None else set()
        unpatchable = self.weight_map.cannot_patch(wanted)
        if unpatchable:
            raise BackendUnavailable(f"the graph's weight map cannot patch {', '.join(unpatchable[:3])}")
        if not wanted and not self._patched:
            return  # the engines hold their base weights
        for engine in self.engines:
            if not engine.engine.refittable:
                raise BackendUnavailable(
                    f"{engine.name} was built without refit (ENGINE_REFIT=none, or before LoRA support)"
                )
        restore, self._patched = self._patched, self._patched | wanted  # a failed refit leaves both to restore
        for engine in self.engines:
            engine.refit(self.weight_map, patch, restore, self.stream)
        self._patched = wanted

    def _profiles(self) -> list[tuple[LoadedEngine, Profile]]:
        return [(engine, profile) for engine in self.engines for profile in engine.profiles]

    def unsupported_reason(self, shapes: Mapping[str, Shape]) -> str | None:
        pairs = self._profiles()
        if choose([profile for _, profile in pairs], shapes) is not None:
            return None
        return "; ".join(filter(None, (profile.unsupported_reason(shapes) for _, profile in pairs)))

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        shapes = {name: tuple(tensor.shape) for name, tensor in inputs.items()}
        pairs = self._profiles()
        index = choose([profile for _, profile in pairs], shapes)
        if index is None:
            raise BackendUnavailable(f"{self.spec.name}: {self.unsupported_reason(shapes)}")
        caller = torch.cuda.current_stream(self.device) if self.stream is not None else None
        if self.stream is not None:
            self.stream.wait_stream(caller)  # inputs written on the caller's stream are ready
        outputs = pairs[index][0].execute(inputs, self.stream)
        if caller is not None:
            caller.wait_stream(self.stream)  # and outputs are ready for the caller, without a host sync
        return outputs

    def capture_graphs(self) -> int:
        """CUDA graphs for each engine's optimum shapes; how many were captured."""
        if self.stream is None:
            return 0
        captured = sum(engine.capture_optima(self.stream) for engine in self.engines if engine.use_cuda_graphs)
        self.stream.synchronize()
        return captured


@dataclass
class TensorRTBackend:
    """Every engine the worker runs, their shared scratch memory and stream."""

    runners: dict[str, TensorRTRunner]
    unavailable: dict[str, str]
    scratch: torch.Tensor | None = None
    unusable: str | None = None
    """Set when the store holds engines for this GPU and model but not one of them loads: a
    deployment problem (another TensorRT, corrupt plans) that slow torch serving would hide."""
    missing: list[str] = field(default_factory=list)
    """Components with no engine built yet (the normal state before `make engines`)."""

    def capture_graphs(self) -> int:
        """At warm-up: a CUDA graph for each engine's optimum shapes; how many were captured."""
        return sum(runner.capture_graphs() for runner in self.runners.values())

    @property
    def memory_bytes(self) -> int:
        """What the engines hold on the GPU: their plans (weights and kernels) and the shared scratch."""
        plans = sum(engine.plan_bytes for runner in self.runners.values() for engine in runner.engines)
        return plans + (self.scratch.numel() if self.scratch is not None else 0)
