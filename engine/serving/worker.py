"""The worker: loads the model and its runners once, then turns jobs into responses.

Everything a job can get wrong comes back as ``{"status": "error", "error": ...}``;
the worker itself keeps serving.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import secrets
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from typing import Any

import torch
from PIL import Image

from engine.backends.assemble import ChainCalls, LazyTorchRunner, RunnerChain, build_chains, share_torch_weights
from engine.backends.base import Runner
from engine.backends.tensorrt import TensorRTBackend
from engine.common.downloads import download_limits, limit_to_request
from engine.common.errors import ConfigError, DeadlineExceeded, RequestError, WorkerError
from engine.common.faults import DeviceFaults, is_out_of_memory
from engine.common.logs import request_context
from engine.common.metrics import ColdStart, StageTimer, reset_peak_memory
from engine.lora.files import LoraFiles
from engine.lora.library import NO_LORAS, LoraLibrary, LoraSelection
from engine.models.controlnet import CONTROLLED_UNET, controlnet_component
from engine.models.model import Model, load_model
from engine.pipeline import ControlImage, DiffusionPipeline, ImageInputs, StepCallback
from engine.request.images import ImageLimits, load_image, mask_for_crop
from engine.request.schema import GenerateRequest, Limits, ResolvedRequest, parse_request, validate_request
from engine.serving.controlnets import ControlNetFolders, ControlNetRequest, canny, found_controlnets
from engine.serving.delivery import Delivery, EncodedImage
from engine.serving.encode import encode_image
from engine.serving.memory import available_bytes, estimates, patch_bytes
from engine.settings import Precision, Settings, TorchFallback
from engine.store.store import READS, Store

log = logging.getLogger(__name__)

ProgressCallback = Callable[[dict[str, Any]], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise WorkerError(f"DEVICE={name} but no CUDA device is visible")
    return device


def resolve_precision(precision: Precision, device: torch.device) -> str:
    """``auto`` is fp16 on a GPU (with bf16 where a checkpoint is bf16: see the families'
    ``component_precision``) and fp32 on the CPU; bf16 also runs on the CPU, fp16 does not."""
    if precision is Precision.AUTO:
        return "fp16" if device.type == "cuda" else "fp32"
    if precision is Precision.FP16 and device.type != "cuda":
        raise WorkerError("PRECISION=fp16 needs a CUDA device; use fp32 on the CPU")
    return precision.value


class Worker:
    """One model, its runner chains and the pipeline, loaded once per process."""

    def __init__(self, settings: Settings, cold_start: ColdStart | None = None):
        self.settings = settings
        self.cold_start = cold_start or ColdStart()
        self.device = resolve_device(settings.device)
        self.precision = resolve_precision(settings.precision, self.device)
        self.faults = DeviceFaults(self.device)
        self.model: Model = load_model(settings.model, settings.cache_dir, settings.model_revision)
        self.store = Store(settings.engine_dir, settings.lock_stale_s, settings.lock_heartbeat_s)
        self.cold_start.mark("model_resolve")
        read_before = (READS.bytes, READS.seconds)
        self.controlnet_engines: list[TensorRTBackend] = []
        self._chains_lock = threading.Lock()
        self.chains = self._build_chains()
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
        self.delivery = Delivery(settings)
        self.image_limits = ImageLimits(
            settings.max_input_image_bytes, settings.max_image_side, settings.min_image_side
        )
        family, config = self.model.family, self.model.config
        steps = family.steps_default(config)
        if steps is not None and "default_steps" not in settings.model_fields_set:
            settings = settings.model_copy(update={"default_steps": steps})
        self.limits = Limits.from_settings(
            settings,
            config.native_size,
            family.guidance_default(config),
            inpaint_strength=family.default_inpaint_strength,
            schedulers=family.scheduler_names,
            size_multiple=config.size_multiple,
            max_side=config.max_side,
            prompt_syntaxes=family.prompt_syntaxes,
        )
        log.info(
            "worker ready",
            extra={"fields": {"model": settings.model, "device": str(self.device), "precision": self.precision}},
        )

    def _build_chains(self) -> dict[str, RunnerChain]:
        """The runner chains, with the torch weights loaded as ``_load_torch_weights`` says."""
        chains, self.tensorrt = build_chains(self.model, self.settings, self.store, self.device, self.precision)
        self._load_torch_weights(chains, (*self.model.family.text_encoders, self.model.family.denoiser, "vae_decoder"))
        return chains

    def _load_torch_weights(self, chains: Mapping[str, RunnerChain], needed: Collection[str]) -> None:
        """Loads torch weights now where a request would load them anyway (torch is the first choice for a
        ``needed`` component) or where ``TORCH_FALLBACK=eager`` asks for it."""
        eager = self.settings.torch_fallback is TorchFallback.EAGER
        for component, chain in chains.items():
            for position, runner in enumerate(chain.runners):
                if isinstance(runner, LazyTorchRunner) and (eager or (position == 0 and component in needed)):
                    runner.ensure_loaded()

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
            self._add_controlnet_chains(components, load_now=True)

    def _add_controlnet_chains(self, components: list[str], load_now: bool = False) -> None:
        """Runner chains for ControlNets a request is the first to use (or ``load_now``, preloaded, with
        their torch weights), and for the controlled UNet; its torch fallback runs the UNet's own torch
        module, so the weights are not loaded twice."""
        with self._chains_lock:
            missing = [c for c in (*components, CONTROLLED_UNET) if c not in self.chains]
            if not missing:
                return
            chains, engines = build_chains(
                self.model, self.settings, self.store, self.device, self.precision, components=missing
            )
            if CONTROLLED_UNET in chains:
                share_torch_weights(chains[CONTROLLED_UNET], self.chains["unet"], self.model.controlled_unet)
            self.chains.update(chains)
            self.controlnet_engines.append(engines)
            self._load_torch_weights(chains, chains if load_now else ())

    def handle(self, job: dict[str, Any], progress: ProgressCallback | None = None) -> dict[str, Any]:
        """A RunPod job in, a response dict out; never raises for a bad job."""
        job_id = str(job.get("id", "local"))
        downloads = download_limits(self.settings.download_timeout_s, self.settings.download_min_bytes_per_s)
        with request_context(job_id), downloads:
            started = time.perf_counter()
            try:
                return self._generate(job.get("input"), job_id, started, progress)
            except WorkerError as error:
                log.warning("job failed: %s", error)
                return self._error(job_id, str(error))
            except Exception as error:
                return self._fault(job_id, error)

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
        gc.collect()
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

    def _generate(self, payload: Any, job_id: str, started: float, progress: ProgressCallback | None) -> dict[str, Any]:
        timer = StageTimer(self.device)
        request, inputs = self.resolve(payload)
        self._check_memory(request)
        with timer.stage("lora_load") if request.loras else contextlib.nullcontext():
            loras = self.loras.select(request.loras)  # every entry checked before any weight changes
        if loras.patches:
            self._check_memory(request, loras)
        prepared = self.pipeline.prepare_images(inputs, request) if inputs is not None else None
        base_seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
        seeds = [base_seed + index for index in range(request.num_images)]
        patches = dict(loras.patches)
        if "unet" in patches:  # the controlled UNet has the UNet's weights, LoRAs included
            patches[CONTROLLED_UNET] = patches["unet"]
        calls = ChainCalls(self.chains, patches)
        reset_peak_memory(self.device)
        on_step = self._step_callback(request, started + request.timeout_s, progress)
        images = self.pipeline(request, seeds, calls, timer, on_step, prepared)
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
            output, delivery = self.delivery.deliver(job_id, encoded)
        metrics = self._metrics(request, job_id, started, timer, calls)
        metrics["loras"] = loras.metrics()
        if request.controlnets and inputs is not None:
            metrics["controlnets"] = controlnet_metrics(request.controlnets, inputs.controls, timer)
        metrics["delivery"] = delivery
        log.info("job done", extra={"fields": {"process_time": metrics["process_time"], "delivery": delivery}})
        return {"status": "success", "output": output, "metrics": metrics}

    def _check_memory(self, request: ResolvedRequest, loras: LoraSelection = NO_LORAS) -> None:
        """Refuses a request whose activations, with what applying its LoRA set holds, cannot fit the memory
        left (see ``engine.serving.memory``). It runs before the LoRAs are read, and again after with them, so a
        request too large on its own is refused before any LoRA is fetched."""
        if not self.settings.memory_guard:
            return
        family, config = self.model.family, self.model.config
        controlnets = [controlnet_component(control.name) for control in request.controlnets]
        runs_denoiser = CONTROLLED_UNET if controlnets else family.denoiser

        def first_runner(component: str) -> Runner | None:
            chain = self.chains.get(runs_denoiser if component == family.denoiser else component)
            return chain.runners[0] if chain is not None and chain.runners else None

        def outside_engines(component: str) -> bool:
            runner = first_runner(component)
            return self.device.type != "cuda" or runner is None or runner.backend != "tensorrt"

        guidance = family.classifier_free_scale(request) is not None
        denoiser, vae = (
            family.component_precision(c, self.precision, config) for c in (family.denoiser, "vae_decoder")
        )
        found = estimates(
            config,
            request.num_images,
            request.height,
            request.width,
            guidance,
            denoiser,
            vae,
            controlnets,
            encodes_image=request.image is not None,
        )
        relevant = [estimate for estimate in found if outside_engines(estimate.stage)]
        lora = sum(
            patch_bytes(
                (self.model.parameter_shapes[component][name] for name in patch.names),
                family.component_precision(component, self.precision, config),
            )
            for component, patch in loras.patches.items()
            if outside_engines(component) and getattr(first_runner(component), "weights_key", None) != patch.key
        )
        if not relevant and not lora:
            return
        stage, needed = (relevant[0].stage, relevant[0].bytes + lora) if relevant else ("the LoRAs", lora)
        room = available_bytes(self.device) - int(self.settings.min_free_memory_gb * 2**30)
        if needed > room:
            where = "GPU" if self.device.type == "cuda" else "memory"
            fields, of_which = "width, height, num_images", ""
            if lora:
                fields, of_which = f"{fields}, loras", f" ({lora / 2**30:.1f} GiB of it for the LoRAs' patched weights)"
            raise RequestError(
                f"{fields}: {request.width}x{request.height} with {request.num_images} image(s) "
                f"needs about {needed / 2**30:.1f} GiB of {where} in {stage}{of_which}, and "
                f"{max(room, 0) / 2**30:.1f} GiB is free (MIN_FREE_MEMORY_GB={self.settings.min_free_memory_gb:g} "
                "kept aside); ask for a smaller size or fewer images"
            )

    def resolve(self, payload: Any) -> tuple[ResolvedRequest, ImageInputs | None]:
        """A valid request with its defaults, and its input image (and mask) and control images when it
        has them: the input image's size is the default size, else the first control image's."""
        draft = validate_request(payload, self.limits)
        limit_to_request(draft.timeout_s or self.limits.max_timeout_s)  # downloads end by the request's deadline
        self._check_family_features(draft)
        if self.model.config.inpainting_unet and draft.mask is None:
            raise RequestError(
                "mask: this is an inpainting model (its UNet takes the mask and the masked image as extra "
                "channels); send image and mask"
            )
        image = load_image(draft.image, self.image_limits) if draft.image is not None else None
        mask = load_image(draft.mask, self.image_limits, "mask") if draft.mask is not None else None
        if image is not None and mask is not None and draft.padding_mask_crop is not None:
            mask = mask_for_crop(mask, image.size)
        controls = tuple(
            self._control_image(control.to_request(), f"controlnets[{index}]")
            for index, control in enumerate(draft.controlnets or ())
        )
        size_from = image if image is not None else controls[0].image if controls else None
        request = draft.resolved(self.limits, size_from.size if size_from is not None else None)
        inputs = ImageInputs(image, mask, controls) if image is not None or controls else None
        request = self._measure_prompts(request)
        if controls:
            self._add_controlnet_chains([control.component for control in controls])
        return request, inputs

    def _check_family_features(self, draft: GenerateRequest) -> None:
        """Refuses what the model's family does not offer yet, naming the field."""
        family = self.model.family
        unsupported = {
            "mask": draft.mask is not None and not family.inpainting,
            "controlnets": bool(draft.controlnets) and not family.controlnets,
            "loras": bool(draft.loras) and not family.lora_targets,
        }
        problems = [f"{field}: not supported for {family.name} models yet" for field, bad in unsupported.items() if bad]
        if draft.true_cfg_scale is not None and not family.true_cfg:
            problems.append(f"true_cfg_scale: only for models with distilled guidance, not {family.name}")
        if family.true_cfg and draft.negative_prompt is not None and (draft.true_cfg_scale or 1.0) <= 1.0:
            problems.append(f"negative_prompt: {family.name} models use one only with true_cfg_scale above 1")
        if problems:
            raise RequestError("; ".join(problems))

    def _control_image(self, control: ControlNetRequest, field: str) -> ControlImage:
        """A ``controlnets`` entry's component and control image (its edge map, with preprocess canny)."""
        component = self.controlnets.component(control.name, f"{field}.name")
        image = load_image(control.image, self.image_limits, f"{field}.image")
        if control.thresholds is not None:
            image = canny(image, *control.thresholds)
        return ControlImage(component, image, control.scale, control.start, control.end)

    def _measure_prompts(self, request: ResolvedRequest) -> ResolvedRequest:
        """The request with its prompts' token and chunk counts; refuses a prompt past MAX_PROMPT_CHUNKS."""
        fields = {"prompt": request.prompts}
        guided = self.model.family.classifier_free_scale(request)
        if request.negative_prompts is not None and guided is not None:
            fields["negative_prompt"] = request.negative_prompts
        limit = self.settings.max_prompt_chunks
        lengths = {
            field: self.model.family.measure_prompts(self.model.tokenizers, texts, request.prompt_syntax)
            for field, texts in fields.items()
        }
        problems = [
            f"{field if len(found) == 1 else f'{field}[{index}]'}: {length.tokens} tokens make {length.chunks} "
            f"chunks of 75; at most {limit} ({limit * 75} tokens, MAX_PROMPT_CHUNKS)"
            for field, found in lengths.items()
            for index, length in enumerate(found)
            if length.chunks > limit
        ]
        if problems:
            raise RequestError("; ".join(problems))
        return replace(
            request,
            prompt_tokens=tuple(length.tokens for length in lengths["prompt"]),
            prompt_chunks=max(length.chunks for found in lengths.values() for length in found),
        )

    def warmup(self) -> None:
        """One small generation at the native size, so the first request pays no first-run costs,
        then a CUDA graph of each engine's optimum shapes, so requests at those shapes replay it."""
        request = parse_request({"prompt": "warm-up", "num_inference_steps": 2, "seed": 0}, self.limits)
        prepared = None
        if self.model.config.inpainting_unet:  # an inpainting UNet warms up on an inpainting call: gray, all masked
            size = (request.width, request.height)
            request = replace(request, strength=self.limits.default_strength(True))
            inputs = ImageInputs(Image.new("RGB", size, (128, 128, 128)), Image.new("L", size, 255))
            prepared = self.pipeline.prepare_images(inputs, request)
        self.pipeline(request, [0], ChainCalls(self.chains), StageTimer(self.device), None, prepared)
        if self.settings.cuda_graphs:
            captured = self.tensorrt.capture_graphs()
            log.info("captured %d CUDA graphs", captured)

    def _metrics(
        self,
        request: ResolvedRequest,
        job_id: str,
        started: float,
        timer: StageTimer,
        calls: ChainCalls,
    ) -> dict[str, Any]:
        stages = timer.stages_ms()
        init_ms = self.cold_start.take_first()
        metrics: dict[str, Any] = {
            "process_time": round(time.perf_counter() - started, 4),
            "num_samples": request.num_images,
            "prompt_tokens": list(request.prompt_tokens),
            "prompt_chunks": request.prompt_chunks,
            "image_size": f"{request.width}x{request.height}",
            "mode": request.mode,
            "request_id": job_id,
            "backends": calls.backends,
            "fallbacks": calls.fallbacks,
            "stages_ms": stages,
            "unet_step_ms": timer.step_stats_ms(),
            "num_inference_steps": request.steps,
            "scheduler": request.scheduler or self.model.scheduler_config["_class_name"],
            "device": str(self.device),
            "precision": self.precision,
            "precisions": calls.precisions,
            "lora_ms": round(calls.lora_seconds * 1000, 1),
            "cold_start": init_ms is not None,
            "peak_memory_mb": timer.peak_memory_mb(),
        }
        engines = [self.tensorrt, *self.controlnet_engines]
        if any(backend.runners for backend in engines):
            metrics["engine_memory_mb"] = round(sum(backend.memory_bytes for backend in engines) / 2**20, 1)
        if init_ms is not None:
            metrics["init_ms"] = init_ms
        return metrics


def controlnet_metrics(
    requests: tuple[ControlNetRequest, ...], controls: tuple[ControlImage, ...], timer: StageTimer
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
