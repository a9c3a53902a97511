"""Full-size architectures with random weights: real sizes without downloading a checkpoint.

    python -m perf.models sd15 /tmp/sd15-random
    python -m perf.models sd15-inpaint /tmp/sd15-inpaint-random
    python -m perf.models sd15-controlnet /tmp/controlnets/sd15-random
    python -m perf.models flux-wide /tmp/flux-wide-random

Tiny models hide what real ones hit (graphs over 2 GiB, fp16 overflow, memory), so the
export and the worker are measured on these. The configs are those of the released
checkpoints (UNet 320/640/1280/1280, CLIP ViT-L/14, KL VAE 128/256/512/512); only the
tokenizer is the tiny one, since the real vocabulary is not on disk here. Their images
are noise.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def clip_vit_l(tokenizer: Any) -> torch.nn.Module:
    """CLIP ViT-L/14's text encoder (SD 1.5's, and Flux's first), random, over the given tokenizer's ids."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        vocab_size=49408,
        max_position_embeddings=77,
        projection_dim=768,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def kl_vae(**config: Any) -> torch.nn.Module:
    """The KL VAE at the widths SD 1.5's, SDXL's and Flux's share (128 to 512 channels, four blocks of two
    layers), random; ``config`` sets the latent channels and what differs."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        **config,
    )


def build_sd15(folder: Path, inpainting: bool = False) -> None:
    """Stable Diffusion 1.5: a 3.4 GB UNet, a 0.5 GB text encoder, a 0.3 GB VAE (fp32). With
    ``inpainting``, SD 1.5 inpainting's UNet: 9 input channels (latents, mask, masked-image latents)."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel

    from engine.models.builtin_parts import byte_tokenizer, sd_scheduler

    tokenizer = byte_tokenizer()
    text_encoder = clip_vit_l(tokenizer)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=9 if inpainting else 4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = kl_vae(latent_channels=4, sample_size=512)
    pipeline = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    pipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)


def build_sd15_controlnet(folder: Path) -> None:
    """An SD 1.5 ControlNet (1.4 GB fp32), as lllyasviel's control_v11 checkpoints are configured. diffusers
    starts its output convolutions at zero, which would make every residual zero: they are drawn at
    random too, at the small scale trained ones have."""
    from diffusers import ControlNetModel

    controlnet = ControlNetModel(
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        conditioning_embedding_out_channels=(16, 32, 96, 256),
    )
    with torch.no_grad():
        for parameter in controlnet.parameters():
            if not parameter.any():
                parameter.normal_(0.0, 0.02)
    controlnet.save_pretrained(folder)


def build_flux_wide(folder: Path, double_blocks: int = 2, single_blocks: int = 2, t5_layers: int = 2) -> None:
    """Flux.1 dev at its real widths with few blocks: the transformer (3072 wide, 24 heads of 128, the
    guidance embedding) with 2 double-stream and 2 single-stream blocks of its 19 and 38 (3.4 GB fp32),
    T5-XXL's width (4096, feed-forward 10240, 64 heads) with 2 of its 24 layers and its 32128-token
    table, CLIP-L, and Flux's 16-channel VAE. Large enough for the large-graph export path and fp16's
    range at real widths, small enough for a CPU; the full transformer is 12B parameters."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from engine.models.builtin_parts import byte_tokenizer, t5_tokenizer

    tokenizer, tokenizer_2 = byte_tokenizer(), t5_tokenizer(max_length=512)
    text_encoder = clip_vit_l(tokenizer)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=32128,
            d_model=4096,
            d_kv=64,
            d_ff=10240,
            num_layers=t5_layers,
            num_heads=64,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
        )
    )
    transformer = FluxTransformer2DModel(
        in_channels=64,
        num_layers=double_blocks,
        num_single_layers=single_blocks,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )
    vae = kl_vae(
        latent_channels=16,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, max_shift=1.15)
    FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    ).save_pretrained(folder)


ARCHITECTURES: dict[str, Callable[[Path], None]] = {
    "flux-wide": build_flux_wide,
    "sd15-controlnet": build_sd15_controlnet,
    "sd15": build_sd15,
    "sd15-inpaint": functools.partial(build_sd15, inpainting=True),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.models", description=__doc__.splitlines()[0])
    parser.add_argument("architecture", choices=sorted(ARCHITECTURES))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    ARCHITECTURES[args.architecture](args.folder)
    print(args.folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
