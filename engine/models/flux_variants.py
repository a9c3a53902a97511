"""Flux.1's editing and control checkpoints, each a transformer whose input width says what it takes.

- **Fill** (diffusers' ``FluxFillPipeline``): ``image`` and ``mask``; the masked image's latents and
  the mask, each image pixel of an 8x8 latent cell a channel, join the latents as extra channels.
- **Control** (``FluxControlPipeline``, Canny and Depth): the control image's latents join the
  latents as extra channels.
- **Kontext** (``FluxKontextPipeline``): ``image`` is the reference to edit, resized to the preferred
  resolution nearest its aspect ratio; its latents' tokens follow the image's in the transformer's
  sequence (a second, dynamic axis of the spec), with their own position ids.

A folder's transformer ``in_channels`` tells them apart (a variant's pipeline class in model_index.json
must agree): 4 x 16 for Flux.1 itself, 4 x (16 + 16) for Control, 4 x (16 + 16 + 64) for Fill. Kontext's
transformer is Flux.1's: only its pipeline class names it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from engine.common.errors import ModelError
from engine.models.config import ModelConfig
from engine.models.family import load_pretrained
from engine.models.flux import Flux
from engine.models.modules import FluxTransformerModule
from engine.spec import ComponentSpec, TensorSpec


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


PREFERRED_KONTEXT_RESOLUTIONS = (
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
)
"""(width, height) pairs of about 1024² pixels that Kontext was trained at, as diffusers lists them."""
KONTEXT_OPTIMUM = 1024
"""The side of the preferred resolution of square images, which engines are tuned for."""
KONTEXT_MULTIPLE = 16
"""The VAE's factor times the 2x2 packing: the multiple ``FluxKontextPipeline`` rounds sizes to."""


class FluxKontext(Flux):
    name = "flux-kontext"
    pipeline_classes = ("FluxKontextPipeline",)
    image_to_image = False
    reference_image = True
    reference_pixels = max(width * height for width, height in PREFERRED_KONTEXT_RESOLUTIONS)

    def specs(self, config: ModelConfig) -> dict[str, ComponentSpec]:
        """Flux's, with the reference image's latents an input of the transformer after the text."""
        specs = super().specs(config)
        transformer = specs["transformer"]
        reference = TensorSpec(
            "image_latents", ("batch", config.latent_channels, "reference_latent_height", "reference_latent_width")
        )
        inputs = (*transformer.inputs[:4], reference, *transformer.inputs[4:])
        sides = [side for size in PREFERRED_KONTEXT_RESOLUTIONS for side in size]
        reference_sides = (min(sides), KONTEXT_OPTIMUM, max(sides))
        return {**specs, "transformer": replace(transformer, inputs=inputs, reference_sides=reference_sides)}

    def torch_module(self, component: str, folder: Path, dtype: torch.dtype, weights: bool = True) -> torch.nn.Module:
        if component == "transformer":
            return FluxTransformerModule(load_pretrained(folder, component, dtype, weights), reference=True)
        return super().torch_module(component, folder, dtype, weights)

    def size_for_image(self, width: int, height: int) -> tuple[int, int]:
        """The preferred resolution nearest the image's aspect ratio (its sides first rounded down to
        multiples of 16), as ``FluxKontextPipeline`` resizes its input image."""
        step = KONTEXT_MULTIPLE
        aspect = (width // step * step) / (height // step * step)
        _, best_width, best_height = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        return best_width, best_height


FLUX, FILL, CONTROL, KONTEXT = Flux(), FluxFill(), FluxControl(), FluxKontext()
VARIANTS: tuple[Flux, ...] = (FLUX, FILL, CONTROL, KONTEXT)


def flux_variant(config: ModelConfig) -> Flux:
    """The variant whose layout the transformer's ``in_channels`` has (Kontext's is Flux.1's: its pipeline
    class names it). A variant's own pipeline class (``FluxFillPipeline``...) must agree; Flux.1's
    (``FluxPipeline``) names the family only."""
    latent, factor = config.latent_channels, config.vae_scale_factor
    in_channels = int(config.configs["transformer"]["in_channels"])
    by_extra = {0: FLUX, latent: CONTROL, latent + factor * factor: FILL}
    extra = in_channels // 4 - latent
    if extra not in by_extra:
        raise ModelError(
            f"{config.folder}: a Flux transformer with in_channels {in_channels} is none of Flux.1 "
            f"({4 * latent}), Control ({8 * latent}) or Fill ({4 * (2 * latent + factor * factor)})"
        )
    named = next((found for found in VARIANTS[1:] if config.pipeline_class in found.pipeline_classes), None)
    variant = KONTEXT if extra == 0 and named is KONTEXT else by_extra[extra]
    if named not in (None, variant):
        raise ModelError(
            f"{config.folder}: model_index.json names {config.pipeline_class}, but its transformer's in_channels "
            f"({in_channels}) are those of {variant.name}"
        )
    return variant
