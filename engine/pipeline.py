"""The denoising loop, in diffusers' order and with diffusers' step names.

Every component call goes through a Runner, so the same loop runs on torch, ONNX
Runtime or TensorRT, per component. The loop keeps latents and scheduler math in
fp32 whatever precision the UNet runs at. Text-to-image, image-to-image and inpainting
(diffusers' ``StableDiffusionInpaintPipeline``: a 9-channel UNet takes the mask and the
masked image's latents as extra channels, a 4-channel one has the kept region blended
back after every step) share it, each steered by ControlNets when a request names them
(diffusers' ControlNet pipelines: their residuals feed a controlled UNet at the steps where
they act).

Each stage's outputs are checked once for NaN and Inf (text embeddings, the VAE encoder's, the final
latents, the decoded images: one reduction per stage, never per step). Where they are not finite,
the components that made them move to an fp32 runner (see ``engine.backends.chain``) and the stage
runs again from the same random state, so the image is the one a sound run gives; where no runner
is left, the request fails with ``NonFiniteOutput`` rather than succeeding with a black image.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from engine.backends.base import ComponentCall
from engine.common.errors import NonFiniteOutput
from engine.common.metrics import StageTimer
from engine.models.controlnet import CONTROLLED_UNET
from engine.models.family import PromptBatch
from engine.models.model import Model
from engine.request.resolved import ResolvedRequest
from engine.schedulers import make_scheduler

StepCallback = Callable[[int, int], None]
"""Called after each denoising step with (steps done, steps in all); may raise to stop."""
Result = TypeVar("Result")


@runtime_checkable
class FP32Reruns(Protocol):
    """Component runners that can move components to runners computing in fp32 (``ChainCalls``)."""

    def rerun_in_fp32(self, components: Collection[str]) -> None:
        """Moves the components' later calls to fp32; raises NonFiniteOutput when none can move."""


