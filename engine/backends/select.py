"""Which backend runs each component, and the fallback when it cannot.

Each component gets a chain of runners in order of preference, ending in torch,
which takes any shape. A backend that could not be loaded at start-up is left out of
the chain with its reason; a request whose shapes a runner does not cover moves down
the chain, and the worker reports the reasons in its metrics.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from engine.backends.base import Runner
from engine.backends.onnxruntime import load_onnxruntime_runner, onnxruntime_has_cuda
from engine.backends.tensorrt import TensorRTBackend, gpu_tag, load_tensorrt
from engine.backends.torch import TorchRunner
from engine.errors import ArtifactError, BackendUnavailable
from engine.fingerprint import component_fingerprint
from engine.models import Model
from engine.models.spec import ComponentSpec, Shape
from engine.settings import Backend, Settings
from engine.store import Store

log = logging.getLogger(__name__)


class LazyTorchRunner(Runner):
    """A torch runner that loads its weights on first use, so a fallback costs nothing until needed."""

    backend = "torch"

    def __init__(self, spec: ComponentSpec, load: Callable[[], torch.nn.Module], precision: str, device: torch.device):
        super().__init__(spec, precision, device)
        self._load = load
        self._runner: TorchRunner | None = None
        self._lock = threading.Lock()

    def ensure_loaded(self) -> TorchRunner:
        with self._lock:
            if self._runner is None:
                log.info("loading torch weights for %s", self.spec.name)
                self._runner = TorchRunner(self.spec, self._load(), self.precision, self.device)
            return self._runner

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.ensure_loaded().run(inputs)


@dataclass
class RunnerChain:
    """One component's runners in order of preference; the last one takes any shape."""

    component: str
    runners: list[Runner]
    unavailable: dict[str, str] = field(default_factory=dict)
    """Backends that were wanted but not loaded, with the reason."""

    def choose(self, shapes: Mapping[str, Shape]) -> tuple[Runner, list[str]]:
        """The first runner that covers these shapes, and why each one before it did not."""
        reasons = [f"{backend}: {reason}" for backend, reason in self.unavailable.items()]
        for runner in self.runners:
            reason = runner.unsupported_reason(shapes)
            if reason is None:
                return runner, reasons
            reasons.append(f"{runner.backend}: {reason}")
        raise RuntimeError(f"{self.component}: no runner covers {dict(shapes)}: {'; '.join(reasons)}")


def torch_dtype(precision: str) -> torch.dtype:
    return torch.float16 if precision == "fp16" else torch.float32


def preferred_backends(backend: Backend, device: torch.device) -> list[Backend]:
    """Backends to try before torch, best first.

    On a GPU, ``auto`` tries TensorRT, then ONNX Runtime only where its CUDA provider is
    installed (ONNX Runtime on the CPU would be far slower than torch on the GPU).
    """
    if backend is Backend.TORCH:
        return []
    if backend is Backend.ONNXRUNTIME:
        return [Backend.ONNXRUNTIME]
    if device.type != "cuda":
        return [Backend.TENSORRT, Backend.ONNXRUNTIME] if backend is Backend.TENSORRT else [Backend.ONNXRUNTIME]
    return [Backend.TENSORRT, *([Backend.ONNXRUNTIME] if onnxruntime_has_cuda() else [])]


def build_chains(
    model: Model, settings: Settings, store: Store, device: torch.device, precision: str
) -> tuple[dict[str, RunnerChain], TensorRTBackend]:
    """A runner chain per component, and the TensorRT engines behind them (which share memory)."""
    wanted = {c: preferred_backends(settings.backend_for(c), device) for c in model.components}
    precisions = {c: model.family.component_precision(c, precision, model.config) for c in model.components}
    fingerprints: dict[str, str] = {}

    def fingerprint(component: str) -> str:
        if component not in fingerprints:
            fingerprints[component] = component_fingerprint(model, component, store.file_digest)
        return fingerprints[component]

    tensorrt_components = [c for c, backends in wanted.items() if Backend.TENSORRT in backends]
    tensorrt = TensorRTBackend({}, dict.fromkeys(tensorrt_components, "TensorRT needs a CUDA device"))
    if tensorrt_components and device.type == "cuda":
        try:
            tensorrt = load_tensorrt(
                store,
                {c: (model.specs[c], fingerprint(c), precisions[c]) for c in tensorrt_components},
                device,
                gpu_tag(device),
                settings.cuda_graphs,
            )
        except Exception as error:  # whatever TensorRT raises, the worker starts on the other backends
            log.exception("TensorRT engines could not be loaded")
            tensorrt = TensorRTBackend({}, dict.fromkeys(tensorrt_components, f"{type(error).__name__}: {error}"))

    chains = {}
    for component, backends in wanted.items():
        spec, runners, unavailable = model.specs[component], [], {}
        for backend in backends:
            try:
                if backend is Backend.TENSORRT:
                    if component not in tensorrt.runners:
                        raise BackendUnavailable(tensorrt.unavailable.get(component, "no engine"))
                    runners.append(tensorrt.runners[component])
                else:
                    runners.append(
                        load_onnxruntime_runner(store, spec, fingerprint(component), precisions[component], device)
                    )
            except (ArtifactError, BackendUnavailable, OSError) as error:
                log.warning("%s: %s unavailable: %s", component, backend.value, error)
                unavailable[backend.value] = str(error)
        load = functools.partial(model.family.torch_module, component, model.folder, torch_dtype(precisions[component]))
        runners.append(LazyTorchRunner(spec, load, precisions[component], device))
        chains[component] = RunnerChain(component, runners, unavailable)
    return chains, tensorrt
