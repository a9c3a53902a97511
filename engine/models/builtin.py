"""Built-in models with random weights: real architectures small enough for a CPU, and their folders.

Each is written once, in diffusers' folder layout, into the local cache, and then
loaded through the same loader as any real model folder, so every code path that a
real checkpoint takes is exercised without downloading weights. The parts they share
(tokenizers, text encoders, VAE) are built in ``engine.models.builtin_parts``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from engine.models.builtin_parts import (
    TEXT_HIDDEN,
    byte_tokenizer,
    clip_text_encoder,
    sd_scheduler,
    small_vae,
    t5_encoder,
    t5_tokenizer,
)

log = logging.getLogger(__name__)

RECIPE_VERSION = 2
"""Bumped when a recipe changes, so a cached folder from an older recipe is never reused
(2: text encoders' final LayerNorm has a bias, as trained ones do)."""

SEED = 0


def build_tiny(folder: Path) -> None:
    """Stable Diffusion 1.x architecture: 64x64 native size, a few MB of weights."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = byte_tokenizer()
    text_encoder = clip_text_encoder(tokenizer)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    pipeline = StableDiffusionPipeline(
        vae=small_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)


def build_tiny_sdxl(folder: Path) -> None:
    """Stable Diffusion XL architecture: two text encoders (the second with projection), text-time
    added conditions, 64x64 native size."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = byte_tokenizer()
    tokenizer_2 = byte_tokenizer()
    tokenizer_2.pad_token = "!"  # as SDXL's second tokenizer pads
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * time_embed_dim + TEXT_HIDDEN,
        cross_attention_dim=2 * TEXT_HIDDEN,
        norm_num_groups=32,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipeline = StableDiffusionXLPipeline(
        vae=small_vae(scaling_factor=0.13025, force_upcast=True),
        text_encoder=clip_text_encoder(tokenizer),
        text_encoder_2=clip_text_encoder(tokenizer_2, with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    pipeline.save_pretrained(folder)


def build_tiny_sd3(folder: Path) -> None:
    """Stable Diffusion 3 architecture: CLIP-L and CLIP-G (with projections) and T5, an MMDiT
    transformer over 2x2 latent patches, a 16-channel VAE with a shift, flow matching; 128x128 native."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2 = byte_tokenizer(), byte_tokenizer()
    tokenizer_2.pad_token = "!"  # as SD3's CLIP-G tokenizer pads
    tokenizer_3 = t5_tokenizer()
    t5_hidden = 4 * TEXT_HIDDEN  # wider than both CLIP widths joined, as 4096 is wider than 768 + 1280
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=t5_hidden,
        caption_projection_dim=32,
        pooled_projection_dim=2 * TEXT_HIDDEN,
        out_channels=16,
        pos_embed_max_size=48,
    )
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=small_vae(
            latent_channels=16,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=clip_text_encoder(tokenizer, with_projection=True),
        tokenizer=tokenizer,
        text_encoder_2=clip_text_encoder(tokenizer_2, with_projection=True),
        tokenizer_2=tokenizer_2,
        text_encoder_3=t5_encoder(tokenizer_3, t5_hidden),
        tokenizer_3=tokenizer_3,
    )
    pipeline.save_pretrained(folder)


def build_tiny_flux(folder: Path) -> None:
    """Flux.1 dev architecture: CLIP-L (pooled) and T5, a transformer with one double-stream and one
    single-stream block and embedded guidance, 2x2-packed 16-channel latents, flow matching with a
    resolution-dependent shift; 1024x1024 native, as diffusers' FluxPipeline has it."""
    from diffusers import FluxPipeline

    FluxPipeline(**tiny_flux_components(in_channels=64)).save_pretrained(folder)


def build_tiny_flux_fill(folder: Path) -> None:
    """Flux.1 Fill: tiny-flux's layout with a transformer that also takes the masked image's 16 latent
    channels and the mask's 64 (one per pixel of a latent cell), each packed 2x2."""
    from diffusers import FluxFillPipeline

    FluxFillPipeline(**tiny_flux_components(in_channels=4 * (16 + 16 + 64))).save_pretrained(folder)


def build_tiny_flux_control(folder: Path) -> None:
    """Flux.1 Canny/Depth: tiny-flux's layout with a transformer that also takes the control image's
    16 latent channels, packed 2x2."""
    from diffusers import FluxControlPipeline

    FluxControlPipeline(**tiny_flux_components(in_channels=4 * (16 + 16))).save_pretrained(folder)


KONTEXT_ATTENTION_SHARPNESS = 8.0
"""How much tiny-flux-kontext's query and key norms scale their outputs."""


def build_tiny_flux_kontext(folder: Path) -> None:
    """Flux.1 Kontext: tiny-flux's layout (the same transformer width: the reference image's tokens join
    the sequence, not the channels), named by its pipeline class. Its query and key norms are scaled up,
    as training sharpens them: random ones spread each token's attention over the reference's thousands
    of tokens evenly, so the reference, and where its tokens sit, would barely show in the image."""
    from diffusers import FluxKontextPipeline

    components = tiny_flux_components(in_channels=64)
    with torch.no_grad():
        for name, parameter in components["transformer"].named_parameters():
            if name.split(".")[-2] in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                parameter.mul_(KONTEXT_ATTENTION_SHARPNESS)
    FluxKontextPipeline(**components).save_pretrained(folder)


def tiny_flux_components(in_channels: int) -> dict:
    """tiny-flux's components, with a transformer of ``in_channels`` that outputs the 64 packed latent channels."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    tokenizer, tokenizer_2 = byte_tokenizer(), t5_tokenizer(max_length=512)
    t5_hidden = 2 * TEXT_HIDDEN
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        out_channels=64 if in_channels != 64 else None,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5_hidden,
        pooled_projection_dim=TEXT_HIDDEN,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return {
        "scheduler": scheduler,
        "vae": small_vae(
            latent_channels=16,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        "text_encoder": clip_text_encoder(tokenizer),
        "tokenizer": tokenizer,
        "text_encoder_2": t5_encoder(tokenizer_2, t5_hidden),
        "tokenizer_2": tokenizer_2,
        "transformer": transformer,
    }


BUILTIN_MODELS: dict[str, Callable[[Path], None]] = {
    "tiny": build_tiny,
    "tiny-sdxl": build_tiny_sdxl,
    "tiny-sd3": build_tiny_sd3,
    "tiny-flux": build_tiny_flux,
    "tiny-flux-fill": build_tiny_flux_fill,
    "tiny-flux-control": build_tiny_flux_control,
    "tiny-flux-kontext": build_tiny_flux_kontext,
}


def builtin_model_folder(name: str, cache_dir: Path) -> Path:
    """The cached folder of a built-in model, written atomically on first use."""
    folder = cache_dir / "models" / f"{name}-v{RECIPE_VERSION}"
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    log.info("writing built-in model %s to %s", name, folder)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=folder.parent))
    try:
        with torch.random.fork_rng():
            torch.manual_seed(SEED)
            BUILTIN_MODELS[name](staging)
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "model_index.json").is_file():
                raise  # not a concurrent writer that finished first
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
