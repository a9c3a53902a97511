"""The torch side of an export: load the module, compute the reference outputs, trace it to ONNX,
and hash its parameters for the weight map.

The module is loaded once for both, and is gone when this returns. A large component does
all of it in a child process: torch's exporter keeps the weights it serialized alive after
the module is freed (a 2 GB token table stayed resident in the measurement), and a process
that exits gives every byte back before the graph passes and ONNX Runtime need memory.
Small components stay in-process, where a child's start-up (imports) would cost more than
they hold.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.backends.torch import TorchRunner
from engine.models.model import WEIGHT_SUFFIXES, Model
from engine.spec import Dims
from export.onnx import export_dims, export_onnx
from export.stagelog import StageLog
from export.validate import Reference, reference_outputs
from export.weightmap import ParameterDigests, parameter_digests

ISOLATE_FROM_BYTES = 2**30
"""Components with at least this many bytes of weights are traced in a child process."""


def weight_bytes(model: Model, component: str) -> int:
    """Bytes of the weight files a component is loaded from."""
    folder = model.component_folder(component)
    files = [folder] if folder.is_file() else list(folder.iterdir())
    return sum(path.stat().st_size for path in files if path.suffix in WEIGHT_SUFFIXES)


def load_module(model: Model, component: str, device: torch.device) -> torch.nn.Module:
    return model.torch_module(component, torch.float32).to(device)


def references_for(model: Model, component: str, module: torch.nn.Module, dims: list[Dims]) -> list[Reference]:
    spec = model.specs[component]
    device = next(module.parameters()).device
    return reference_outputs(spec, TorchRunner(spec, module, "fp32", device), dims)


@dataclass
class Traced:
    references: list[Reference]
    stages: StageLog
    digests: ParameterDigests
    """The parameters' content hashes, for the weight map of the final graph."""


def trace(model: Model, component: str, device: str, dims: list[Dims], raw: Path, precision: str) -> Traced:
    """Reference outputs at ``dims``, the raw ONNX graph at ``raw`` and the parameters' hashes as a
    ``precision`` graph holds them, with each stage's time and memory."""
    stages = StageLog(device=torch.device(device))
    with stages.stage("load"):
        module = load_module(model, component, torch.device(device))
    with stages.stage("reference"):
        references = references_for(model, component, module, dims)
    with stages.stage("export"):
        export_onnx(module, model.specs[component], export_dims(model), raw)
    with stages.stage("hash weights"):
        digests = parameter_digests(module, precision)
    return Traced(references, stages, digests)


def trace_component(
    model: Model, component: str, device: torch.device, dims: list[Dims], raw: Path, precision: str
) -> Traced:
    """``trace``, in a child process when the component is large."""
    if weight_bytes(model, component) < ISOLATE_FROM_BYTES:
        return trace(model, component, str(device), dims, raw, precision)
    context = multiprocessing.get_context("spawn")  # a fork would inherit torch's thread pools and CUDA state
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as child:
        return child.submit(trace, model, component, str(device), dims, raw, precision).result()
