"""IP-Adapters as components: the CLIP image encoder, the adapter's image projection, and the IP denoiser.

An IP-Adapter file (diffusers' ``load_ip_adapter`` layout: ``image_proj.*`` and ``ip_adapter.*``
keys) has two parts. Its image projection turns the image encoder's output into a few tokens of
the UNet's cross-attention width; each is a component of its own (``ip_projection.<name>``), as is
each image encoder folder (``image_encoder.<folder>-<fingerprint>``). Its ``to_k_ip``/``to_v_ip`` matrices give every
cross-attention layer a second attention over those tokens, added at the request's scale: that is
the IP denoiser (``unet_ip``; ``unet_controlled_ip`` for the controlled UNet), the UNet with the
tokens (``ip_tokens``, any count) and the scales (``ip_scale``: one per cross-attention layer, as
diffusers' ``set_ip_adapter_scale`` sets each processor's, so one graph serves a plain number and
per-block InstantStyle scales) as inputs and diffusers' own ``IPAdapterAttnProcessor2_0`` in its
cross-attention layers. Its IP matrices are parameters like the UNet's, so switching adapters is a
weight patch (base + delta, as a LoRA switch); their base values are fixed placeholders, distinct
per matrix, so an export's weight map finds each by content. A request without image prompts runs
the plain UNet.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from engine.spec import ComponentSpec, TensorSpec

IP_DENOISER = "unet_ip"
"""The UNet variant with image-prompt inputs; it shares the UNet's weights, fingerprint and LoRAs."""
CONTROLLED_IP_DENOISER = "unet_controlled_ip"
"""The controlled UNet (ControlNet residuals) with the same image-prompt inputs, for steps where a
ControlNet acts in a request with image prompts."""
IP_DENOISERS = {
    IP_DENOISER: (1, False),
    CONTROLLED_IP_DENOISER: (1, True),
    "unet_ip2": (2, False),
    "unet_controlled_ip2": (2, True),
}
"""Every IP denoiser, with its adapter slots (one per IP-Adapter of a request, as diffusers loads a list of
them) and whether it is the controlled UNet's: four graphs and engines at most, whichever adapters."""
MATRICES = ("to_k_ip", "to_v_ip")
IMAGE_ENCODER_PREFIX = "image_encoder."
PROJECTION_PREFIX = "ip_projection."
IP_TOKENS = "ip_tokens"
IP_SCALE = "ip_scale"
IP_PARAMETERS = "ip."
"""The prefix of the IP denoiser's own parameters (its attention processors' ``to_k_ip``/``to_v_ip``)."""
PLACEHOLDER_STD = 0.02


@dataclass(frozen=True)
class AdapterLayout:
    """What an adapter file's keys say it is."""

    kind: str
    """plain (``ImageProjection``), plus (``IPAdapterPlusImageProjection``: Plus, Plus Face) or full
    (``IPAdapterFullImageProjection``: Full Face)."""
    tokens: int
    """Image tokens per image prompt (Full Face: one per hidden state of its encoder, 257 for ViT-H)."""
    cross_attention_dim: int
    embed_dim: int
    """The width of the image encoder output the projection reads."""

    @property
    def hidden_states(self) -> bool:
        """Whether the projection reads the encoder's penultimate hidden states (else its image embeds)."""
        return self.kind != "plain"


