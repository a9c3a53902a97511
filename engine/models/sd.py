"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet and a VAE."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from engine.models.family import (
    Encode,
    LoraTarget,
    ModelConfig,
    ModelFamily,
    PromptBatch,
    load_pretrained,
    repeat_for_images,
)
from engine.models.modules import TextEncoderModule, UNetModule, VaeDecoderModule, VaeEncoderModule
from engine.prompts.tokens import apply_weights, chunk_count, chunked_inputs, joined
from engine.spec import ComponentSpec, TensorSpec

TIMESTEP = TensorSpec("timestep", (1,), value_range=(0, 1000), keep_fp32=True)


def unet_spec(config: ModelConfig, conditioning: tuple[TensorSpec, ...]) -> ComponentSpec:
    unet = config.configs["unet"]
    return ComponentSpec(
        name="unet",
        inputs=(
            TensorSpec("sample", ("batch", unet["in_channels"], "latent_height", "latent_width")),
            TIMESTEP,
            *conditioning,
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


class StableDiffusion(ModelFamily):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
    text_encoders = ("text_encoder",)
    tokenizers = ("tokenizer",)
    components = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
    default_guidance_scale = 7.5
    default_inpaint_strength = 1.0

    def specs(self, config: ModelConfig) -> dict[str, ComponentSpec]:
        text = config.configs["text_encoder"]
        return {
            "text_encoder": ComponentSpec(
                name="text_encoder",
                inputs=(token_ids(config, "text_encoder"),),
                outputs=(
                    TensorSpec("text_embeddings", ("text_batch", text["max_position_embeddings"], text["hidden_size"])),
                ),
                batch_multiplier=2,
            ),
            "unet": unet_spec(
                config, (TensorSpec("encoder_hidden_states", ("batch", "prompt_tokens", text["hidden_size"])),)
            ),
            **vae_specs(config),
        }

    lora_targets: ClassVar[Mapping[str, LoraTarget]] = {
        "text_encoder": LoraTarget("text_encoder", "encoder.", is_unet=False),
        "unet": LoraTarget("unet", "unet.", is_unet=True),
    }

    @property
    def lora_loader(self) -> Any:
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        return StableDiffusionLoraLoaderMixin

    def torch_module(self, component: str, folder: Path, dtype: torch.dtype, weights: bool = True) -> torch.nn.Module:
        if component == "text_encoder":
            return TextEncoderModule(load_pretrained(folder, "text_encoder", dtype, weights))
        if component == "unet":
            return UNetModule(load_pretrained(folder, "unet", dtype, weights))
        return vae_module(component, folder, dtype, weights)

    def encode_prompt(
        self, encode: Encode, tokenizers: Mapping[str, Any], batch: PromptBatch, config: ModelConfig
    ) -> dict[str, torch.Tensor]:
        texts = batch.texts(with_negatives=batch.guidance)
        rows = self.tokenize(tokenizers, texts, batch.syntax)["tokenizer"]
        ids, weights = chunked_inputs(tokenizers["tokenizer"], rows, chunk_count(rows))
        chunks = encode("text_encoder", {"input_ids": ids})["text_embeddings"]
        embeddings = apply_weights(joined(chunks, len(texts)), weights)
        # Rows are [negatives..., prompts...]; repeating each row keeps that order per image.
        return {"encoder_hidden_states": repeat_for_images(embeddings, batch.images_per_prompt)}
