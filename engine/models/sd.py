"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet and a VAE."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from engine.models.components import token_ids, unet_spec, vae_module, vae_specs
from engine.models.config import ModelConfig
from engine.models.family import Encode, LoraTarget, ModelFamily, PromptBatch, load_pretrained, repeat_for_images
from engine.models.modules import TextEncoderModule, UNetModule
from engine.prompts.tokens import apply_weights, chunk_count, chunked_inputs, joined
from engine.spec import ComponentSpec, TensorSpec


class StableDiffusion(ModelFamily):
    name = "sd"
    pipeline_classes = (
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
        "LatentConsistencyModelPipeline",
        "LatentConsistencyModelImg2ImgPipeline",
    )
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
