"""Component specs and modules every family builds from: the VAE's encoder and decoder, CLIP's token
ids, the timestep, and the UNet with the conditioning each family gives it.

A family composes these instead of importing them from a sibling family.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.models.config import ModelConfig
from engine.models.family import load_pretrained
from engine.models.modules import GUIDANCE_EMBEDDING, VaeDecoderModule, VaeEncoderModule
from engine.spec import ComponentSpec, TensorSpec

TIMESTEP = TensorSpec("timestep", (1,), value_range=(0, 1000), keep_fp32=True)


def unet_spec(config: ModelConfig, conditioning: tuple[TensorSpec, ...]) -> ComponentSpec:
    """The UNet's inputs: latents, timestep, the family's ``conditioning``, and last the guidance embedding
    where the UNet is LCM-distilled (one row, which the graph repeats for every image)."""
    unet = config.configs["unet"]
    dim = config.guidance_embedding_dim
    embedding = (TensorSpec(GUIDANCE_EMBEDDING, (1, dim), value_range=(-1.0, 1.0)),) if dim else ()
    return ComponentSpec(
        name="unet",
        inputs=(
            TensorSpec("sample", ("batch", unet["in_channels"], "latent_height", "latent_width")),
            TIMESTEP,
            *conditioning,
            *embedding,
        ),
        outputs=(TensorSpec("noise_pred", ("batch", unet["out_channels"], "latent_height", "latent_width")),),
        latent_factor=config.vae_scale_factor,
        batch_multiplier=2,
        tokens_per_chunk=config.configs["text_encoder"]["max_position_embeddings"],
    )


def vae_specs(config: ModelConfig) -> dict[str, ComponentSpec]:
    channels = config.configs["vae"]["latent_channels"]
    factor = config.vae_scale_factor
    latent = ("batch", channels, "latent_height", "latent_width")
    images = TensorSpec("images", ("batch", 3, "height", "width"), value_range=(-1.0, 1.0))
    return {
        "vae_decoder": ComponentSpec(
            name="vae_decoder",
            inputs=(TensorSpec("latent", latent),),
            outputs=(images,),
            latent_factor=factor,
        ),
        "vae_encoder": ComponentSpec(
            name="vae_encoder",
            inputs=(images,),
            outputs=(TensorSpec("latent_moments", ("batch", 2 * channels, "latent_height", "latent_width")),),
            latent_factor=factor,
        ),
    }


def token_ids(config: ModelConfig, encoder: str) -> TensorSpec:
    text = config.configs[encoder]
    return TensorSpec(
        "input_ids",
        ("text_batch", text["max_position_embeddings"]),
        dtype="int64",
        value_range=(0, text["vocab_size"]),
    )


def vae_module(component: str, folder: Path, dtype: torch.dtype, weights: bool = True) -> torch.nn.Module:
    vae = load_pretrained(folder, "vae", dtype, weights)
    return VaeDecoderModule(vae) if component == "vae_decoder" else VaeEncoderModule(vae)
