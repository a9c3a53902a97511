"""A job's metrics: what ran where, how long each stage took, and the memory it used.

The keys and their order are the response's ``metrics`` object, which the README documents.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.backends.chain import ChainCalls
from engine.backends.tensorrt.runner import TensorRTBackend
from engine.common.metrics import StageTimer
from engine.pipeline import ControlImage
from engine.request.entries import ControlNetEntry
from engine.request.resolved import ResolvedRequest


@dataclass(frozen=True)
class Ran:
    """How a job ran: its id and start, its stage timer, its runner calls, the model's own scheduler, and
    the CUDA graph counts it started from."""

    job_id: str
    started: float
    timer: StageTimer
    calls: ChainCalls
    model_scheduler: str
    graph_counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    """The TensorRT engines' CUDA graph captures and replays per component when the job began."""


def job_metrics(
    request: ResolvedRequest,
    ran: Ran,
    device: torch.device,
    precision: str,
    engines: Sequence[TensorRTBackend],
    init_ms: dict[str, float | str] | None,
) -> dict[str, Any]:
    """The request's figures, with the cold start's breakdown (``init_ms``) on a worker's first job."""
    timer, calls = ran.timer, ran.calls
    metrics: dict[str, Any] = {
        "process_time": round(time.perf_counter() - ran.started, 4),
        "num_samples": request.num_images,
        "prompt_tokens": list(request.prompt_tokens),
        "prompt_chunks": request.prompt_chunks,
        "image_size": f"{request.width}x{request.height}",
        "mode": request.mode,
        "request_id": ran.job_id,
        "backends": calls.backends,
        "fallbacks": calls.fallbacks,
        "stages_ms": timer.stages_ms(),
        "unet_step_ms": timer.step_stats_ms(),
        "num_inference_steps": request.steps,
        "scheduler": request.scheduler or ran.model_scheduler,
        "device": str(device),
        "precision": precision,
        "precisions": calls.precisions,
        "lora_ms": round(calls.lora_seconds * 1000, 1),
        "cold_start": init_ms is not None,
        "peak_memory_mb": timer.peak_memory_mb(),
    }
    if any(backend.runners for backend in engines):
        metrics["engine_memory_mb"] = round(sum(backend.memory_bytes for backend in engines) / 2**20, 1)
        replays = {c: n for backend in engines for c, (_, n) in backend.graph_counts().items()}
        metrics["cuda_graph_replays"] = {c: n - ran.graph_counts.get(c, (0, 0))[1] for c, n in replays.items()}
    if init_ms is not None:
        metrics["init_ms"] = init_ms
    return metrics


def controlnet_metrics(
    requests: tuple[ControlNetEntry, ...], controls: tuple[ControlImage, ...], timer: StageTimer
) -> list[dict[str, Any]]:
    """Each ControlNet's name, scale and span, and the steps it ran with the time each took on average."""
    found = []
    for request, control in zip(requests, controls, strict=True):
        total_ms, steps = timer.stage_total(control.component)
        found.append(
            {
                "name": request.name,
                "scale": request.scale,
                "start": request.start,
                "end": request.end,
                "steps": steps,
                "step_ms": round(total_ms / steps, 3) if steps else 0.0,
            }
        )
    return found
