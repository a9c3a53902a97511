"""The denoising loop, in diffusers' order and with diffusers' step names.

Every component call goes through a Runner, so the same loop runs on torch, ONNX
Runtime or TensorRT, per component. The loop keeps latents and scheduler math in
fp32 whatever precision the UNet runs at.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from engine.backends.base import ComponentCall
from engine.metrics import StageTimer
from engine.models import Model
from engine.models.family import PromptBatch
from engine.request import ResolvedRequest
from engine.schedulers import make_scheduler

StepCallback = Callable[[int, int], None]
"""Called after each denoising step with (steps done, steps in all); may raise to stop."""


def _accepts(function: Callable, name: str) -> bool:
    return name in inspect.signature(function).parameters


class DiffusionPipeline:
    """Text-to-image for any model family, with every component behind a Runner."""

    def __init__(self, model: Model, device: torch.device):
        self.model = model
        self.device = device
        self.image_processor = VaeImageProcessor(vae_scale_factor=model.config.vae_scale_factor)

    def __call__(
        self,
        request: ResolvedRequest,
        seeds: Sequence[int],
        runners: Mapping[str, ComponentCall],
        timer: StageTimer,
        on_step: StepCallback | None = None,
        init_image: torch.Tensor | None = None,
    ) -> list[Image.Image]:
        """One image per seed, in prompt order (each prompt's images together).

        With ``init_image`` (from ``preprocess``) it is image-to-image: the image is encoded,
        noised to the timestep ``request.strength`` starts from, and denoised from there.
        """
        model = self.model
        guidance = request.guidance_scale > 1.0
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
            conditioning = model.family.encode_prompt(encode, model.tokenizers, batch, model.config)

        # 2. Prepare timesteps on a fresh scheduler; image-to-image starts part-way.
        scheduler = make_scheduler(request.scheduler, model.scheduler_config)
        scheduler.set_timesteps(request.steps, device=self.device)
        timesteps = scheduler.timesteps
        if init_image is not None:
            timesteps = self._truncate_timesteps(scheduler, request.steps, request.strength)

        # 3. Prepare latents: one generator per image, drawn on the CPU so a seed gives the
        #    same image on every device.
        if init_image is None:
            factor = model.config.vae_scale_factor
            shape = (
                request.num_images,
                model.config.configs["unet"]["in_channels"],
                request.height // factor,
                request.width // factor,
            )
            latents = randn_tensor(shape, generator=generators, device=self.device, dtype=torch.float32)
            latents = latents * scheduler.init_noise_sigma
        else:
            with timer.stage("vae_encode"):
                moments = runners["vae_encoder"]({"images": init_image})["latent_moments"].float()
            latents = self._noised_image_latents(moments, generators, scheduler, timesteps[:1])

        # 4. Denoising loop.
        step_kwargs = {"generator": generators} if _accepts(scheduler.step, "generator") else {}
        unet = runners["unet"]
        with timer.stage("denoise"):
            for index, timestep in enumerate(timesteps):
                with timer.step():
                    model_input = torch.cat([latents] * 2) if guidance else latents
                    model_input = scheduler.scale_model_input(model_input, timestep)
                    noise_pred = unet({"sample": model_input, "timestep": timestep.reshape(1), **conditioning})[
                        "noise_pred"
                    ].to(latents.dtype)
                    if guidance:
                        noise_uncond, noise_text = noise_pred.chunk(2)
                        noise_pred = noise_uncond + request.guidance_scale * (noise_text - noise_uncond)
                    latents = scheduler.step(noise_pred, timestep, latents, **step_kwargs, return_dict=False)[0]
                if on_step is not None:
                    on_step(index + 1, len(timesteps))

        # 5. Decode.
        with timer.stage("vae_decode"):
            images = runners["vae_decoder"]({"latent": self._unscale_latents(latents)})["images"]

        # 6. Postprocess to PIL.
        with timer.stage("postprocess"):
            return self.image_processor.postprocess(images.float(), output_type="pil")

    def preprocess(self, image: Image.Image, height: int, width: int) -> torch.Tensor:
        """The input image resized and normalized to [-1, 1], as diffusers' img2img pipelines do."""
        return self.image_processor.preprocess(image, height=height, width=width).to(self.device)

    @staticmethod
    def _truncate_timesteps(scheduler: SchedulerMixin, steps: int, strength: float) -> torch.Tensor:
        """The last ``strength`` of the schedule (diffusers' ``get_timesteps``)."""
        start = steps - min(int(steps * strength), steps)
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

        The random draws come in diffusers' order: one latent sample per image, then the
        noise for all, so the same seed gives diffusers' image.
        """
        # diffusers' model package costs seconds to import (and pulls in peft): only image-to-image needs it
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        distribution = DiagonalGaussianDistribution(moments)
        samples = torch.cat([distribution.sample(generator=generator) for generator in generators])
        latents = self._scale_latents(samples)
        noise = randn_tensor(latents.shape, generator=generators, device=self.device, dtype=latents.dtype)
        return scheduler.add_noise(latents, noise, first_timestep.repeat(latents.shape[0]))

    def _latent_statistics(self, channels: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        vae = self.model.config.configs["vae"]
        if vae.get("latents_mean") is None or vae.get("latents_std") is None:
            return None
        mean = torch.tensor(vae["latents_mean"], device=self.device).view(1, channels, 1, 1)
        std = torch.tensor(vae["latents_std"], device=self.device).view(1, channels, 1, 1)
        return mean, std

    def _scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Image latents into the UNet's latent space (the inverse of ``_unscale_latents``)."""
        scaling = self.model.config.configs["vae"]["scaling_factor"]
        statistics = self._latent_statistics(latents.shape[1])
        if statistics is None:
            return latents * scaling
        mean, std = statistics
        return (latents - mean) * scaling / std

    def _unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the VAE's latent scaling (and shift, for VAEs that declare latent statistics)."""
        scaling = self.model.config.configs["vae"]["scaling_factor"]
        statistics = self._latent_statistics(latents.shape[1])
        if statistics is None:
            return latents / scaling
        mean, std = statistics
        return latents * std / scaling + mean
