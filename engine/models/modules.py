"""Torch modules with flat tensor inputs and tuple outputs, one per exported component.

The same module is traced by the ONNX export and run by the torch backend, so the
reference the exports are checked against is exactly what the fallback runs.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

FP16_VARIANT = "fp16"


def weights_variant(folder: Path, dtype: torch.dtype) -> str | None:
    """Use a folder's fp16 weight files when fp16 is wanted, or when they are all it has."""
    variant_files = list(folder.glob(f"*.{FP16_VARIANT}.safetensors")) + list(folder.glob(f"*.{FP16_VARIANT}.bin"))
    if not variant_files:
        return None
    plain_files = [
        path
        for pattern in ("*.safetensors", "*.bin")
        for path in folder.glob(pattern)
        if f".{FP16_VARIANT}." not in path.name
    ]
    return FP16_VARIANT if dtype == torch.float16 or not plain_files else None


def stored_dtype(folder: Path) -> torch.dtype | None:
    """The floating type most of a folder's safetensors weights are stored in (fp16 variants aside),
    read from the files' headers alone; None where there are none (``.bin`` files say nothing cheaply)."""
    from safetensors import safe_open

    elements: dict[str, int] = {}
    for path in folder.glob("*.safetensors"):
        if f".{FP16_VARIANT}." in path.name:
            continue
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = weights.get_slice(name)
                elements[tensor.get_dtype()] = elements.get(tensor.get_dtype(), 0) + math.prod(tensor.get_shape())
    floats = {name: count for name, count in elements.items() if name in SAFETENSORS_FLOATS}
    return SAFETENSORS_FLOATS[max(floats, key=floats.__getitem__)] if floats else None


SAFETENSORS_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
"""safetensors' names of the floating types checkpoints hold."""


class TextEncoderModule(nn.Module):
    """A CLIP text encoder returning one hidden state and, when asked, the pooled projection."""

    def __init__(self, encoder: nn.Module, hidden_layer: int | None = None, pooled: bool = False):
        super().__init__()
        self.encoder = encoder
        self.hidden_layer = hidden_layer
        self.pooled = pooled

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.encoder(input_ids, output_hidden_states=self.hidden_layer is not None)
        hidden = out.last_hidden_state if self.hidden_layer is None else out.hidden_states[self.hidden_layer]
        return (hidden, out.text_embeds) if self.pooled else (hidden,)


GUIDANCE_EMBEDDING = "timestep_cond"
"""The input of an LCM-distilled UNet (one whose config has ``time_cond_proj_dim``) that carries the
guidance scale's embedding, as diffusers' ``get_guidance_scale_embedding`` makes it."""


def unet_conditioning(
    names: tuple[str, ...], added: tuple[torch.Tensor, ...], batch: int
) -> dict[str, torch.Tensor | dict[str, torch.Tensor] | None]:
    """A diffusers UNet's keyword arguments for its inputs after the text embeddings: SDXL's added
    conditions, and the guidance embedding (one row, the same for every image in the batch)."""
    values = dict(zip(names, added, strict=True))
    embedding = values.pop(GUIDANCE_EMBEDDING, None)
    return {
        "added_cond_kwargs": values or None,
        "timestep_cond": None if embedding is None else embedding.expand(batch, -1),
    }


class UNetModule(nn.Module):
    """The denoiser; extra conditioning inputs (SDXL's text embeds and time ids, then an LCM-distilled
    UNet's guidance embedding) come last."""

    def __init__(self, unet: nn.Module, added_cond_names: tuple[str, ...] = ()):
        super().__init__()
        self.unet = unet
        embedding = (GUIDANCE_EMBEDDING,) if unet.config.get("time_cond_proj_dim") else ()
        self.added_cond_names = (*added_cond_names, *embedding)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, *added: torch.Tensor
    ) -> tuple[torch.Tensor]:
        conditioning = unet_conditioning(self.added_cond_names, added, sample.shape[0])
        noise_pred = self.unet(sample, timestep, encoder_hidden_states, **conditioning, return_dict=False)[0]
        return (noise_pred,)