def all_finite(tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether every float value is finite: one reduction per tensor and one device sync for them all."""
    checks = [torch.isfinite(tensor).all() for tensor in tensors if tensor is not None and tensor.is_floating_point()]
    return bool(torch.stack(checks).all()) if checks else True


@dataclass(frozen=True)
class ControlImage:
    """One ControlNet of a request: its component, its control image, and its scale from ``start`` to
    ``end`` (fractions of the denoising steps)."""

    component: str
    image: Image.Image
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


@dataclass(frozen=True)
class ImageInputs:
    """A request's input image, its mask when it asks for inpainting (white repaints; with
    ``padding_mask_crop``, at the image's size: see ``engine.request.images.mask_for_crop``), and its
    ControlNets' control images."""

    image: Image.Image | None = None
    mask: Image.Image | None = None
    controls: tuple[ControlImage, ...] = ()


@dataclass(frozen=True)
class Control:
    """A ControlNet's control image as it takes it: in [0, 1], one row per UNet row."""

    component: str
    image: torch.Tensor
    scale: float
    start: float
    end: float

    def scale_at(self, index: int, steps: int) -> float:
        """The scale at step ``index`` of ``steps``: 0 outside [start, end], as diffusers' ``controlnet_keep``."""
        return 0.0 if index / steps < self.start or (index + 1) / steps > self.end else self.scale


@dataclass(frozen=True)
class PreparedImages:
    """The input image as the VAE takes it (None for text-to-image), for inpainting the binarized mask
    at image size (1 repaints) with what the ``padding_mask_crop`` overlay needs, and the ControlNets'
    images."""

    image: torch.Tensor | None
    mask: torch.Tensor | None = None
    inputs: ImageInputs | None = None
    crop: tuple[int, int, int, int] | None = None
    controls: tuple[Control, ...] = ()


def _accepts(function: Callable, name: str) -> bool:
    return name in inspect.signature(function).parameters


class DiffusionPipeline:
    """Text-to-image for any model family, with every component behind a Runner."""

    def __init__(self, model: Model, device: torch.device):
        self.model = model
        self.device = device
        factor = model.config.vae_scale_factor
        self.image_processor = VaeImageProcessor(vae_scale_factor=factor)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )
        self.control_processor = VaeImageProcessor(vae_scale_factor=factor, do_convert_rgb=True, do_normalize=False)

    def __call__(
        self,
        request: ResolvedRequest,
        seeds: Sequence[int],
        runners: Mapping[str, ComponentCall],
        timer: StageTimer,
        on_step: StepCallback | None = None,
        prepared: PreparedImages | None = None,
    ) -> list[Image.Image]:
        """One image per seed, in prompt order (each prompt's images together).

        With ``prepared`` (from ``prepare_images``) holding an image, it is image-to-image: the image
        is encoded, noised to the timestep ``request.strength`` starts from, and denoised from there;
        or, with a mask, inpainting. Its ControlNets add their residuals to the UNet's, each scaled,
        at the steps between its start and end.
        """
        model = self.model
        cfg_scale = model.family.classifier_free_scale(*request.guidance)
        guidance = cfg_scale is not None
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]

        # 1. Encode the prompts; classifier-free guidance batches negatives first.
        def encode(component: str, inputs: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
            return runners[component](inputs)

        batch = PromptBatch(
            prompts=request.prompts,
            negative_prompts=request.negative_prompts,
            images_per_prompt=request.images_per_prompt,
            guidance=guidance,
            height=request.height,
            width=request.width,
            syntax=request.prompt_syntax,
        )
        with timer.stage("text_encoder"):
            conditioning = self._finite(
                model.family.text_encoders,
                runners,
                [],
                lambda: model.family.encode_prompt(encode, model.tokenizers, batch, model.config),
                lambda encoded: encoded.values(),
            )
        conditioning |= model.family.denoiser_inputs(model.config, request.guidance_scale)

        # 2. Prepare timesteps on a fresh scheduler; image-to-image and inpainting start part-way.
        factor = model.config.vae_scale_factor
        shape = (request.num_images, model.config.latent_channels, request.height // factor, request.width // factor)
        scheduler = make_scheduler(request.scheduler, model.scheduler_config)
        options = model.family.timestep_options(model.config, scheduler, request.steps, shape)
        scheduler.set_timesteps(request.steps, device=self.device, **options)
        timesteps = scheduler.timesteps
        if prepared is not None and prepared.image is not None:
            timesteps = self._truncate_timesteps(scheduler, model.family.first_step(request.steps, request.strength))

        # 3. Prepare latents: one generator per image, drawn on the CPU so a seed gives the
        #    same image on every device.
        inpaint: Inpainting | None = None
        if prepared is None or prepared.image is None:
            latents = randn_tensor(shape, generator=generators, device=self.device, dtype=torch.float32)
            latents = latents * initial_sigma(scheduler)
        elif prepared.mask is None:
            image = prepared.image
            with timer.stage("vae_encode"):
                moments = self._finite(
                    ("vae_encoder",),
                    runners,
                    [],
                    lambda: runners["vae_encoder"]({"images": image})["latent_moments"].float(),
                    lambda found: [found],
                )
            latents = self._noised_image_latents(moments, generators, scheduler, timesteps[:1])
        else:
            with timer.stage("vae_encode"):
                inpaint = self._finite(
                    ("vae_encoder",),
                    runners,
                    generators,
                    lambda: self._inpainting(prepared, shape, generators, runners, scheduler, timesteps, request),
                    lambda found: (found.latents, found.channels, found.image_latents),
                )
            latents = inpaint.latents

        # 4. Denoising loop, from a copy of the scheduler as it is now, so a rerun starts where this run does.
        controls = prepared.controls if prepared is not None else ()
        start, noisy = copy.deepcopy(scheduler), latents
        denoising = (model.family.denoiser, CONTROLLED_UNET, *(control.component for control in controls))
        with timer.stage("denoise"):
            latents = self._finite(
                denoising,
                runners,
                generators,
                lambda: self._denoise(
                    noisy,
                    copy.deepcopy(start),
                    timesteps,
                    conditioning,
                    cfg_scale,
                    generators,
                    controls,
                    inpaint,
                    runners,
                    timer,
                    on_step,
                ),
                lambda found: [found],
            )

        # 5. Decode.
        unscaled = self._unscale_latents(latents)
        with timer.stage("vae_decode"):
            images = self._finite(
                ("vae_decoder",),
                runners,
                [],
                lambda: runners["vae_decoder"]({"latent": unscaled})["images"],
                lambda found: [found],
            )

        # 6. Postprocess to PIL; an inpainted crop is pasted back into the original image.
        with timer.stage("postprocess"):
            pictures = self.image_processor.postprocess(images.float(), output_type="pil")
            if prepared is not None and prepared.crop is not None and prepared.inputs is not None:
                original = prepared.inputs
                pictures = [
                    self.image_processor.apply_overlay(original.mask, original.image, picture, prepared.crop)
                    for picture in pictures
                ]
            return pictures

    @staticmethod
    def _finite(
        components: Collection[str],
        runners: Mapping[str, ComponentCall],
        generators: Sequence[torch.Generator],
        run: Callable[[], Result],
        outputs: Callable[[Result], Iterable[torch.Tensor | None]],
    ) -> Result:
        """``run()``'s result once its ``outputs`` are finite. While they are not, ``components`` move to
        runners that compute in fp32 and the stage runs again with ``generators`` as they were before it;
        NonFiniteOutput when no runner is left to move to."""
        states = [generator.get_state() for generator in generators]
        while True:
            result = run()
            if all_finite(outputs(result)):
                return result
            if not isinstance(runners, FP32Reruns):
                raise NonFiniteOutput(
                    f"the model produced NaN/Inf values ({', '.join(components)}); try another seed, LoRA or scale"
                )
            runners.rerun_in_fp32(components)
            for generator, state in zip(generators, states, strict=True):
                generator.set_state(state)

    def _denoise(
        self,
        latents: torch.Tensor,
        scheduler: SchedulerMixin,
        timesteps: torch.Tensor,
        conditioning: Mapping[str, torch.Tensor],
        cfg_scale: float | None,
        generators: list[torch.Generator],
        controls: Sequence[Control],
        inpaint: Inpainting | None,
        runners: Mapping[str, ComponentCall],
        timer: StageTimer,
        on_step: StepCallback | None,
    ) -> torch.Tensor:
        """The latents after every step of ``timesteps``, with classifier-free guidance where
        ``cfg_scale`` is given."""
        guidance = cfg_scale is not None
        denoiser_name = self.model.family.denoiser
        step_kwargs = {"generator": generators} if _accepts(scheduler.step, "generator") else {}
        for index, timestep in enumerate(timesteps):
            with timer.step():
                model_input = torch.cat([latents] * 2) if guidance else latents
                if hasattr(scheduler, "scale_model_input"):  # flow matching feeds latents as they are
                    model_input = scheduler.scale_model_input(model_input, timestep)
                inputs = {"sample": model_input, "timestep": timestep.reshape(1), **conditioning}
                residuals = self._residuals(controls, inputs, index, len(timesteps), runners, timer)
                if inpaint is not None and inpaint.channels is not None:
                    channels = torch.cat([inpaint.channels] * 2) if guidance else inpaint.channels
                    inputs["sample"] = torch.cat([model_input, channels], dim=1)
                denoiser = runners[denoiser_name] if residuals is None else runners[CONTROLLED_UNET]
                noise_pred = denoiser({**inputs, **(residuals or {})})["noise_pred"].to(latents.dtype)
                if cfg_scale is not None:
                    noise_uncond, noise_text = noise_pred.chunk(2)
                    noise_pred = noise_uncond + cfg_scale * (noise_text - noise_uncond)
                latents = scheduler.step(noise_pred, timestep, latents, **step_kwargs, return_dict=False)[0]
                if inpaint is not None and inpaint.channels is None:
                    latents = inpaint.blend(latents, scheduler, timesteps, index)
            if on_step is not None:
                on_step(index + 1, len(timesteps))
        return latents

    @staticmethod
    def _residuals(
        controls: Sequence[Control],
        inputs: Mapping[str, torch.Tensor],
        index: int,
        steps: int,
        runners: Mapping[str, ComponentCall],
        timer: StageTimer,
    ) -> dict[str, torch.Tensor] | None:
        """The ControlNets' residuals for one step, each scaled and then summed in request order, as
        diffusers' ``MultiControlNetModel``; None when none acts at this step. A ControlNet whose
        scale is 0 here is not run: its residuals would add exact zeros."""
        total: dict[str, torch.Tensor] | None = None
        for control in controls:
            scale = control.scale_at(index, steps)
            if scale == 0.0:
                continue
            with timer.stage(control.component):
                outputs = runners[control.component]({**inputs, "controlnet_cond": control.image})
            scaled = {name: value * scale for name, value in outputs.items()}
            total = scaled if total is None else {name: total[name] + scaled[name] for name in total}
        return total

    def prepare_images(self, inputs: ImageInputs, request: ResolvedRequest) -> PreparedImages:
        """The input image resized and normalized to [-1, 1] (and the mask binarized), as diffusers'
        img2img and inpaint pipelines prepare them, and the control images as its ControlNet pipelines
        do; with ``padding_mask_crop``, all are cut to the mask's region first."""
        height, width = request.height, request.width
        crop, resize_mode = None, "default"
        if inputs.mask is not None and request.padding_mask_crop is not None:
            crop = self.mask_processor.get_crop_region(inputs.mask, width, height, pad=request.padding_mask_crop)
            resize_mode = "fill"
        controls = tuple(self._control(control, request, crop, resize_mode) for control in inputs.controls)
        if inputs.image is None:
            return PreparedImages(None, controls=controls)
        if inputs.mask is None:
            return PreparedImages(self.preprocess(inputs.image, height, width), controls=controls)
        image = self.image_processor.preprocess(
            inputs.image, height=height, width=width, crops_coords=crop, resize_mode=resize_mode
        )
        mask = self.mask_processor.preprocess(
            inputs.mask, height=height, width=width, crops_coords=crop, resize_mode=resize_mode
        )
        return PreparedImages(image.to(self.device), mask.to(self.device), inputs, crop, controls)

    def _control(
        self,
        control: ControlImage,
        request: ResolvedRequest,
        crop: tuple[int, int, int, int] | None,
        resize_mode: str,
    ) -> Control:
        """A control image resized (and cropped with the mask) as diffusers' ControlNet pipelines
        prepare it, repeated per image and doubled for classifier-free guidance."""
        image = self.control_processor.preprocess(
            control.image, height=request.height, width=request.width, crops_coords=crop, resize_mode=resize_mode
        ).to(device=self.device, dtype=torch.float32)
        image = image.repeat_interleave(request.num_images, dim=0)
        if self.model.family.classifier_free_scale(*request.guidance) is not None:
            image = torch.cat([image] * 2)
        return Control(control.component, image, control.scale, control.start, control.end)

    def _inpainting(
        self,
        prepared: PreparedImages,
        shape: tuple[int, ...],
        generators: list[torch.Generator],
        runners: Mapping[str, ComponentCall],
        scheduler: SchedulerMixin,
        timesteps: torch.Tensor,
        request: ResolvedRequest,
    ) -> Inpainting:
        """Starting latents, and the mask and masked-image latents, with diffusers' random draws.

        diffusers encodes the one input image with the first generator only, then draws each image's
        noise, then encodes the masked image with the first generator again. A 4-channel UNet never
        uses those masked-image latents: the draw is made all the same, without the encode, so the
        first generator's later draws (ancestral schedulers) stay diffusers'.
        """
        assert prepared.mask is not None and prepared.image is not None
        images, latent_size = shape[0], shape[2:]
        blends = not self.model.config.inpainting_unet
        full_strength = request.strength == 1.0
        image_latents = None
        if blends or not full_strength:
            image_latents = self._encoded(prepared.image, generators[0], runners).repeat(images, 1, 1, 1)
        noise = randn_tensor(shape, generator=generators, device=self.device, dtype=torch.float32)
        if full_strength:
            latents = noise * initial_sigma(scheduler)
        else:
            assert image_latents is not None
            latents = noised(scheduler, image_latents, noise, timesteps[:1].repeat(images))
        mask = torch.nn.functional.interpolate(prepared.mask, size=latent_size).repeat(images, 1, 1, 1)
        masked_image = prepared.image * (prepared.mask < 0.5)
        if blends:
            randn_tensor((1, *shape[1:]), generator=generators[0], device=self.device)  # the masked image's draw
            return Inpainting(latents, None, mask, image_latents, noise)
        masked_latents = self._encoded(masked_image, generators[0], runners).repeat(images, 1, 1, 1)
        return Inpainting(latents, torch.cat([mask, masked_latents], dim=1), mask, image_latents, noise)

    def _encoded(
        self, image: torch.Tensor, generator: torch.Generator, runners: Mapping[str, ComponentCall]
    ) -> torch.Tensor:
        """One image's latent, sampled with ``generator`` and scaled, as diffusers' ``_encode_vae_image``."""
        moments = runners["vae_encoder"]({"images": image})["latent_moments"].float()
        return self._sampled_latents(moments, [generator])

    def _sampled_latents(self, moments: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """A latent sampled from the VAE's moments with each generator in turn, scaled for the UNet."""
        # diffusers' model package costs seconds to import (and pulls in peft): only image inputs need it
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        distribution = DiagonalGaussianDistribution(moments)
        return self._scale_latents(torch.cat([distribution.sample(generator=generator) for generator in generators]))

    def preprocess(self, image: Image.Image, height: int, width: int) -> torch.Tensor:
        """The input image resized and normalized to [-1, 1], as diffusers' img2img pipelines do."""
        return self.image_processor.preprocess(image, height=height, width=width).to(self.device)

    @staticmethod
    def _truncate_timesteps(scheduler: SchedulerMixin, start: int) -> torch.Tensor:
        """The schedule from step ``start`` on (diffusers' ``get_timesteps``)."""
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start * scheduler.order)
        return scheduler.timesteps[start * scheduler.order :]

    def _noised_image_latents(
        self,
        moments: torch.Tensor,
        generators: list[torch.Generator],
        scheduler: SchedulerMixin,
        first_timestep: torch.Tensor,
    ) -> torch.Tensor:
        """Each image's latent sampled with its own generator, then noised to the first timestep.

        The random draws come in diffusers' order: one latent sample per image (Flux's img2img: one,
        with the first generator, for all), then the noise for all, so the same seed gives diffusers' image.
        """
        if self.model.family.samples_image_once:
            latents = self._sampled_latents(moments, generators[:1]).repeat(len(generators), 1, 1, 1)
        else:
            latents = self._sampled_latents(moments, generators)
        noise = randn_tensor(latents.shape, generator=generators, device=self.device, dtype=latents.dtype)
        return noised(scheduler, latents, noise, first_timestep.repeat(latents.shape[0]))

    def _latent_statistics(self, channels: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        vae = self.model.config.configs["vae"]
        if vae.get("latents_mean") is None or vae.get("latents_std") is None:
            return None
        mean = torch.tensor(vae["latents_mean"], device=self.device).view(1, channels, 1, 1)
        std = torch.tensor(vae["latents_std"], device=self.device).view(1, channels, 1, 1)
        return mean, std

    def _scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Image latents into the denoiser's latent space (the inverse of ``_unscale_latents``)."""
        scaling = self.model.config.configs["vae"]["scaling_factor"]
        shift = self.model.config.configs["vae"].get("shift_factor")
        statistics = self._latent_statistics(latents.shape[1])
        if statistics is None:
            return latents * scaling if shift is None else (latents - shift) * scaling
        mean, std = statistics
        return (latents - mean) * scaling / std

    def _unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the VAE's latent scaling, and its shift (SD3's and Flux's ``shift_factor``, or per-channel
        latent statistics)."""
        scaling = self.model.config.configs["vae"]["scaling_factor"]
        shift = self.model.config.configs["vae"].get("shift_factor")
        statistics = self._latent_statistics(latents.shape[1])
        if statistics is None:
            return latents / scaling if shift is None else latents / scaling + shift
        mean, std = statistics
        return latents * std / scaling + mean


def initial_sigma(scheduler: SchedulerMixin) -> float:
    """How much the starting noise is scaled: flow-matching schedulers start from plain noise."""
    return getattr(scheduler, "init_noise_sigma", 1.0)


def noised(
    scheduler: SchedulerMixin, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """Latents noised to ``timesteps``: ``add_noise``, or for flow matching ``scale_noise`` (a blend
    towards the noise, as SD3's and Flux's img2img pipelines do)."""
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(latents, timesteps, noise)
    return scheduler.add_noise(latents, noise, timesteps)


@dataclass(frozen=True)
class Inpainting:
    """What an inpainting loop carries besides its latents."""

    latents: torch.Tensor
    channels: torch.Tensor | None
    """Mask and masked-image latents, the extra input channels of a 9-channel UNet; None for 4 channels."""
    mask: torch.Tensor
    image_latents: torch.Tensor | None
    noise: torch.Tensor

    def blend(
        self, latents: torch.Tensor, scheduler: SchedulerMixin, timesteps: torch.Tensor, index: int
    ) -> torch.Tensor:
        """A 4-channel UNet's step: the kept region goes back to the image, noised to the next timestep."""
        assert self.image_latents is not None
        known = self.image_latents
        if index < len(timesteps) - 1:
            known = scheduler.add_noise(known, self.noise, timesteps[index + 1 : index + 2])
        return (1 - self.mask) * known + self.mask * latents
