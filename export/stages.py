"""One component through the stages: export -> optimize -> validate -> publish.

Each stage's time goes into the artifact's manifest, and a stage is skipped
entirely when its artifact is already in the store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version

import torch

from engine.artifacts import ONNX_FILE, onnx_key
from engine.backends.onnxruntime import OnnxRuntimeRunner, providers_for
from engine.backends.torch import TorchRunner
from engine.errors import BackendUnavailable
from engine.fingerprint import component_fingerprint
from engine.models import Model
from engine.store import Artifact, Staging, Store
from export.onnx import export_dims, export_onnx
from export.optimize import optimize
from export.validate import check, compare, validation_dims

log = logging.getLogger(__name__)

TOOLS = ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "polygraphy", "diffusers", "transformers", "tensorrt")


def tool_versions() -> dict[str, str]:
    found = {}
    for name in TOOLS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


@dataclass
class StageLog:
    """Seconds per stage of one component, and a hook the progress bar listens to."""

    on_stage: Callable[[str], None] = lambda stage: None
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.on_stage(name)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - started, 3)


def validation_device(device: torch.device) -> torch.device:
    """Where ONNX Runtime validates: the GPU with onnxruntime-gpu, else the CPU."""
    if device.type == "cuda":
        try:
            providers_for(device)
            return device
        except BackendUnavailable:
            log.warning("onnxruntime-gpu is not installed; validating ONNX graphs on the CPU")
    return torch.device("cpu")


@dataclass
class Exporter:
    model: Model
    store: Store
    device: torch.device
    precision: str

    def component_precision(self, component: str) -> str:
        return self.model.family.component_precision(component, self.precision, self.model.config)

    def onnx(self, component: str, stages: StageLog) -> Artifact:
        spec = self.model.specs[component]
        precision = self.component_precision(component)
        with stages.stage("fingerprint"):
            fingerprint = component_fingerprint(self.model, component, self.store.file_digest)
        key = onnx_key(spec, fingerprint, precision)

        def build(staging: Staging) -> None:
            module = self.model.family.torch_module(component, self.model.folder, torch.float32).to(self.device)
            traced = export_dims(self.model)
            keep_fp32 = [t.name for t in (*spec.inputs, *spec.outputs) if t.keep_fp32]
            with self.store.scratch() as raw_dir:
                raw = raw_dir / ONNX_FILE
                with stages.stage("export"):
                    export_onnx(module, spec, traced, raw)
                with stages.stage("optimize"):
                    graph = optimize(raw, staging.path / ONNX_FILE, precision, keep_fp32)
            with stages.stage("validate"):
                candidate = OnnxRuntimeRunner(spec, staging.path / ONNX_FILE, precision, validation_device(self.device))
                reference = TorchRunner(spec, module, "fp32", self.device)
                dims = validation_dims(self.model, traced)
                parity = check(spec, "onnxruntime", compare(spec, reference, candidate, dims, precision))
            staging.info.update(
                model=self.model.name,
                traced_size=f"{traced.height}x{traced.width}",
                graph=asdict(graph),
                parity=parity,
                stage_seconds=dict(stages.seconds),
                tools=tool_versions(),
            )

        return self.store.ensure(key, build)
