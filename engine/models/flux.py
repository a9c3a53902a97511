"""Flux.1 (dev and schnell): CLIP-L's pooled embedding and T5's sequence, a rectified-flow
transformer over 2x2-packed latents, a 16-channel VAE with a shift, and flow matching with a
shift that grows with the image.

The semantics are those of diffusers' ``FluxPipeline``: guidance is distilled into dev (its
``guidance_scale`` is an input of the transformer) and absent from schnell; classifier-free
guidance only runs with ``true_cfg_scale`` above 1 and a negative prompt. Dev and schnell are
told apart by the transformer's config (``guidance_embeds``), not by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.models.components import TIMESTEP, token_ids, vae_module, vae_specs
from engine.models.config import ModelConfig
from engine.models.family import Encode, PromptBatch, load_pretrained, repeat_for_images
from engine.models.flow import FlowMatchingFamily, flow_shift
from engine.models.modules import FluxTransformerModule, PooledTextModule, T5Module
from engine.spec import ComponentSpec, TensorSpec

DEV_T5_TOKENS = 512
SCHNELL_T5_TOKENS = 256
"""diffusers' ``max_sequence_length`` for dev (its default) and schnell (as its model card sets it)."""
SCHNELL_STEPS = 4
GUIDANCE = TensorSpec("guidance", (1,), value_range=(0, 10), keep_fp32=True)


def guidance_distilled(config: ModelConfig) -> bool:
    """Dev takes its guidance scale as an input; schnell has none."""
    return bool(config.configs["transformer"].get("guidance_embeds"))


def t5_tokens(config: ModelConfig) -> int:
    return DEV_T5_TOKENS if guidance_distilled(config) else SCHNELL_T5_TOKENS


class Flux(FlowMatchingFamily):
    name = "flux"
    pipeline_classes = ("FluxPipeline", "FluxImg2ImgPipeline")
    text_encoders = ("text_encoder", "text_encoder_2")
    tokenizers = ("tokenizer", "tokenizer_2")
    components = ("text_encoder", "text_encoder_2", "transformer", "vae_decoder", "vae_encoder")
    t5 = ("text_encoder_2", "tokenizer_2")
    default_guidance_scale = 3.5
    samples_image_once = True
    true_cfg = True

    def specs(self, config: ModelConfig) -> dict[str, ComponentSpec]:
        transformer, clip, t5 = (config.configs[name] for name in ("transformer", "text_encoder", "text_encoder_2"))
        tokens = t5_tokens(config)
        latent = ("batch", config.latent_channels, "latent_height", "latent_width")
        sample = ("batch", int(transformer["in_channels"]) // 4, "latent_height", "latent_width")
        conditioning = (
            TensorSpec("encoder_hidden_states", ("batch", tokens, transformer["joint_attention_dim"])),
            TensorSpec("pooled_projections", ("batch", transformer["pooled_projection_dim"])),
        )
        return {
            "text_encoder": ComponentSpec(
                name="text_encoder",
                inputs=(token_ids(config, "text_encoder"),),
                outputs=(TensorSpec("text_embeds", ("text_batch", clip["hidden_size"])),),
                batch_multiplier=2,
            ),
            "text_encoder_2": ComponentSpec(
                name="text_encoder_2",
                inputs=(
                    TensorSpec("input_ids", ("text_batch", tokens), dtype="int64", value_range=(0, t5["vocab_size"])),
                ),
                outputs=(TensorSpec("hidden_states", ("text_batch", tokens, t5["d_model"])),),
                batch_multiplier=2,
            ),
            "transformer": ComponentSpec(
                name="transformer",
                inputs=(
                    TensorSpec("sample", sample),
                    TIMESTEP,
                    *conditioning,
                    *((GUIDANCE,) if guidance_distilled(config) else ()),
                ),
                outputs=(TensorSpec("noise_pred", latent),),
                latent_factor=config.vae_scale_factor,
                batch_multiplier=2,
            ),
            **vae_specs(config),
        }

    def torch_module(self, component: str, folder: Path, dtype: torch.dtype, weights: bool = True) -> torch.nn.Module:
        if component == "text_encoder":
            return PooledTextModule(load_pretrained(folder, component, dtype, weights))
        if component == "text_encoder_2":
            return T5Module(load_pretrained(folder, component, dtype, weights))
        if component == "transformer":
            return FluxTransformerModule(load_pretrained(folder, component, dtype, weights))
        return vae_module(component, folder, dtype, weights)

    def guidance_default(self, config: ModelConfig) -> float:
        return self.default_guidance_scale if guidance_distilled(config) else 0.0

    def steps_default(self, config: ModelConfig) -> int | None:
        return None if guidance_distilled(config) else SCHNELL_STEPS

    def classifier_free_scale(
        self, guidance_scale: float, true_cfg_scale: float | None, has_negatives: bool
    ) -> float | None:
        """True classifier-free guidance: ``true_cfg_scale`` above 1 with a negative prompt."""
        return true_cfg_scale if true_cfg_scale is not None and true_cfg_scale > 1.0 and has_negatives else None

    def denoiser_inputs(self, config: ModelConfig, guidance_scale: float) -> dict[str, torch.Tensor]:
        if not guidance_distilled(config):
            return {}
        return {"guidance": torch.full([1], guidance_scale, dtype=torch.float32)}

    def timestep_options(
        self, config: ModelConfig, scheduler: Any, steps: int, latent_shape: tuple[int, ...]
    ) -> dict[str, Any]:
        """Sigmas from 1 to 1/steps, shifted by the packed image's token count, as FluxPipeline sets them."""
        patches = (latent_shape[2] // 2) * (latent_shape[3] // 2)
        sigmas = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        return {"sigmas": sigmas, "mu": flow_shift(scheduler, patches)}

    def encode_prompt(
        self, encode: Encode, tokenizers: Mapping[str, Any], batch: PromptBatch, config: ModelConfig
    ) -> dict[str, torch.Tensor]:
        texts = batch.texts(with_negatives=batch.guidance)
        clip = tokenizers["tokenizer"]
        clip_ids = clip(
            texts, padding="max_length", max_length=clip.model_max_length, truncation=True, return_tensors="pt"
        )
        pooled = encode("text_encoder", {"input_ids": clip_ids.input_ids})["text_embeds"]
        t5_ids = tokenizers["tokenizer_2"](
            texts, padding="max_length", max_length=t5_tokens(config), truncation=True, return_tensors="pt"
        ).input_ids
        hidden = encode("text_encoder_2", {"input_ids": t5_ids})["hidden_states"]
        return {
            "encoder_hidden_states": repeat_for_images(hidden, batch.images_per_prompt),
            "pooled_projections": repeat_for_images(pooled, batch.images_per_prompt),
        }
