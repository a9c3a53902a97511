"""ControlNets as components: their residual layout, their specs, and the UNet that takes them.

A ControlNet (diffusers' ``ControlNetModel``) copies its UNet's encoder and returns one
residual per down-block output plus one for the mid block. The worker runs each ControlNet
as its own component, sums their residuals scaled per request, and hands them to a
controlled variant of the UNet whose extra inputs are those residuals. Whether a ControlNet
fits a model is read from the two configs, never from a name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.models.modules import GUIDANCE_EMBEDDING, unet_conditioning, weights_variant
from engine.spec import ComponentSpec, TensorSpec, downsampled

CONTROLLED_UNET = "unet_controlled"
"""The UNet variant with residual inputs; it shares the UNet's weights, fingerprint and LoRAs."""
CONTROLNET_PREFIX = "controlnet."
CONTROLNET_CLASS = "ControlNetModel"
MID_RESIDUAL = "mid_residual"


def controlnet_component(name: str) -> str:
    return f"{CONTROLNET_PREFIX}{name}"


def is_controlnet(component: str) -> bool:
    return component.startswith(CONTROLNET_PREFIX)


@dataclass(frozen=True)
class ResidualLayout:
    """Channels and downsampling factor of each down-block residual, then of the mid block's."""

    down: tuple[tuple[int, int], ...]
    mid: tuple[int, int]

    @classmethod
    def of(cls, config: dict[str, Any]) -> ResidualLayout:
        """From a UNet2DConditionModel or ControlNetModel config, which describe their encoders alike:
        conv_in's output, each block's resnets, and a downsampler after every block but the last."""
        channels = list(config["block_out_channels"])
        layers = config["layers_per_block"]
        layers = [layers] * len(channels) if isinstance(layers, int) else list(layers)
        down = [(channels[0], 1)]
        for index, width in enumerate(channels):
            down += [(width, 2**index)] * layers[index]
            if index < len(channels) - 1:
                down.append((width, 2 ** (index + 1)))
        return cls(tuple(down), (channels[-1], 2 ** (len(channels) - 1)))

    def specs(self) -> tuple[TensorSpec, ...]:
        def residual(name: str, channels: int, factor: int) -> TensorSpec:
            height, width = downsampled("latent_height", factor), downsampled("latent_width", factor)
            return TensorSpec(name, ("batch", channels, height, width))

        down = tuple(residual(f"down_residual_{i}", *entry) for i, entry in enumerate(self.down))
        return (*down, residual(MID_RESIDUAL, *self.mid))


def read_controlnet_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text())


def mismatches(unet: dict[str, Any], controlnet: dict[str, Any], latent_channels: int) -> list[str]:
    """Why a ControlNet's residuals cannot feed this UNet, in words; empty when they can."""
    if controlnet.get("_class_name") != CONTROLNET_CLASS:
        return [f"it is a {controlnet.get('_class_name')!r}, not a {CONTROLNET_CLASS}"]
    found = []
    checks = (
        ("cross-attention width", "cross_attention_dim"),
        ("added conditioning", "addition_embed_type"),
        ("added embedding width", "projection_class_embeddings_input_dim"),
    )
    for words, key in checks:
        if controlnet.get(key) != unet.get(key):
            found.append(f"{words} {controlnet.get(key)} where the UNet has {unet.get(key)}")
    if ResidualLayout.of(controlnet) != ResidualLayout.of(unet):
        found.append(f"block widths {controlnet['block_out_channels']} where the UNet has {unet['block_out_channels']}")
    if controlnet.get("in_channels") != latent_channels:
        found.append(f"{controlnet.get('in_channels')} latent channels where the VAE has {latent_channels}")
    if controlnet.get("conditioning_channels", 3) != 3:
        found.append(f"a {controlnet['conditioning_channels']}-channel control image, not RGB")
    return found


def controlnet_spec(component: str, unet: ComponentSpec, controlnet: dict[str, Any]) -> ComponentSpec:
    """The UNet's inputs (the latents with the ControlNet's own channels) plus the control image
    in [0, 1] at image size; the residuals out."""
    _, timestep, *conditioning = unet.inputs
    conditioning = [tensor for tensor in conditioning if tensor.name != GUIDANCE_EMBEDDING]  # the UNet's alone
    sample = TensorSpec("sample", ("batch", controlnet["in_channels"], "latent_height", "latent_width"))
    image = TensorSpec("controlnet_cond", ("batch", 3, "height", "width"), value_range=(0.0, 1.0))
    residuals = ResidualLayout.of(controlnet).specs()
    return replace(unet, name=component, inputs=(sample, timestep, *conditioning, image), outputs=residuals)


def controlled_unet_spec(unet: ComponentSpec, unet_config: dict[str, Any]) -> ComponentSpec:
    return replace(unet, name=CONTROLLED_UNET, inputs=(*unet.inputs, *ResidualLayout.of(unet_config).specs()))


class ControlNetModule(nn.Module):
    """A ControlNet at scale 1: the request's scale multiplies its residuals outside the graph, so
    one export serves every scale."""

    def __init__(self, controlnet: nn.Module, added_cond_names: tuple[str, ...]):
        super().__init__()
        self.controlnet = controlnet
        self.added_cond_names = tuple(name for name in added_cond_names if name != GUIDANCE_EMBEDDING)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, *rest: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        *added, image = rest
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states,
            controlnet_cond=image,
            added_cond_kwargs=dict(zip(self.added_cond_names, added, strict=True)) or None,
            return_dict=False,
        )
        return (*down, mid)


class ControlledUNetModule(nn.Module):
    """The UNet with ControlNet residuals added to its skip connections and mid block."""

    def __init__(self, unet: nn.Module, added_cond_names: tuple[str, ...]):
        super().__init__()
        self.unet = unet
        self.added_cond_names = added_cond_names

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, *rest: torch.Tensor
    ) -> tuple[torch.Tensor]:
        added, residuals = rest[: len(self.added_cond_names)], rest[len(self.added_cond_names) :]
        noise_pred = self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            **unet_conditioning(self.added_cond_names, tuple(added), sample.shape[0]),
            down_block_additional_residuals=tuple(residuals[:-1]),
            mid_block_additional_residual=residuals[-1],
            return_dict=False,
        )[0]
        return (noise_pred,)


def load_controlnet(folder: Path, dtype: torch.dtype, added_cond_names: tuple[str, ...]) -> ControlNetModule:
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_pretrained(folder, torch_dtype=dtype, variant=weights_variant(folder, dtype))
    return ControlNetModule(controlnet.eval().requires_grad_(False), added_cond_names)
