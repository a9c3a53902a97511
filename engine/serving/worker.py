"""The worker: loads the model and its runners once, then turns jobs into responses.

Everything a job can get wrong comes back as ``{"status": "error", "error": ...}``;
the worker itself keeps serving.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image

from engine.backends.chain import ChainCalls
from engine.common.download_limits import download_limits
from engine.common.errors import ConfigError, DeadlineExceeded, RequestError, WorkerError
from engine.common.faults import DeviceFaults, is_out_of_memory
from engine.common.logs import request_context
from engine.common.metrics import ColdStart, StageTimer, reset_peak_memory
from engine.devices import resolve_device, resolve_precision
from engine.lora.files import LoraFiles
from engine.lora.ip_adapters import IpAdapterFiles, adapter_patch
from engine.lora.library import NO_LORAS, LoraLibrary, LoraSelection
from engine.models.controlnet import CONTROLLED_UNET
from engine.models.controlnet_folders import ControlNetFolders, found_controlnets
from engine.models.ip_adapter import ip_denoisers
from engine.models.model import Model, load_model
from engine.pipeline import DiffusionPipeline, ImageInputs, StepCallback
from engine.pipeline.image_prompts import ImagePrompt
from engine.request.checking import parse_request
from engine.request.resolved import ResolvedRequest
from engine.serving.admission import Admission, Admitted
from engine.serving.chains import ServedChains
from engine.serving.delivery import Delivery, EncodedImage
from engine.serving.encode import encode_image
from engine.serving.heap import collect_everything
from engine.serving.memory import check_fits
from engine.serving.report import Ran, controlnet_metrics, job_metrics
from engine.settings import Settings
from engine.store.artifact import READS
from engine.store.store import Store

log = logging.getLogger(__name__)

ProgressCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Answer:
    """A job's response, and the exception that made it an error (None on success)."""

    response: dict[str, Any]
    error: Exception | None = None


