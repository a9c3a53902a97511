"""An IP-Adapter's scale as the IP denoiser takes it: one value per cross-attention layer.

A request's scale is a number, or per-block scales (InstantStyle's) as diffusers'
``set_ip_adapter_scale`` takes them, e.g. ``{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0,
1.0, 0.0]}}``. They are expanded with diffusers' own ``_maybe_expand_lora_scales`` (every part not
given is 0) and matched to the processors by name as ``set_ip_adapter_scale`` matches them. Before
that, ``scale_problems`` checks them against the UNet, by field: a block diffusers would silently
skip (one without attention layers, or none at all) is refused, and so is a list whose length
diffusers refuses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from engine.models.ip_adapter import cross_attention_processors

SIDES = ("down", "up")
"""The parts of a per-block scale that name blocks; ``mid`` is one block."""


def attention_blocks(unet: nn.Module) -> dict[str, tuple[list[str], int]]:
    """For ``down`` and ``up``: the blocks with attention layers (``block_1``...) and the attention layers
    each has, as ``_maybe_expand_lora_scales`` counts them."""
    layers = unet.config.layers_per_block
    return {
        side: (
            [
                f"block_{index}"
                for index, block in enumerate(getattr(unet, f"{side}_blocks"))
                if hasattr(block, "attentions")
            ],
            layers + 1 if side == "up" else layers,
        )
        for side in SIDES
    }


def scale_problems(scale: float | Mapping[str, Any], unet: nn.Module, field: str) -> list[str]:
    """Why per-block scales (already of the schema's shape) do not fit this UNet, one 'field: rule' each."""
    if not isinstance(scale, Mapping):
        return []
    problems = []
    for side, (blocks, count) in attention_blocks(unet).items():
        part = scale.get(side)
        given = part.items() if isinstance(part, Mapping) else [] if part is None else [(None, part)]
        for block, value in given:
            where = f"{field}.{side}" if block is None else f"{field}.{side}.{block}"
            if block is not None and block not in blocks:
                problems.append(f"{where}: this UNet's {side} blocks with attention layers are {', '.join(blocks)}")
            elif isinstance(value, list) and len(value) not in (1, count):
                problems.append(
                    f"{where}: takes one value, or one per attention layer of the block ({count}), got {len(value)}"
                )
    return problems


def layer_scales(scale: float | Mapping[str, Any], unet: nn.Module) -> tuple[float, ...]:
    """The scale of each cross-attention layer, in the order of ``cross_attention_processors``: what
    ``set_ip_adapter_scale`` gives each processor (the last name a processor's starts with wins)."""
    names = cross_attention_processors(unet)
    if not isinstance(scale, Mapping):
        return (float(scale),) * len(names)
    from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales

    expanded = _maybe_expand_lora_scales(unet, [dict(scale)], default_scale=0.0)[0]
    return tuple(float([value for prefix, value in expanded.items() if name.startswith(prefix)][-1]) for name in names)
