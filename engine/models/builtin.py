"""Built-in models with random weights: real architectures small enough for a CPU.

Each is written once, in diffusers' folder layout, into the local cache, and then
loaded through the same loader as any real model folder, so every code path that a
real checkpoint takes is exercised without downloading weights.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

RECIPE_VERSION = 2
"""Bumped when a recipe changes, so a cached folder from an older recipe is never reused
(2: text encoders' final LayerNorm has a bias, as trained ones do)."""

SEED = 0
TEXT_HIDDEN = 32


def byte_tokenizer():
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    # Byte-level characters with and without CLIP's end-of-word marker and no merges:
    # every word is spelled out, which is all a random model needs.
    chars = sorted(ByteLevel.alphabet())
    tokens = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def clip_text_encoder(
    tokenizer, hidden: int = TEXT_HIDDEN, with_projection: bool = False, vocab_size: int | None = None
):
    """A small CLIP text encoder; ``vocab_size`` above the tokenizer's makes a large embedding table."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size or len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    encoder = cls(config)
    # A trained final LayerNorm has a bias, so its embeddings do not average to zero; prompt
    # weighting keeps that average, which an untrained (zero) bias would leave undefined.
    bias = next(value for name, value in encoder.named_parameters() if name.endswith("final_layer_norm.bias"))
    torch.nn.init.normal_(bias, mean=0.3, std=0.5)
    return encoder


def _vae(**overrides):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=64,
        **{"latent_channels": 4, **overrides},
    )


def sd_scheduler():
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )


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
        vae=_vae(),
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
        vae=_vae(scaling_factor=0.13025, force_upcast=True),
        text_encoder=clip_text_encoder(tokenizer),
        text_encoder_2=clip_text_encoder(tokenizer_2, with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    pipeline.save_pretrained(folder)


def t5_tokenizer(max_length: int = 256):
    """A T5 tokenizer (SentencePiece-style unigram: ``▁`` marks a word's start, ``</s>`` ends the text)
    over printable characters, built offline with the tokenizers library."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = sorted(set(string.printable) - set(string.whitespace))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in chars] + [(f"▁{c}", -2.5) for c in chars]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=max_length,
    )


def t5_encoder(tokenizer, hidden: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=hidden,
        d_kv=hidden // 4,
        d_ff=2 * hidden,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config)


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
        vae=_vae(
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
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, tokenizer_2 = byte_tokenizer(), t5_tokenizer(max_length=512)
    t5_hidden = 2 * TEXT_HIDDEN
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
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
    pipeline = FluxPipeline(
        scheduler=scheduler,
        vae=_vae(
            latent_channels=16,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        text_encoder=clip_text_encoder(tokenizer),
        tokenizer=tokenizer,
        text_encoder_2=t5_encoder(tokenizer_2, t5_hidden),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipeline.save_pretrained(folder)


BUILTIN_MODELS: dict[str, Callable[[Path], None]] = {
    "tiny": build_tiny,
    "tiny-sdxl": build_tiny_sdxl,
    "tiny-sd3": build_tiny_sd3,
    "tiny-flux": build_tiny_flux,
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