def adapter_layout(state: Mapping[str, Mapping[str, torch.Tensor]]) -> AdapterLayout:
    """The layout of a state dict split as diffusers splits it; ValueError, in words, for one it cannot serve."""
    projection, layers = state["image_proj"], state["ip_adapter"]
    if not projection or not layers:
        raise ValueError("it has no image_proj.* or no ip_adapter.* weights (diffusers' IP-Adapter layout)")
    width = layers["1.to_k_ip.weight"].shape[1] if "1.to_k_ip.weight" in layers else None
    if width is None:
        raise ValueError("it has no ip_adapter.1.to_k_ip.weight")
    # In the order diffusers' _convert_ip_adapter_image_proj_to_diffusers tells them apart.
    if "proj.weight" in projection:
        rows, embed = projection["proj.weight"].shape
        return AdapterLayout("plain", rows // width, width, embed)
    if "proj.3.weight" in projection:
        return AdapterLayout("full", 257, width, projection["proj.0.weight"].shape[0])
    if "perceiver_resampler.proj_in.weight" in projection or "norm.weight" in projection:
        raise ValueError("it is a FaceID adapter, which takes face embeddings rather than images; not supported")
    if "latents" in projection and "proj_in.weight" in projection:
        return AdapterLayout("plus", projection["latents"].shape[1], width, projection["proj_in.weight"].shape[1])
    raise ValueError("its image_proj.* keys match no IP-Adapter projection diffusers knows")


def split_state(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A file's tensors as ``load_ip_adapter`` splits them: ``image_proj`` and ``ip_adapter`` parts."""
    state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in tensors.items():
        part, _, rest = key.partition(".")
        if part in state:
            state[part][rest] = value
    return state


def image_encoder_spec(component: str, config: Mapping[str, Any]) -> ComponentSpec:
    """A CLIP vision encoder: preprocessed images in, the projected image embeds and the penultimate
    hidden states out (plain adapters read the first, Plus and Full Face the second)."""
    vision = config.get("vision_config", config)
    size, patch = vision["image_size"], vision["patch_size"]
    return ComponentSpec(
        name=component,
        inputs=(TensorSpec("pixel_values", ("ip_images", 3, size, size), value_range=(-2.0, 2.0)),),
        outputs=(
            TensorSpec("image_embeds", ("ip_images", config.get("projection_dim", vision.get("projection_dim")))),
            TensorSpec("hidden_states", ("ip_images", (size // patch) ** 2 + 1, vision["hidden_size"])),
        ),
    )


def projection_spec(component: str, layout: AdapterLayout, sequence: int) -> ComponentSpec:
    """An adapter's image projection: one image's encoder output in, its tokens out."""
    embeds = ("ip_images", sequence, layout.embed_dim) if layout.hidden_states else ("ip_images", layout.embed_dim)
    tokens = sequence if layout.kind == "full" else layout.tokens
    return ComponentSpec(
        name=component,
        inputs=(TensorSpec("image_embeds", embeds),),
        outputs=(TensorSpec(IP_TOKENS, ("ip_images", tokens, layout.cross_attention_dim)),),
    )


def ip_denoiser_spec(
    denoiser: ComponentSpec, component: str, cross_attention_dim: int, layers: int, slots: int = 1
) -> ComponentSpec:
    """A denoiser's spec with, as its last inputs, each adapter slot's image tokens (every image's, joined),
    then each slot's scales, one per cross-attention layer in the order of ``cross_attention_processors``."""
    tokens = [
        TensorSpec(slot_input(IP_TOKENS, slot), ("batch", slot_input(IP_TOKENS, slot), cross_attention_dim))
        for slot in range(slots)
    ]
    scales = [
        TensorSpec(slot_input(IP_SCALE, slot), (layers,), value_range=(0.0, 1.0), keep_fp32=True)
        for slot in range(slots)
    ]
    return replace(denoiser, name=component, inputs=(*denoiser.inputs, *tokens, *scales))


class ImageEncoderModule(nn.Module):
    """diffusers' ``encode_image``: the image embeds, and the penultimate hidden states."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(pixel_values, output_hidden_states=True)
        return out.image_embeds, out.hidden_states[-2]


class ProjectionModule(nn.Module):
    """An adapter's image projection, the module diffusers' loader makes of the file's ``image_proj`` part."""

    def __init__(self, projection: nn.Module):
        super().__init__()
        self.projection = projection

    def forward(self, image_embeds: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.projection(image_embeds),)


def load_projection(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> ProjectionModule:
    """The projection as ``load_ip_adapter`` builds it, with diffusers' converter."""
    from diffusers.loaders.unet import UNet2DConditionLoadersMixin

    projection = UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(
        None, dict(state), low_cpu_mem_usage=False
    )
    return ProjectionModule(projection.to(dtype).eval().requires_grad_(False))


def placeholder(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The base value of an IP matrix: random but fixed by its name, so every export and runner agrees."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator) * PLACEHOLDER_STD


def cross_attention_processors(unet: nn.Module) -> list[str]:
    """The UNet's cross-attention processors, in the order the adapter file numbers them (1, 3, 5...)."""
    return [name for name in unet.attn_processors if not name.endswith("attn1.processor")]


def ip_denoisers(adapters: int) -> tuple[str, str]:
    """The IP denoiser, and its controlled variant, for a request with ``adapters`` IP-Adapters."""
    plain, controlled = (name for name, kind in IP_DENOISERS.items() if kind[0] == adapters)
    return plain, controlled


def slot_input(name: str, slot: int) -> str:
    """An IP denoiser's input for its ``slot``-th adapter: ``ip_tokens``, ``ip_tokens_2``..."""
    return name if slot == 0 else f"{name}_{slot + 1}"


def adapter_parameter(index: int, matrix: str, slot: int = 0) -> str:
    """The IP denoiser's parameter for the ``index``-th cross-attention layer's ``to_k_ip`` or ``to_v_ip``
    of its ``slot``-th adapter."""
    return f"{IP_PARAMETERS}{index}.{matrix}.{slot}.weight"


def adapter_weights(state: Mapping[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """The file's ``ip_adapter`` part under the IP denoiser's parameter names (its first slot's)."""
    return {
        adapter_parameter(index, matrix): state[f"{2 * index + 1}.{matrix}.weight"]
        for index in range(layers)
        for matrix in MATRICES
    }


def slot_weights(weights: Mapping[str, torch.Tensor], slot: int) -> dict[str, torch.Tensor]:
    """An adapter's ``adapter_weights`` moved to the IP denoiser's ``slot``-th adapter."""
    layers = len(weights) // len(MATRICES)
    return {
        adapter_parameter(index, matrix, slot): weights[adapter_parameter(index, matrix)]
        for index in range(layers)
        for matrix in MATRICES
    }


class IPAdapterDenoiser(nn.Module):
    """A denoiser module (the UNet's, or the controlled UNet's) with an image-prompt attention in every
    cross-attention layer: diffusers' processors, holding placeholders until a patch sets an adapter's."""

    def __init__(self, inner: nn.Module, unet: nn.Module, slots: int = 1):
        super().__init__()
        from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

        self.unet = unet
        self._inner = (inner,)  # not a submodule: its parameters are ``unet``'s
        self.slots = slots
        config = unet.config
        names = cross_attention_processors(unet)
        self.ip = nn.ModuleList()
        layers = []
        device = next(unet.parameters()).device
        for index, name in enumerate(names):
            hidden = _hidden_size(name, config)
            ip = IPAdapterAttnProcessor2_0(hidden, config.cross_attention_dim, num_tokens=(1,) * slots)
            with torch.no_grad():
                for slot in range(slots):
                    for matrix in MATRICES:
                        weight = getattr(ip, matrix)[slot].weight
                        value = placeholder(adapter_parameter(index, matrix, slot), tuple(weight.shape))
                        weight.data = value.to(device)
            self.ip.append(ip.to(next(unet.parameters()).dtype))
            layers.append((unet.get_submodule(name.removesuffix(".processor")), ip))
        self._layers = tuple(layers)  # the UNet's cross-attention modules, each with its IP processor

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        split = len(inputs) - 2 * self.slots
        sample, timestep, text, *added = inputs[:split]
        tokens = list(inputs[split : split + self.slots])
        scales = torch.stack(inputs[split + self.slots :]).to(sample.dtype)  # (slots, layers)
        for processor, scale in zip(self.ip, scales.unbind(1), strict=True):
            processor.scale = list(scale.unbind(0))
        # The IP processors go into the cross-attention layers for this call only, so the plain UNet, which
        # shares the modules, runs untouched. Layer by layer: the UNet's set_attn_processor walks every
        # module twice a step (6.6 ms on SD 1.5's, against 0.36 ms for its 16 layers here).
        plain = [attention.processor for attention, _ in self._layers]
        for attention, ip in self._layers:
            attention.set_processor(ip)
        try:
            return self._inner[0](sample, timestep, (text, tokens), *added)
        finally:
            for (attention, _), processor in zip(self._layers, plain, strict=True):
                attention.set_processor(processor)


def _hidden_size(name: str, config: Any) -> int:
    """The width of the attention layer a processor name points at, as diffusers' loader reads it."""
    if name.startswith("mid_block"):
        return config.block_out_channels[-1]
    block = int(name[len("up_blocks.")]) if name.startswith("up_blocks") else int(name[len("down_blocks.")])
    channels = list(reversed(config.block_out_channels)) if name.startswith("up_blocks") else config.block_out_channels
    return channels[block]