class VaeDecoderModule(nn.Module):
    """Latents (already divided by the scaling factor) to images in [-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.vae.decode(latent, return_dict=False)[0],)


class VaeEncoderModule(nn.Module):
    """Images in [-1, 1] to the latent distribution's moments (mean and log-variance).

    Sampling stays outside the graph so it draws from the request's generator exactly
    as diffusers does.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.vae.encode(images).latent_dist.parameters,)


class T5Module(nn.Module):
    """A T5 encoder's last hidden state: SD3's and Flux's long text conditioning."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.encoder(input_ids)[0],)


class SD3TransformerModule(nn.Module):
    """SD3's MMDiT: latents, the timestep (sigma x 1000), the joint text sequence and the pooled text
    embeddings in; the velocity out."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
    ) -> tuple[torch.Tensor]:
        velocity = self.transformer(
            hidden_states=sample,
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            return_dict=False,
        )[0]
        return (velocity,)


class PooledTextModule(nn.Module):
    """A CLIP text encoder's pooled output (the end token's state after the final norm), Flux's only use of CLIP."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.encoder(input_ids, output_hidden_states=False).pooler_output,)


def packed(latents: torch.Tensor) -> torch.Tensor:
    """Latents (batch, channels, height, width) as Flux's tokens: each 2x2 patch one token, channel by channel."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def position_ids(latents: torch.Tensor, first: float = 0.0) -> torch.Tensor:
    """Each token's position (``first``, row, column), as diffusers' ``_prepare_latent_image_ids``."""
    height, width = latents.shape[2] // 2, latents.shape[3] // 2
    ids = torch.zeros(height, width, 3, device=latents.device, dtype=latents.dtype)
    if first:
        ids[..., 0] = ids[..., 0] + first
    ids[..., 1] = ids[..., 1] + torch.arange(height, device=latents.device)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width, device=latents.device)[None, :]
    return ids.reshape(-1, 3)


class FluxTransformerModule(nn.Module):
    """Flux's transformer on unpacked latents: the 2x2 packing, the image and text position ids and the
    timestep's scaling to [0, 1] happen in the graph, as diffusers' FluxPipeline does them around it, so
    the loop steps the same latents as for every other family. Packing keeps a token's values channel by
    channel, so extra input channels (Fill's masked image and mask, Control's control image) packed with
    the latents are diffusers' packed tensors joined on the last axis; the output has the latents' channels.

    With ``reference`` (Flux Kontext), an input after the text is a reference image's latents: its tokens
    follow the image's in the sequence, with ids whose first coordinate is 1, and their output is dropped,
    as ``FluxKontextPipeline`` does."""

    def __init__(self, transformer: nn.Module, reference: bool = False):
        super().__init__()
        self.transformer = transformer
        self.reference = reference

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        *rest: torch.Tensor,
    ) -> tuple[torch.Tensor]:
        batch, _, height, width = sample.shape
        tokens, ids = packed(sample), position_ids(sample)
        image_tokens = tokens.shape[1]
        guidance = rest[1:] if self.reference else rest
        if self.reference:
            tokens = torch.cat([tokens, packed(rest[0])], dim=1)
            ids = torch.cat([ids, position_ids(rest[0], first=1.0)], dim=0)
        text_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=sample.device, dtype=sample.dtype)
        velocity = self.transformer(
            hidden_states=tokens,
            timestep=timestep / 1000,
            guidance=guidance[0] if guidance else None,
            pooled_projections=pooled_projections,
            encoder_hidden_states=encoder_hidden_states,
            txt_ids=text_ids,
            img_ids=ids,
            return_dict=False,
        )[0][:, :image_tokens]
        out_channels = self.transformer.out_channels // 4
        velocity = velocity.reshape(batch, height // 2, width // 2, out_channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return (velocity.reshape(batch, out_channels, height, width),)
