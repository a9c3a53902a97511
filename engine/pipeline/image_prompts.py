"""Image prompts as the IP denoiser takes them: each IP-Adapter's images encoded and projected to tokens.

The order and the negatives are diffusers' (``prepare_ip_adapter_image_embeds``): the images are
preprocessed as ``load_ip_adapter`` sets up CLIP's processor for the encoder's input size, a plain
adapter projects the image embeds and, for the negative rows, the projection of zeros; a Plus or
Full Face adapter projects the penultimate hidden states and, for the negative rows, those of an
all-zero image. Several images of one adapter have their tokens joined, in order; with two adapters,
each has its own tokens and scales, as diffusers' lists of adapters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from PIL import Image

from engine.backends.base import ComponentCall
from engine.models.ip_adapter import IP_SCALE, IP_TOKENS, slot_input


@dataclass(frozen=True)
class ImagePrompt:
    """One IP-Adapter of a request: its components, its decoded images and its scales."""

    encoder: str
    projection: str
    images: tuple[Image.Image, ...]
    scales: tuple[float, ...]
    """One per cross-attention layer, in the order of ``cross_attention_processors`` (``engine.models.ip_scales``)."""
    hidden_states: bool
    """Whether the projection reads the encoder's penultimate hidden states (Plus, Full Face)."""
    image_size: int
    """The side of the square the encoder takes."""


def preprocess(prompt: ImagePrompt, device: torch.device) -> torch.Tensor:
    """CLIP's preprocessing at the encoder's size, as ``load_ip_adapter`` makes the pipeline's processor."""
    from transformers import CLIPImageProcessor

    side = prompt.image_size
    processor = CLIPImageProcessor(size=side, crop_size=side)
    return processor(list(prompt.images), return_tensors="pt").pixel_values.to(device)


def image_prompt_inputs(
    prompt: ImagePrompt,
    slot: int,
    runners: Mapping[str, ComponentCall],
    rows: int,
    guidance: bool,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """The IP denoiser's inputs for the adapter in its ``slot``: ``ip_tokens`` (one row per denoiser row,
    negatives first with guidance) and ``ip_scale`` (a value per cross-attention layer), ``ip_tokens_2``
    and ``ip_scale_2`` in the second slot."""
    pixels = preprocess(prompt, device)
    output = "hidden_states" if prompt.hidden_states else "image_embeds"
    embeds = runners[prompt.encoder]({"pixel_values": pixels})[output].float()
    tokens = _tokens(prompt, runners, embeds)
    if guidance:
        if prompt.hidden_states:
            negative = runners[prompt.encoder]({"pixel_values": torch.zeros_like(pixels)})[output].float()
        else:
            negative = torch.zeros_like(embeds)
        negative_tokens = _tokens(prompt, runners, negative)
        tokens = torch.cat([negative_tokens.expand(rows, -1, -1), tokens.expand(rows, -1, -1)])
    else:
        tokens = tokens.expand(rows, -1, -1)
    scales = torch.tensor(prompt.scales, dtype=torch.float32, device=device)
    return {slot_input(IP_TOKENS, slot): tokens.contiguous(), slot_input(IP_SCALE, slot): scales}


def _tokens(prompt: ImagePrompt, runners: Mapping[str, ComponentCall], embeds: torch.Tensor) -> torch.Tensor:
    """Every image's tokens, joined into one row."""
    tokens = runners[prompt.projection]({"image_embeds": embeds})[IP_TOKENS].float()
    return tokens.reshape(1, -1, tokens.shape[-1])