class Worker:
    """One model, its runner chains and the pipeline, loaded once per process."""

    def __init__(self, settings: Settings, cold_start: ColdStart | None = None):
        self.settings = settings
        self.cold_start = cold_start or ColdStart()
        self.device = resolve_device(settings.device)
        self.precision = resolve_precision(settings.precision, self.device)
        self.faults = DeviceFaults(self.device)
        self.model: Model = load_model(
            settings.model, settings.cache_dir, settings.model_revision, settings.model_cache_dir
        )
        self.store = Store(settings.engine_dir, settings.lock_stale_s, settings.lock_heartbeat_s)
        self.cold_start.mark("model_resolve")
        self.cold_start.note("model_source", self.model.source.value)
        read_before = (READS.bytes, READS.seconds)
        self.served = ServedChains(self.model, settings, self.store, self.device, self.precision)
        self.chains, self.tensorrt = self.served.chains, self.served.tensorrt
        self.cold_start.record_store_read(READS.bytes - read_before[0], READS.seconds - read_before[1])
        self.model.tokenizers  # noqa: B018 - load now, not in the first request
        self.cold_start.mark("runners_load")
        self.pipeline = DiffusionPipeline(self.model, self.device)
        assert settings.lora_dir is not None  # Settings fills it in
        self.loras = LoraLibrary(
            LoraFiles(settings.lora_dir, settings.max_lora_bytes, int(settings.lora_cache_gb * 1e9)),
            self.model,
            int(settings.lora_memory_gb * 1e9),
        )
        assert settings.controlnet_dir is not None  # Settings fills it in
        self.controlnets = ControlNetFolders(settings.controlnet_dir, self.model)
        if settings.preload_controlnets:
            self._preload_controlnets(settings.preload_controlnets)
            self.cold_start.mark("controlnets_load")
        assert settings.ip_adapter_dir is not None  # Settings fills it in
        self.ip_adapters = IpAdapterFiles(
            settings.ip_adapter_dir, self.model, settings.max_lora_bytes, self.store.file_digest
        )
        self.delivery = Delivery(settings)
        self.admission = Admission(settings, self.model, self.controlnets, self.loras.files, self.ip_adapters)
        self.limits = self.admission.limits
        log.info(
            "worker ready",
            extra={
                "fields": {
                    "model": settings.model,
                    "model_source": self.model.source.value,
                    "device": str(self.device),
                    "precision": self.precision,
                }
            },
        )

    def _preload_controlnets(self, names: str) -> None:
        """The runner chains of the ControlNets PRELOAD_CONTROLNETS names ('all': every one that fits),
        with their torch weights, as a request naming them would load them."""
        field = "PRELOAD_CONTROLNETS"
        if names.strip() == "all":
            components = []
            for name in found_controlnets(self.controlnets.root):
                try:
                    components.append(self.controlnets.component(name, field))
                except RequestError as error:
                    log.info("not preloaded: %s", error)
        else:
            try:
                components = [self.controlnets.component(name.strip(), field) for name in names.split(",")]
            except RequestError as error:
                raise ConfigError(str(error)) from None
        if components:
            self.served.add_controlnets(components, load_now=True)

    def handle(self, job: dict[str, Any], progress: ProgressCallback | None = None) -> dict[str, Any]:
        """A RunPod job in, a response dict out; never raises for a bad job."""
        return self.answer(job, progress).response

    def answer(self, job: dict[str, Any], progress: ProgressCallback | None = None, upload: bool = False) -> Answer:
        """``handle``'s response with the exception behind an error, for a caller that maps it to a status
        code; ``upload`` sends the images to the bucket whatever their size."""
        job_id = str(job.get("id", "local"))
        downloads = download_limits(self.settings.download_timeout_s, self.settings.download_min_bytes_per_s)
        with request_context(job_id), downloads:
            started = time.perf_counter()
            try:
                return Answer(self._generate(job.get("input"), job_id, started, progress, upload))
            except WorkerError as error:
                log.warning("job failed: %s", error)
                return Answer(self._error(job_id, str(error)), error)
            except Exception as error:
                return Answer(self._fault(job_id, error), error)

    def _error(self, job_id: str, message: str, **extra: Any) -> dict[str, Any]:
        return {"status": "error", "error": message, "request_id": job_id, **extra}

    def _fault(self, job_id: str, error: Exception) -> dict[str, Any]:
        """An exception from the generation itself: free what it held, and say whether the worker can go on.
        The caller gets a fixed message per kind of failure; the log has the exception."""
        if is_out_of_memory(error):
            log.error("out of GPU memory: %s", error)
            self._free_memory()
            return self._error(job_id, "out of GPU memory: try fewer images, a smaller size, or a larger GPU")
        if self.faults.unrecoverable(error):
            log.critical("unrecoverable CUDA error, asking RunPod for a new worker", exc_info=error)
            return self._error(
                job_id, f"the GPU failed; this worker will be replaced (request {job_id})", refresh_worker=True
            )
        log.error("job failed unexpectedly", exc_info=error)
        self._free_memory()
        return self._error(job_id, f"internal error: the worker logged the details (request {job_id})")

    def _free_memory(self) -> None:
        collect_everything()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _step_callback(
        self, request: ResolvedRequest, deadline: float, progress: ProgressCallback | None
    ) -> StepCallback:
        every = self.settings.progress_every

        def on_step(done: int, total: int) -> None:
            if time.perf_counter() > deadline:
                raise DeadlineExceeded(
                    f"timeout_s: the request passed its {request.timeout_s:g} s deadline after step {done} of {total}"
                )
            if progress is not None and (done % every == 0 or done == total):
                progress({"step": done, "total_steps": total})

        return on_step

    def _generate(
        self, payload: Any, job_id: str, started: float, progress: ProgressCallback | None, upload: bool = False
    ) -> dict[str, Any]:
        timer = StageTimer(self.device)
        admitted = self._admit(payload)
        request, inputs = admitted.request, admitted.inputs
        self._check_memory(request, image_prompts=admitted.image_prompts)
        with timer.stage("lora_load") if request.loras else contextlib.nullcontext():
            loras = self.loras.select(request.loras)  # every entry checked before any weight changes
        if loras.patches:
            self._check_memory(request, loras, admitted.image_prompts)
        prepared = self.pipeline.prepare_images(inputs, request) if inputs is not None else None
        base_seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
        seeds = [base_seed + index for index in range(request.num_images)]
        patches = dict(loras.patches)
        if "unet" in patches:  # the controlled UNet has the UNet's weights, LoRAs included
            patches[CONTROLLED_UNET] = patches["unet"]
        if admitted.adapters:  # the IP denoisers: each adapter's IP matrices in its slot, with the UNet's LoRAs
            plain, controlled = ip_denoisers(len(admitted.adapters))
            patches[plain] = patches[controlled] = adapter_patch(admitted.adapters, patches.get("unet"))
        calls = ChainCalls(self.chains, patches)
        reset_peak_memory(self.device)
        on_step = self._step_callback(request, started + request.timeout_s, progress)
        graphs = self.tensorrt.graph_counts()
        images = self.pipeline(request, seeds, calls, timer, on_step, prepared, admitted.image_prompts)
        with timer.stage("output_encode"):
            encoded = [
                EncodedImage(
                    encode_image(image, request.output_format, request.quality),
                    seed,
                    image.width,
                    image.height,
                    request.output_format,
                )
                for seed, image in zip(seeds, images, strict=True)
            ]
            output, delivery = self.delivery.deliver(job_id, encoded, upload)
        metrics = job_metrics(
            request,
            Ran(job_id, started, timer, calls, self.model.scheduler_config["_class_name"], graphs),
            self.device,
            self.precision,
            [self.tensorrt],
            self.cold_start.take_first(),
        )
        metrics["loras"] = loras.metrics()
        if admitted.adapters:
            metrics["ip_adapters"] = [
                {"name": adapter.name, "sha256": adapter.sha256, "kind": adapter.layout.kind, "scale": entry.scale}
                for adapter, entry in zip(admitted.adapters, request.ip_adapters, strict=True)
            ]
        if request.controlnets and inputs is not None:
            metrics["controlnets"] = controlnet_metrics(request.controlnets, inputs.controls, timer)
        metrics["delivery"] = delivery
        log.info("job done", extra={"fields": {"process_time": metrics["process_time"], "delivery": delivery}})
        return {"status": "success", "output": output, "metrics": metrics}

    def _check_memory(
        self, request: ResolvedRequest, loras: LoraSelection = NO_LORAS, image_prompts: Sequence[ImagePrompt] = ()
    ) -> None:
        """Refuses a request that cannot fit the memory left (see ``engine.serving.memory``). It runs before
        the LoRAs are read, and again after with them, so a request too large on its own is refused before
        any LoRA is fetched."""
        if self.settings.memory_guard:
            check_fits(
                request, loras, self.model, self.chains, self.device, self.precision, self.settings, image_prompts
            )

    def resolve(self, payload: Any) -> tuple[ResolvedRequest, ImageInputs | None]:
        """The admitted request and its images; the ControlNets it names get their runner chains now,
        after admission, so a refused request loads nothing."""
        admitted = self._admit(payload)
        return admitted.request, admitted.inputs

    def _admit(self, payload: Any) -> Admitted:
        """``resolve``'s admission, whole: with the IP-Adapters and image prompts, whose chains it adds."""
        admitted = self.admission.admit(payload)
        if admitted.controlnets:
            for component in admitted.controlnets:
                self.controlnets.add(component)
            self.served.add_controlnets(list(admitted.controlnets))
        if admitted.adapters:
            self.served.add_ip_adapters(admitted.adapters, controlled=bool(admitted.controlnets))
        return admitted

    def warmup(self) -> None:
        """One small generation at the native size, so the first request pays no first-run costs,
        then a CUDA graph of each engine's optimum shapes, so requests at those shapes replay it."""
        request = parse_request({"prompt": "warm-up", "num_inference_steps": 2, "seed": 0}, self.limits)
        family, size = self.model.family, (request.width, request.height)
        gray, inputs = Image.new("RGB", size, (128, 128, 128)), None
        if family.inpainting_model(self.model.config):  # it warms up on an inpainting call: gray, all masked
            request = replace(request, strength=self.limits.default_strength(True))
            inputs = ImageInputs(gray, Image.new("L", size, 255))
        elif family.control_image:  # on a gray control image
            inputs = ImageInputs(control=gray)
        elif family.reference_image:  # on a gray reference image
            inputs = ImageInputs(gray)
        prepared = self.pipeline.prepare_images(inputs, request) if inputs is not None else None
        self.pipeline(request, [0], ChainCalls(self.chains), StageTimer(self.device), None, prepared)
        if self.settings.cuda_graphs:
            captured = self.tensorrt.capture_graphs()
            log.info("captured %d CUDA graphs", captured)
