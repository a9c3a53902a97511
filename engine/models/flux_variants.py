"""Flux.1's editing and control checkpoints, each a transformer whose input width says what it takes.

- **Fill** (diffusers' ``FluxFillPipeline``): ``image`` and ``mask``; the masked image's latents and
  the mask, each image pixel of an 8x8 latent cell a channel, join the latents as extra channels.
- **Control** (``FluxControlPipeline``, Canny and Depth): the control image's latents join the
  latents as extra channels.

A folder's transformer ``in_channels`` tells them apart (a variant's pipeline class in model_index.json
must agree): 4 x 16 for Flux.1 itself, 4 x (16 + 16) for Control, 4 x (16 + 16 + 64) for Fill.
"""

from __future__ import annotations

import torch

from engine.common.errors import ModelError
from engine.models.family import ModelConfig
from engine.models.flux import Flux


class FluxFill(Flux):
    name = "flux-fill"
    pipeline_classes = ("FluxFillPipeline",)
    default_guidance_scale = 30.0
    """FluxFillPipeline's default."""
    inpainting = True
    mask_crop = False
    image_to_image = False
    negative_prompts = False
    true_cfg = False
    inpaint_encodes_image = True

    def inpainting_model(self, config: ModelConfig) -> bool:
        return True

    def inpaint_channels(self, mask: torch.Tensor, masked_latents: torch.Tensor, vae_scale_factor: int) -> torch.Tensor:
        """The masked image's latents, then the mask with each pixel of a latent cell as a channel (row
        by row), as ``FluxFillPipeline.prepare_mask_latents`` lays them out before packing."""
        batch, _, height, width = masked_latents.shape
        factor = vae_scale_factor
        cells = mask[:, 0].reshape(batch, height, factor, width, factor).permute(0, 2, 4, 1, 3)
        return torch.cat([masked_latents, cells.reshape(batch, factor * factor, height, width)], dim=1)


class FluxControl(Flux):
    name = "flux-control"
    pipeline_classes = ("FluxControlPipeline",)
    image_to_image = False
    negative_prompts = False
    true_cfg = False
    control_image = True


VARIANTS: tuple[Flux, ...] = (Flux(), FluxFill(), FluxControl())


def flux_variant(config: ModelConfig) -> Flux:
    """The variant whose layout the transformer's ``in_channels`` has. A variant's own pipeline class
    (``FluxFillPipeline``...) must agree; Flux.1's (``FluxPipeline``) names the family only."""
    latent, factor = config.latent_channels, config.vae_scale_factor
    extra = int(config.configs["transformer"]["in_channels"]) // 4 - latent
    by_extra = {0: VARIANTS[0], latent: VARIANTS[2], latent + factor * factor: VARIANTS[1]}
    if extra not in by_extra:
        raise ModelError(
            f"{config.folder}: a Flux transformer with in_channels {config.configs['transformer']['in_channels']} "
            f"is none of Flux.1 ({4 * latent}), Control ({8 * latent}) or Fill ({4 * (2 * latent + factor * factor)})"
        )
    variant = by_extra[extra]
    named = next((found for found in VARIANTS[1:] if config.pipeline_class in found.pipeline_classes), None)
    if named not in (None, variant):
        raise ModelError(
            f"{config.folder}: model_index.json names {config.pipeline_class}, but its transformer's in_channels "
            f"({config.configs['transformer']['in_channels']}) are those of {variant.name}"
        )
    return variant
