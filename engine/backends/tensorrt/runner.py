"""The TensorRT runner: a component's engines behind the Runner interface, each call on the covering engine
tuned closest to its shapes; and the worker's set of them, which share one scratch buffer.
"""

from __future__ import annotations

import logging
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

log = logging.getLogger(__name__)


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
        self._refused: dict[str, str] = {}
        """Patch keys TensorRT refused to refit, with the reason: refused again without another try."""
        self.broken: str | None = None
        """Why the engines cannot serve at all: a failed refit whose base weights could not be restored."""

    def apply_patch(self, patch: WeightPatch | None) -> None:
        """Refits every engine of the component (see ``LoadedEngine.refit``). A refit that fails leaves the
        engines at their base weights (a failed refit may have changed some weights), and a patch TensorRT
        refused is refused from then on without another refit; other patches and the base are unaffected."""
        if self.broken is not None:
            raise BackendUnavailable(self.broken)
        if self.weight_map is None:
            raise BackendUnavailable("the engine's ONNX export has no weight map; export it again to serve LoRAs")
        wanted = set(patch.names) if patch is not None else set()
        unpatchable = self.weight_map.cannot_patch(wanted)
        if unpatchable:
            raise BackendUnavailable(f"the graph's weight map cannot patch {', '.join(unpatchable[:3])}")
        if patch is not None and patch.key in self._refused:
            raise BackendUnavailable(self._refused[patch.key])
        if not wanted and not self._patched:
            return  # the engines hold their base weights
        for engine in self.engines:
            if not engine.engine.refittable:
                raise BackendUnavailable(
                    f"{engine.name} was built without refit (ENGINE_REFIT=none, or before LoRA support)"
                )
        try:
            for engine in self.engines:
                engine.refit(self.weight_map, patch, self._patched, self.stream)
        except Exception as error:
            if patch is not None and isinstance(error, BackendUnavailable):
                self._refused[patch.key] = str(error)
            self._restore_base(self._patched | wanted, error)
            raise
        self._patched = wanted

    def _restore_base(self, touched: set[str], error: Exception) -> None:
        """After a failed refit: every engine back to its base weights, or, where even that fails, the
        runner out of service (``broken``), so no later call retries a refit that cannot work."""
        log.warning("%s: refit failed, restoring the base weights: %s", self.spec.name, error)
        try:
            for engine in self.engines:
                engine.refit(self.weight_map, None, touched, self.stream)
        except Exception as again:
            self.broken = f"{self.spec.name}: the engine's weights are unknown after a failed refit ({again})"
            log.error("%s; TensorRT is off for it until the worker restarts", self.broken)
            return
        self._patched = set()

    def _profiles(self) -> list[tuple[LoadedEngine, Profile]]:
        return [(engine, profile) for engine in self.engines for profile in engine.profiles]

    def unsupported_reason(self, shapes: Mapping[str, Shape]) -> str | None:
        if self.broken is not None:
            return self.broken
        pairs = self._profiles()
        if choose([profile for _, profile in pairs], shapes) is not None:
            return None
        return "; ".join(filter(None, (profile.unsupported_reason(shapes) for _, profile in pairs)))

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        shapes = {name: tuple(tensor.shape) for name, tensor in inputs.items()}
        pairs = self._profiles()
        index = choose([profile for _, profile in pairs], shapes)
        if index is None or self.broken is not None:
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
    graphs_captured: bool = False
    """Whether the warm-up captured CUDA graphs: engines adopted later get theirs when adopted."""

    @property
    def stream(self) -> torch.cuda.Stream | None:
        return next((runner.stream for runner in self.runners.values()), None)

    def capture_graphs(self) -> int:
        """At warm-up: a CUDA graph for each engine's optimum shapes; how many were captured."""
        self.graphs_captured = True
        return sum(runner.capture_graphs() for runner in self.runners.values())

    def adopt(self, other: TensorRTBackend) -> None:
        """Takes in engines loaded after start-up (a ControlNet's, when a request first names it): they run
        on this backend's stream, one at a time with the others, so they use its scratch where it is large
        enough (else keep their own, counted in ``memory_bytes``), and get CUDA graphs of their optima now
        if the warm-up captured graphs."""
        if not self.runners:
            self.scratch = other.scratch
        stream = self.stream if self.runners else other.stream
        for component, runner in other.runners.items():
            runner.stream = stream
            for engine in runner.engines:
                if self.scratch is not None and engine.device_memory_size <= self.scratch.numel():
                    engine.bind_scratch(self.scratch)
                else:
                    log.info("%s needs more scratch than the shared buffer holds: it keeps its own", engine.name)
            self.runners[component] = runner
            self.unavailable.pop(component, None)
            if self.graphs_captured:
                log.info("%s: captured %d CUDA graphs", component, runner.capture_graphs())
        self.unavailable.update({c: reason for c, reason in other.unavailable.items() if c not in self.runners})

    def graph_counts(self) -> dict[str, tuple[int, int]]:
        """Per component, the CUDA graphs its engines captured and kept, and replayed, since they loaded."""
        return {
            component: (
                sum(engine.graph_captures for engine in runner.engines),
                sum(engine.graph_replays for engine in runner.engines),
            )
            for component, runner in self.runners.items()
        }

    @property
    def memory_bytes(self) -> int:
        """What the engines hold on the GPU: their plans (weights and kernels) and the scratch they use."""
        engines = [engine for runner in self.runners.values() for engine in runner.engines]
        scratch = {id(e.scratch): e.scratch.numel() for e in engines if e.scratch is not None}
        if self.scratch is not None:
            scratch[id(self.scratch)] = self.scratch.numel()
        return sum(engine.plan_bytes for engine in engines) + sum(scratch.values())
