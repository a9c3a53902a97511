"""The denoising loop, in diffusers' order and with diffusers' step names.

Every component call goes through a Runner, so the same loop runs on torch, ONNX
Runtime or TensorRT, per component. The loop keeps latents and scheduler math in
fp32 whatever precision the UNet runs at. Text-to-image, image-to-image and inpainting
(diffusers' ``StableDiffusionInpaintPipeline``: a 9-channel UNet takes the mask and the
masked image's latents as extra channels, a 4-channel one has the kept region blended
back after every step; Flux Fill takes its mask and Flux Control its control image as extra
channels too) share it, each steered by ControlNets when a request names them (diffusers'
ControlNet pipelines: their residuals feed a controlled UNet at the steps where they act).

Each stage's outputs are checked once for NaN and Inf (text embeddings, the VAE encoder's, the final
latents, the decoded images: one reduction per stage, never per step). Where they are not finite,
the components that made them move to an fp32 runner (see ``engine.backends.chain``) and the stage
runs again from the same random state, so the image is the one a sound run gives; where no runner
is left, the request fails with ``NonFiniteOutput`` rather than succeeding with a black image.

The images a request brings are prepared in ``engine.pipeline.preparation``; the VAE's latent
scaling and noising are in ``engine.pipeline.latents``; the step loop itself is in
``engine.pipeline.denoise``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Protocol, TypeVar, runtime_checkable

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from engine.backends.base import ComponentCall
from engine.common.errors import NonFiniteOutput
from engine.common.metrics import StageTimer
from engine.models.controlnet import CONTROLLED_UNET
from engine.models.family import PromptBatch
from engine.models.ip_adapter import ip_denoisers
from engine.models.model import Model
from engine.pipeline.denoise import Denoising, StepCallback, denoise
from engine.pipeline.image_prompts import ImagePrompt, image_prompt_inputs
from engine.pipeline.latents import LatentScaling, initial_sigma
from engine.pipeline.preparation import ImageInputs, ImagePreparation, Inpainting, PreparedImages
from engine.pipeline.schedules import Schedules
from engine.request.resolved import ResolvedRequest
from engine.schedulers import step_options

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


class DiffusionPipeline:
    """Text-to-image for any model family, with every component behind a Runner."""

    def __init__(self, model: Model, device: torch.device):
        self.model = model
        self.device = device
        self.images = ImagePreparation(model, device)
        self.latents = LatentScaling(model, device)
        self.schedules = Schedules(model, device)

    def __call__(
        self,
        request: ResolvedRequest,
        seeds: Sequence[int],
        runners: Mapping[str, ComponentCall],
        timer: StageTimer,
        on_step: StepCallback | None = None,
        prepared: PreparedImages | None = None,
        image_prompts: Sequence[ImagePrompt] = (),
    ) -> list[Image.Image]:
        """One image per seed, in prompt order (each prompt's images together).

        With ``prepared`` (from ``prepare_images``) holding an image, it is image-to-image: the image
        is encoded, noised to the timestep ``request.strength`` starts from, and denoised from there;
        or, with a mask, inpainting. Its ControlNets add their residuals to the UNet's, each scaled,
        at the steps between its start and end. With ``image_prompts`` (an IP-Adapter's), the IP
        denoiser runs every step with their tokens.
        """
        model = self.model
        # An LCM-distilled UNet takes the guidance scale as an embedding instead, as diffusers' pipelines run it.
        distilled = model.config.guidance_embedding_dim is not None
        cfg_scale = None if distilled else model.family.classifier_free_scale(*request.guidance)
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
        denoiser, controlled = model.family.denoiser, CONTROLLED_UNET
        for slot, prompt in enumerate(image_prompts):  # 1b. As diffusers' prepare_ip_adapter_image_embeds
            with timer.stage("image_encoder"):
                conditioning |= self._finite(
                    (prompt.encoder, prompt.projection),
                    runners,
                    [],
                    functools.partial(
                        image_prompt_inputs, prompt, slot, runners, request.num_images, guidance, self.device
                    ),
                    lambda found: found.values(),
                )
        if image_prompts:  # the IP denoiser with a slot per adapter
            denoiser, controlled = ip_denoisers(len(image_prompts))

        # 2. Prepare timesteps on the request's own scheduler; image-to-image and inpainting start part-way.
        factor = model.config.vae_scale_factor
        shape = (request.num_images, model.config.latent_channels, request.height // factor, request.width // factor)
        scheduler = self.schedules.scheduler(request.scheduler, request.steps, shape, seeds)
        timesteps = scheduler.timesteps
        if prepared is not None and prepared.image is not None:
            timesteps = self._truncate_timesteps(scheduler, model.family.first_step(request.steps, request.strength))

        # 3. Prepare latents: one generator per image, drawn on the CPU so a seed gives the
        #    same image on every device.
        inpaint: Inpainting | None = None
        channels: torch.Tensor | None = None
        if prepared is not None and prepared.reference is not None:  # Flux Kontext's: no random draw
            reference = prepared.reference
            found = self._encode(timer, runners, [], lambda: self.images.reference_latents(reference, runners))
            conditioning["image_latents"] = found.repeat(shape[0] * (2 if guidance else 1), 1, 1, 1)
        if prepared is not None and prepared.control is not None:  # Flux Control's: drawn before the noise
            control = prepared.control
            channels = self._encode(
                timer, runners, generators, lambda: self.images.control_latents(control, generators, runners)
            )
        if prepared is None or prepared.image is None:
            latents = randn_tensor(shape, generator=generators, device=self.device, dtype=torch.float32)
            latents = latents * initial_sigma(scheduler)
        elif prepared.mask is None:
            image = prepared.image
            moments = self._encode(
                timer, runners, [], lambda: runners["vae_encoder"]({"images": image})["latent_moments"].float()
            )
            latents = self.images.noised_image_latents(moments, generators, scheduler, timesteps[:1])
        else:
            with timer.stage("vae_encode"):
                inpaint = self._finite(
                    ("vae_encoder",),
                    runners,
                    generators,
                    lambda: self.images.inpainting(prepared, shape, generators, runners, scheduler, timesteps, request),
                    lambda found: (found.latents, found.channels, found.image_latents),
                )
            latents = inpaint.latents
            channels = inpaint.channels

        # 4. Denoising loop, each run on its own copy of the scheduler as it is now, so a rerun starts where
        #    the first run did.
        run = Denoising(
            denoiser=denoiser,
            scheduler=scheduler,
            timesteps=timesteps,
            conditioning=conditioning,
            cfg_scale=cfg_scale,
            options=step_options(request.scheduler, model.scheduler_config["_class_name"], request.eta),
            generators=generators,
            controls=prepared.controls if prepared is not None else (),
            controlled=controlled,
            inpaint=inpaint,
            channels=channels,
        )
        noisy = latents
        stepped = (run.denoiser, run.controlled, *(control.component for control in run.controls))
        with timer.stage("denoise"):
            latents = self._finite(
                stepped,
                runners,
                generators,
                lambda: denoise(noisy, run, runners, timer, on_step),
                lambda found: [found],
            )

        # 5. Decode.
        unscaled = self.latents.unscale(latents)
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
            pictures = self.images.image_processor.postprocess(images.float(), output_type="pil")
            if prepared is not None and prepared.crop is not None and prepared.inputs is not None:
                original = prepared.inputs
                pictures = [
                    self.images.image_processor.apply_overlay(original.mask, original.image, picture, prepared.crop)
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

    def _encode(
        self,
        timer: StageTimer,
        runners: Mapping[str, ComponentCall],
        generators: Sequence[torch.Generator],
        run: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """The VAE encoder's stage: ``run()``'s latents, once finite (see ``_finite``)."""
        with timer.stage("vae_encode"):
            return self._finite(("vae_encoder",), runners, generators, run, lambda found: [found])

    def prepare_images(self, inputs: ImageInputs, request: ResolvedRequest) -> PreparedImages:
        """The request's images as this loop takes them (see ``ImagePreparation.prepare``)."""
        return self.images.prepare(inputs, request)

    @staticmethod
    def _truncate_timesteps(scheduler: SchedulerMixin, start: int) -> torch.Tensor:
        """The schedule from step ``start`` on (diffusers' ``get_timesteps``)."""
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start * scheduler.order)
        return scheduler.timesteps[start * scheduler.order :]
