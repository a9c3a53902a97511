"""Stable Diffusion 3 and 3.5: CLIP-L, CLIP-G and T5 joined into one text sequence, an MMDiT
transformer over latent patches, a 16-channel VAE with a shift, and flow matching.

The semantics are those of diffusers' ``StableDiffusion3Pipeline``: both CLIP encoders' penultimate
hidden states side by side, zero-padded to T5's width and followed by T5's sequence; their pooled
projections side by side; classifier-free guidance with "" as the default negative prompt. Prompts
are read as plain text, CLIP's cut at 77 tokens and T5's at ``T5_TOKENS``, as diffusers cuts them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from engine.models.components import TIMESTEP, token_ids, vae_module, vae_specs
from engine.models.config import ModelConfig
from engine.models.family import Encode, PromptBatch, load_pretrained, repeat_for_images
from engine.models.flow import FlowMatchingFamily, flow_shift
from engine.models.modules import SD3TransformerModule, T5Module, TextEncoderModule
from engine.spec import ComponentSpec, TensorSpec

PENULTIMATE = -2
T5_TOKENS = 256
"""diffusers' default ``max_sequence_length`` for SD3."""
CLIP_ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


class StableDiffusion3(FlowMatchingFamily):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizers = ("tokenizer", "tokenizer_2", "tokenizer_3")
    components = ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder", "vae_encoder")
    t5 = ("text_encoder_3", "tokenizer_3")
    default_guidance_scale = 7.0

    def specs(self, config: ModelConfig) -> dict[str, ComponentSpec]:
        transformer, t5 = config.configs["transformer"], config.configs["text_encoder_3"]
        clip_length = config.configs["text_encoder"]["max_position_embeddings"]
        joint = ("batch", clip_length + T5_TOKENS, transformer["joint_attention_dim"])
        latent = ("batch", transformer["in_channels"], "latent_height", "latent_width")
        specs = {
            encoder: ComponentSpec(
                name=encoder,
                inputs=(token_ids(config, encoder),),
                outputs=(
                    TensorSpec("hidden_states", ("text_batch", clip_length, config.configs[encoder]["hidden_size"])),
                    TensorSpec("text_embeds", ("text_batch", config.configs[encoder]["projection_dim"])),
                ),
                batch_multiplier=2,
            )
            for encoder, _ in CLIP_ENCODERS
        }
        specs["text_encoder_3"] = ComponentSpec(
            name="text_encoder_3",
            inputs=(
                TensorSpec("input_ids", ("text_batch", T5_TOKENS), dtype="int64", value_range=(0, t5["vocab_size"])),
            ),
            outputs=(TensorSpec("hidden_states", ("text_batch", T5_TOKENS, t5["d_model"])),),
            batch_multiplier=2,
        )
        specs["transformer"] = ComponentSpec(
            name="transformer",
            inputs=(
                TensorSpec("sample", latent),
                TIMESTEP,
                TensorSpec("encoder_hidden_states", joint),
                TensorSpec("pooled_projections", ("batch", transformer["pooled_projection_dim"])),
            ),
            outputs=(
                TensorSpec("noise_pred", ("batch", transformer["out_channels"], "latent_height", "latent_width")),
            ),
            latent_factor=config.vae_scale_factor,
            batch_multiplier=2,
        )
        return {**specs, **vae_specs(config)}

    def torch_module(self, component: str, folder: Path, dtype: torch.dtype, weights: bool = True) -> torch.nn.Module:
        if component == "text_encoder_3":
            return T5Module(load_pretrained(folder, component, dtype, weights))
        if component in self.text_encoders:
            encoder = load_pretrained(folder, component, dtype, weights)
            return TextEncoderModule(encoder, hidden_layer=PENULTIMATE, pooled=True)
        if component == "transformer":
            return SD3TransformerModule(load_pretrained(folder, component, dtype, weights))
        return vae_module(component, folder, dtype, weights)

    def timestep_options(
        self, config: ModelConfig, scheduler: Any, steps: int, latent_shape: tuple[int, ...]
    ) -> dict[str, Any]:
        """A scheduler config with dynamic shifting shifts by the image's patch count, as diffusers does."""
        if not scheduler.config.get("use_dynamic_shifting"):
            return {}
        patches = (latent_shape[2] // config.patch_size) * (latent_shape[3] // config.patch_size)
        return {"mu": flow_shift(scheduler, patches)}

    def encode_prompt(
        self, encode: Encode, tokenizers: Mapping[str, Any], batch: PromptBatch, config: ModelConfig
    ) -> dict[str, torch.Tensor]:
        texts = batch.texts(with_negatives=batch.guidance)
        hidden, pooled = [], []
        for encoder, tokenizer in CLIP_ENCODERS:
            ids = tokenizers[tokenizer](
                texts,
                padding="max_length",
                max_length=tokenizers[tokenizer].model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            outputs = encode(encoder, {"input_ids": ids})
            hidden.append(outputs["hidden_states"])
            pooled.append(outputs["text_embeds"])
        t5_ids = tokenizers["tokenizer_3"](
            texts, padding="max_length", max_length=T5_TOKENS, truncation=True, return_tensors="pt"
        ).input_ids
        t5 = encode("text_encoder_3", {"input_ids": t5_ids})["hidden_states"]
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        embeddings = torch.cat([clip.to(t5.dtype), t5], dim=-2)
        return {
            "encoder_hidden_states": repeat_for_images(embeddings, batch.images_per_prompt),
            "pooled_projections": repeat_for_images(torch.cat(pooled, dim=-1), batch.images_per_prompt),
        }
