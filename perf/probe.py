"""One worker's run of a request, kept for `make verify-gpu`: each component's first inputs and outputs,
its time per call and the images; and components run again on those inputs under named LoRA sets.

Two workers are never held at once: the candidate runs everything first, then the torch reference
runs the same inputs, so a model that fills the GPU once can still be verified.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.backends.chain import ChainCalls, RunnerChain
from engine.common.metrics import StageTimer
from engine.lora.library import WeightPatch
from engine.serving.worker import Worker

Outputs = dict[str, torch.Tensor]


class RecordingCalls(ChainCalls):
    """The pipeline's calls, with each component's first inputs and outputs kept (on the CPU) and the
    time of every call (synchronized on a GPU, so it is the call's own)."""

    def __init__(self, chains: Mapping[str, RunnerChain], device: torch.device):
        super().__init__(chains)
        self.device = device
        self.inputs: dict[str, Outputs] = {}
        self.outputs: dict[str, Outputs] = {}
        self.seconds: dict[str, list[float]] = {}

    def __getitem__(self, component: str) -> Callable[[Mapping[str, torch.Tensor]], Outputs]:
        call = super().__getitem__(component)

        def recorded(inputs: Mapping[str, torch.Tensor]) -> Outputs:
            self._synchronize()
            started = time.perf_counter()
            outputs = call(inputs)
            self._synchronize()
            self.seconds.setdefault(component, []).append(time.perf_counter() - started)
            if component not in self.inputs:
                self.inputs[component] = on_cpu(inputs)
                self.outputs[component] = on_cpu(outputs)
            return outputs

        return recorded

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def ms_per_call(self, component: str) -> float:
        seconds = self.seconds.get(component, [])
        return 1000 * sum(seconds) / len(seconds) if seconds else 0.0


def on_cpu(tensors: Mapping[str, torch.Tensor]) -> Outputs:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in tensors.items()}


@dataclass
class Run:
    """What one worker made of the request."""

    images: list[np.ndarray]
    calls: RecordingCalls


def generate(worker: Worker, payload: dict) -> Run:
    """The request through the worker's pipeline, recording every component call."""
    request, inputs = worker.resolve(payload)
    prepared = worker.pipeline.prepare_images(inputs, request) if inputs is not None else None
    calls = RecordingCalls(worker.chains, worker.device)
    seeds = [payload["seed"] + index for index in range(request.num_images)]
    images = worker.pipeline(request, seeds, calls, StageTimer(worker.device), None, prepared)
    return Run([np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0 for image in images], calls)


def lora_patches(worker: Worker, loras: list[dict]) -> dict[str, WeightPatch]:
    """The worker's patch per component for a request's ``loras`` entries."""
    request, _ = worker.resolve({"prompt": "lora", "loras": loras})
    return dict(worker.loras.select(request.loras).patches)


@dataclass
class Replayed:
    """Components' outputs on recorded inputs under named LoRA sets, and the backend that ran each."""

    outputs: dict[str, dict[str, Outputs]] = field(default_factory=dict)
    backends: dict[str, dict[str, str]] = field(default_factory=dict)


def run_recorded(
    worker: Worker,
    inputs: Mapping[str, Outputs],
    components: Iterable[str],
    sets: Mapping[str, Mapping[str, WeightPatch] | None],
) -> Replayed:
    """Each of ``components`` on its recorded ``inputs`` under each named LoRA set in order (the chain
    sets the weights: a refit on TensorRT), then back to the base weights."""
    replayed = Replayed()
    for component in components:
        chain = worker.chains[component]
        device_inputs = {name: tensor.to(worker.device) for name, tensor in inputs[component].items()}
        for step, patches in sets.items():
            outputs, runner = chain.run(device_inputs, _ignore, (patches or {}).get(component))
            replayed.outputs.setdefault(component, {})[step] = on_cpu(outputs)
            replayed.backends.setdefault(component, {})[step] = runner.backend
        chain.run(device_inputs, _ignore, None)
    return replayed


def _ignore(reason: str) -> None:
    """The chain's fallback reasons: the backend that ran says enough here."""
