"""A request's images as the loop takes them: image-to-image, inpainting and ControlNet inputs.

The input image, the mask and the control images are resized, cropped and normalized as diffusers'
img2img, inpaint and ControlNet pipelines prepare them, and encoded to starting latents with
diffusers' random draws in diffusers' order, so the same seed gives diffusers' image.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from engine.backends.base import ComponentCall
from engine.models.model import Model
from engine.pipeline.latents import LatentScaling, initial_sigma, noised
from engine.request.resolved import ResolvedRequest


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
    control: Image.Image | None = None
    """A Flux Control model's control image (its edge or depth map)."""


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
    control: torch.Tensor | None = None
    """A Flux Control model's control image as the VAE takes it."""
    reference: torch.Tensor | None = None
    """A Flux Kontext model's reference image as the VAE takes it, at its preferred resolution."""


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


class ImagePreparation:
    """One model's image inputs on one device: its VAE image processors and latent scaling."""

    def __init__(self, model: Model, device: torch.device):
        self.model = model
        self.device = device
        factor = model.config.vae_scale_factor
        self.image_processor = VaeImageProcessor(vae_scale_factor=factor)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )
        self.control_processor = VaeImageProcessor(vae_scale_factor=factor, do_convert_rgb=True, do_normalize=False)
        self.latents = LatentScaling(model, device)

    def prepare(self, inputs: ImageInputs, request: ResolvedRequest) -> PreparedImages:
        """The input image resized and normalized to [-1, 1] (and the mask binarized), as diffusers'
        img2img and inpaint pipelines prepare them, and the control images as its ControlNet pipelines
        do; with ``padding_mask_crop``, all are cut to the mask's region first."""
        height, width = request.height, request.width
        crop, resize_mode = None, "default"
        if inputs.mask is not None and request.padding_mask_crop is not None:
            crop = self.mask_processor.get_crop_region(inputs.mask, width, height, pad=request.padding_mask_crop)
            resize_mode = "fill"
        controls = tuple(self._control(control, request, crop, resize_mode) for control in inputs.controls)
        if inputs.control is not None:  # Flux Control's pipeline normalizes it as an input image
            return PreparedImages(None, control=self.preprocess(inputs.control, height, width))
        if inputs.image is not None and self.model.family.reference_image:
            reference_width, reference_height = self.model.family.size_for_image(*inputs.image.size)
            return PreparedImages(None, reference=self.preprocess(inputs.image, reference_height, reference_width))
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

    def inpainting(
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

        diffusers encodes the one input image with the first generator only (at full strength only where
        the family's pipeline does: Flux Fill's), then draws each image's noise, then encodes the masked
        image with the first generator again. A 4-channel UNet never uses those masked-image latents:
        the draw is made all the same, without the encode, so the first generator's later draws
        (ancestral schedulers) stay diffusers'. The family lays out the extra channels (``inpaint_channels``).
        """
        assert prepared.mask is not None and prepared.image is not None
        images, latent_size = shape[0], shape[2:]
        family = self.model.family
        blends = not family.inpainting_model(self.model.config)
        full_strength = request.strength == 1.0
        image_latents = None
        if blends or not full_strength or family.inpaint_encodes_image:
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
        channels = family.inpaint_channels(
            prepared.mask.repeat(images, 1, 1, 1), masked_latents, self.model.config.vae_scale_factor
        )
        return Inpainting(latents, channels, mask, image_latents, noise)

    def control_latents(
        self, image: torch.Tensor, generators: list[torch.Generator], runners: Mapping[str, ComponentCall]
    ) -> torch.Tensor:
        """A Flux Control model's extra channels: the control image's latent, sampled with each image's
        generator before its noise is drawn and scaled, as ``FluxControlPipeline`` does."""
        moments = runners["vae_encoder"]({"images": image})["latent_moments"].float()
        return self._sampled_latents(moments, generators)

    def reference_latents(self, image: torch.Tensor, runners: Mapping[str, ComponentCall]) -> torch.Tensor:
        """A Flux Kontext reference's latent: the mean of the VAE's distribution (no draw), scaled, as
        ``FluxKontextPipeline`` encodes it."""
        moments = runners["vae_encoder"]({"images": image})["latent_moments"].float()
        return self.latents.scale(moments[:, : moments.shape[1] // 2])

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
        return self.latents.scale(torch.cat([distribution.sample(generator=generator) for generator in generators]))

    def preprocess(self, image: Image.Image, height: int, width: int) -> torch.Tensor:
        """The input image resized and normalized to [-1, 1], as diffusers' img2img pipelines do."""
        return self.image_processor.preprocess(image, height=height, width=width).to(self.device)

    def noised_image_latents(
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
