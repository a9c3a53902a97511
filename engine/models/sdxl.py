"""Stable Diffusion XL: two CLIP text encoders, pooled text embeddings and time ids as added conditions."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from engine.models.components import token_ids, unet_spec, vae_module, vae_specs
from engine.models.config import ModelConfig
from engine.models.family import Encode, LoraTarget, ModelFamily, PromptBatch, load_pretrained, repeat_for_images
from engine.models.modules import TextEncoderModule, UNetModule
from engine.prompts.tokens import WeightedTokens, apply_weights, chunk_count, chunked_inputs, joined
from engine.spec import ComponentSpec, TensorSpec

PENULTIMATE = -2
"""SDXL conditions on the second-to-last hidden state of both text encoders."""
TIME_IDS = 6
"""original size (2), crop top-left (2), target size (2)."""


class StableDiffusionXL(ModelFamily):
    name = "sdxl"
    pipeline_classes = (
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
    )
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    components = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")
    default_guidance_scale = 5.0
    default_inpaint_strength = 0.9999
    """StableDiffusionXLInpaintPipeline's default: the image's latents still seed the masked region, barely."""

    def specs(self, config: ModelConfig) -> dict[str, ComponentSpec]:
        first, second = config.configs["text_encoder"], config.configs["text_encoder_2"]
        length = first["max_position_embeddings"]
        joint = ("batch", "prompt_tokens", first["hidden_size"] + second["hidden_size"])
        pooled = TensorSpec("text_embeds", ("batch", second["projection_dim"]))
        chunk_pooled = TensorSpec("text_embeds", ("text_batch", second["projection_dim"]))
        return {
            "text_encoder": ComponentSpec(
                name="text_encoder",
                inputs=(token_ids(config, "text_encoder"),),
                outputs=(TensorSpec("hidden_states", ("text_batch", length, first["hidden_size"])),),
                batch_multiplier=2,
            ),
            "text_encoder_2": ComponentSpec(
                name="text_encoder_2",
                inputs=(token_ids(config, "text_encoder_2"),),
                outputs=(TensorSpec("hidden_states", ("text_batch", length, second["hidden_size"])), chunk_pooled),
                batch_multiplier=2,
            ),
            "unet": unet_spec(
                config,
                (
                    TensorSpec("encoder_hidden_states", joint),
                    pooled,
                    TensorSpec("time_ids", ("batch", TIME_IDS), value_range=(0, 2048), keep_fp32=True),
                ),
            ),
            **vae_specs(config),
        }

    lora_targets: ClassVar[Mapping[str, LoraTarget]] = {
        "text_encoder": LoraTarget("text_encoder", "encoder.", is_unet=False),
        "text_encoder_2": LoraTarget("text_encoder_2", "encoder.", is_unet=False),
        "unet": LoraTarget("unet", "unet.", is_unet=True),
    }

    @property
    def lora_loader(self) -> Any:
        from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

        return StableDiffusionXLLoraLoaderMixin

    def torch_module(self, component: str, folder: Path, dtype: torch.dtype, weights: bool = True) -> torch.nn.Module:
        if component in self.text_encoders:
            encoder = load_pretrained(folder, component, dtype, weights)
            return TextEncoderModule(encoder, hidden_layer=PENULTIMATE, pooled=component == "text_encoder_2")
        if component == "unet":
            unet = load_pretrained(folder, "unet", dtype, weights)
            return UNetModule(unet, added_cond_names=("text_embeds", "time_ids"))
        return vae_module(component, folder, dtype, weights)

    def component_precision(self, component: str, precision: str, config: ModelConfig) -> str:
        """SDXL's VAE overflows in fp16 unless it is a fixed one (its config then drops force_upcast)."""
        resolved = super().component_precision(component, precision, config)
        if resolved == "fp16" and component.startswith("vae") and config.configs["vae"].get("force_upcast", False):
            return "fp32"
        return resolved

    def encode_prompt(
        self, encode: Encode, tokenizers: Mapping[str, Any], batch: PromptBatch, config: ModelConfig
    ) -> dict[str, torch.Tensor]:
        zero_negative = batch.negative_prompts is None and config.pipeline_config.get(
            "force_zeros_for_empty_prompt", True
        )
        texts = batch.texts(with_negatives=batch.guidance and not zero_negative)
        tokenized = self.tokenize(tokenizers, texts, batch.syntax)
        chunks = max(chunk_count(rows) for rows in tokenized.values())  # both encoders chunk alike
        hidden, pooled = [], None
        for encoder, tokenizer in zip(self.text_encoders, self.tokenizers, strict=True):
            rows = tokenized[tokenizer]
            ids, weights = chunked_inputs(tokenizers[tokenizer], rows, chunks)
            outputs = encode(encoder, {"input_ids": ids})
            hidden.append(apply_weights(joined(outputs["hidden_states"], len(texts)), weights))
            if "text_embeds" in outputs:
                pooled = last_chunk_pooled(outputs["text_embeds"], rows, chunks)
        assert pooled is not None
        embeddings = torch.cat(hidden, dim=-1)
        if batch.guidance and zero_negative:
            embeddings = torch.cat([torch.zeros_like(embeddings), embeddings])
            pooled = torch.cat([torch.zeros_like(pooled), pooled])
        image_rows = embeddings.shape[0] * batch.images_per_prompt
        size = [batch.height, batch.width]
        time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=torch.float32).repeat(image_rows, 1)
        return {
            "encoder_hidden_states": repeat_for_images(embeddings, batch.images_per_prompt),
            "text_embeds": repeat_for_images(pooled, batch.images_per_prompt),
            "time_ids": time_ids.to(embeddings.device),
        }


def last_chunk_pooled(pooled: torch.Tensor, rows: list[WeightedTokens], chunks: int) -> torch.Tensor:
    """Each prompt's pooled embedding from the last chunk of its own text, as lpw_stable_diffusion_xl
    takes it (AUTOMATIC1111 takes the first chunk's). Empty chunks that only pad a prompt to the
    batch's count are not its own: lpw would pool one of those when the negative prompt is longer."""
    per_row = pooled.reshape(len(rows), chunks, -1)
    last = torch.tensor([len(row.chunks) - 1 for row in rows], device=pooled.device)
    return per_row[torch.arange(len(rows), device=pooled.device), last]
