"""Times scenarios through one backend at a time, with warm-ups and repeated runs."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine.common.dtypes import PRECISION_DTYPES
from engine.schedulers import make_scheduler
from engine.serving.worker import Worker
from engine.settings import Backend, Settings
from perf.scenarios import Scenario

log = logging.getLogger(__name__)


def percentiles(values: list[float]) -> dict[str, float]:
    p50, p95 = np.percentile(values, [50, 95])
    return {"p50": round(float(p50), 2), "p95": round(float(p95), 2)}


@dataclass
class Timing:
    backend: str
    scenario: str
    end_to_end_ms: dict[str, float]
    stages_ms: dict[str, dict[str, float]]
    backends: dict[str, str]
    fallbacks: dict[str, str]
    runs: int
    note: str = ""


@dataclass
class BackendResult:
    backend: str
    timings: list[Timing] = field(default_factory=list)
    skipped: str | None = None


def time_worker(worker: Worker, backend: str, scenario: Scenario, warmup: int, runs: int) -> Timing:
    """Warms up, then times ``runs`` requests; per-stage times come from the response's metrics."""
    for index in range(warmup):
        response = worker.handle({"id": f"warmup-{index}", "input": scenario.payload})
        if response["status"] != "success":
            raise RuntimeError(f"{backend} / {scenario.name}: {response['error']}")
    totals: list[float] = []
    stages: dict[str, list[float]] = {}
    metrics: dict[str, Any] = {}
    for index in range(runs):
        response = worker.handle({"id": f"run-{index}", "input": scenario.payload})
        metrics = response["metrics"]
        totals.append(metrics["process_time"] * 1000.0)
        for stage, value in metrics["stages_ms"].items():
            stages.setdefault(stage, []).append(value)
        stages.setdefault("unet_step", []).append(metrics["unet_step_ms"]["p50"])
    return Timing(
        backend=backend,
        scenario=scenario.name,
        end_to_end_ms=percentiles(totals),
        stages_ms={stage: percentiles(values) for stage, values in stages.items()},
        backends=metrics["backends"],
        fallbacks=metrics["fallbacks"],
        runs=runs,
    )


def bench_backend(settings: Settings, backend: str, scenarios: list[Scenario], warmup: int, runs: int) -> BackendResult:
    """One backend through every scenario; a backend with nothing to run is reported as skipped."""
    worker = Worker(settings.model_copy(update={"backend": Backend(backend)}))
    try:
        result = BackendResult(backend)
        unavailable = {c: r for c, chain in worker.chains.items() for b, r in chain.unavailable.items() if b == backend}
        if backend != "torch" and len(unavailable) == len(worker.chains):
            result.skipped = "; ".join(f"{c}: {r}" for c, r in unavailable.items())
            return result
        for scenario in scenarios:
            timing = time_worker(worker, backend, scenario, warmup, runs)
            others = {c: b for c, b in timing.backends.items() if b != backend}
            if others:
                timing.note = "fallback: " + ", ".join(f"{c} on {b}" for c, b in others.items())
            result.timings.append(timing)
        return result
    finally:
        del worker
        release_memory()


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_diffusers(settings: Settings, scenarios: list[Scenario], warmup: int, runs: int) -> BackendResult:
    """diffusers' own pipelines on the same model, device, dtype and requests: the outside baseline (its
    ControlNet pipelines where a scenario names a ControlNet, given the same control image)."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image, ControlNetModel, DiffusionPipeline

    worker = Worker(settings.model_copy(update={"backend": Backend.TORCH}))
    dtype = PRECISION_DTYPES[worker.precision]
    extra = {"safety_checker": None} if worker.model.family.name == "sd" else {}
    text_to_image = DiffusionPipeline.from_pretrained(worker.model.folder, torch_dtype=dtype, **extra)
    text_to_image = text_to_image.to(worker.device)
    image_to_image = AutoPipelineForImage2Image.from_pipe(text_to_image)
    for pipe in (text_to_image, image_to_image):
        pipe.set_progress_bar_config(disable=True)
    on_gpu = worker.device.type == "cuda"
    result = BackendResult("diffusers")
    try:
        for scenario in (s for s in scenarios if s.diffusers_comparable):
            request, inputs = worker.resolve(scenario.payload)
            image = inputs.image if inputs is not None else None
            controls = inputs.controls if inputs is not None else ()
            pipe = image_to_image if image else text_to_image
            if controls:
                controlnet = ControlNetModel.from_pretrained(
                    settings.controlnet_dir / request.controlnets[0].name, torch_dtype=dtype
                )
                pipe = AutoPipelineForText2Image.from_pipe(text_to_image, controlnet=controlnet.to(worker.device))
                pipe.set_progress_bar_config(disable=True)
            pipe.scheduler = make_scheduler(request.scheduler, worker.model.scheduler_config)
            inputs = (
                {"image": image, "strength": request.strength}
                if image
                else {"width": request.width, "height": request.height}
            )
            if controls:
                inputs |= {"image": controls[0].image, "controlnet_conditioning_scale": controls[0].scale}

            def call(pipe=pipe, request=request, inputs=inputs) -> None:
                pipe(
                    prompt=request.prompts,
                    negative_prompt=request.negative_prompts,
                    num_inference_steps=request.steps,
                    guidance_scale=request.guidance_scale,
                    num_images_per_prompt=request.images_per_prompt,
                    generator=torch.Generator("cpu").manual_seed(0),
                    **inputs,
                )
                if on_gpu:
                    torch.cuda.synchronize()

            for _ in range(warmup):
                call()
            totals = []
            for _ in range(runs):
                started = time.perf_counter()
                call()
                totals.append((time.perf_counter() - started) * 1000.0)
            result.timings.append(Timing("diffusers", scenario.name, percentiles(totals), {}, {}, {}, runs))
        return result
    finally:
        del text_to_image, image_to_image, worker
        release_memory()
