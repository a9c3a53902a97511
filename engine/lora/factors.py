"""A LoRA file as low-rank factors per torch parameter, read with diffusers' own loaders.

diffusers reads every format it knows (its PEFT layout, kohya/A1111 ``lora_unet_…`` keys
with ``alpha``, SDXL's ``lora_te1_``/``lora_te2_``) into one layout with ``lora_state_dict``,
and turns it into PEFT's with its converters. The rank and alpha of each module come
from diffusers' ``get_peft_kwargs`` (or the file's own adapter metadata) and PEFT's
pattern rule, so the scaling is exactly what ``load_lora_weights`` would use. The
factors stay low-rank until a backend asks for a dense delta.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import RequestError

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
TEXT_MODEL = "text_model."


@dataclass(frozen=True)
class LoraTarget:
    """Where a component's part of a LoRA file lives, and where its parameters are in our module."""

    prefix: str
    """The key prefix in diffusers' layout: ``unet``, ``text_encoder``, ``text_encoder_2``."""
    module_prefix: str
    """The component's module inside the wrapper the backends run (``unet.``, ``encoder.``)."""
    is_unet: bool


@dataclass(frozen=True)
class LowRank:
    """One module's LoRA; the dense delta is ``scaling * up @ down`` (for convolutions, as PEFT composes it)."""

    down: torch.Tensor
    up: torch.Tensor
    scaling: float

    @property
    def shape(self) -> tuple[int, ...]:
        if self.down.ndim == 2:
            return (self.up.shape[0], self.down.shape[1])
        return (self.up.shape[0], *self.down.shape[1:])

    def delta(self, device: torch.device) -> torch.Tensor:
        """fp32, as PEFT's ``get_delta_weight`` computes it."""
        down = self.down.to(device=device, dtype=torch.float32)
        up = self.up.to(device=device, dtype=torch.float32)
        if down.ndim == 2:
            return (up @ down) * self.scaling
        if down.shape[2:] == (1, 1):
            return (up.flatten(1) @ down.flatten(1)).reshape(self.shape) * self.scaling
        return torch.nn.functional.conv2d(down.transpose(0, 1), up).transpose(0, 1) * self.scaling


@dataclass(frozen=True)
class LoraWeights:
    """One LoRA file's factors: component -> parameter name in the component's module -> factors."""

    label: str
    sha256: str
    components: dict[str, dict[str, LowRank]]


def pattern_key(patterns: Mapping[str, Any], module: str) -> str:
    """The first of ``patterns`` that names ``module``, by PEFT's rule (``peft.utils.other.get_pattern_key``:
    the pattern matches the module's full name or a dotted suffix of it, as a regular expression).

    PEFT itself is not imported: once installed, diffusers imports it with its model classes,
    which adds more than a second to every cold start; tests check the rule against PEFT's.
    """
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", module)), module)


def read_lora(
    path: Path,
    label: str,
    sha256: str,
    loader: Any,
    targets: Mapping[str, LoraTarget],
    parameters: Mapping[str, Mapping[str, tuple[int, ...]]],
    unet_config: Mapping[str, Any],
    field: str,
) -> LoraWeights:
    """Reads ``path`` with ``loader`` (the family's diffusers LoRA loader mixin) and checks every factor
    against the model's parameters (component -> name -> shape); any mismatch is a RequestError."""
    from diffusers.configuration_utils import FrozenDict

    try:
        state_dict, alphas, metadata = loader.lora_state_dict(
            str(path), unet_config=FrozenDict(unet_config), return_lora_metadata=True
        )
    except Exception as error:  # diffusers raises ValueError, KeyError... for what it cannot read
        raise RequestError(f"{field}: diffusers cannot read it as a LoRA ({type(error).__name__}: {error})") from None
    known = tuple(f"{target.prefix}." for target in targets.values())
    foreign = sorted({key.split(".")[0] for key in state_dict if not key.startswith(known)})
    if foreign:
        raise RequestError(
            f"{field}: it has weights for {', '.join(foreign)}, which this model does not have "
            f"(is it a LoRA for another model family?)"
        )
    components = {}
    for component, target in targets.items():
        factors = _component_factors(state_dict, alphas, metadata, target, parameters[component], field)
        if factors:
            components[component] = factors
    if not components:
        raise RequestError(f"{field}: it holds no LoRA weights for this model")
    return LoraWeights(label, sha256, components)


def _component_factors(
    state_dict: Mapping[str, torch.Tensor],
    alphas: Mapping[str, float] | None,
    metadata: Mapping[str, Any] | None,
    target: LoraTarget,
    parameters: Mapping[str, tuple[int, ...]],
    field: str,
) -> dict[str, LowRank]:
    """The steps of diffusers' ``load_lora_adapter`` (UNet) and ``_load_lora_into_text_encoder``,
    up to the LoRA config, then PEFT's rank and alpha lookup per module."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )
    from diffusers.utils.peft_utils import get_peft_kwargs

    prefix = f"{target.prefix}."
    own = {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}
    if not own:
        return {}
    own_alphas = {k.removeprefix(prefix): v for k, v in (alphas or {}).items() if k.split(".")[0] == target.prefix}
    own_metadata = {k.removeprefix(prefix): v for k, v in (metadata or {}).items() if k.startswith(prefix)} or None
    if target.is_unet:
        if "lora_A" not in next(iter(own)):
            own = convert_unet_state_dict_to_peft(own)
        rank = {f"^{key}": value.shape[1] for key, value in own.items() if "lora_B" in key and value.ndim > 1}
    else:
        own = convert_state_dict_to_peft(convert_state_dict_to_diffusers(own))
        if not any(name.startswith(f"{target.module_prefix}{TEXT_MODEL}") for name in parameters):
            own = {key.removeprefix(TEXT_MODEL): value for key, value in own.items()}
        rank = {key: value.shape[1] for key, value in own.items() if key.endswith(LORA_B)}
    unsupported = sorted({key for key in own if not key.endswith((LORA_A, LORA_B))})
    if unsupported:
        raise RequestError(
            f"{field}: only plain LoRA weights are supported, it also has {', '.join(unsupported[:3])} "
            f"({len(unsupported)} such keys: DoRA, LoKr, biases or full weights)"
        )
    config = own_metadata or get_peft_kwargs(rank, own_alphas or None, own, is_unet=target.is_unet)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    factors = {}
    for key in sorted(own):
        if not key.endswith(LORA_A):
            continue
        module = key.removesuffix(LORA_A)
        up = own.get(f"{module}{LORA_B}")
        if up is None:
            raise RequestError(f"{field}: {target.prefix}.{module} has lora_A without lora_B")
        r = rank_pattern.get(pattern_key(rank_pattern, module), config["r"])
        alpha = alpha_pattern.get(pattern_key(alpha_pattern, module), config["lora_alpha"])
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        low_rank = LowRank(own[key], up, float(scaling))
        name = f"{target.module_prefix}{module}.weight"
        shape = parameters.get(name)
        if shape is None:
            raise RequestError(f"{field}: it changes {target.prefix}.{module}, which this model does not have")
        if tuple(shape) != low_rank.shape:
            raise RequestError(
                f"{field}: it changes {target.prefix}.{module} to shape {list(low_rank.shape)}, the model's is "
                f"{list(shape)} (is it a LoRA for another model?)"
            )
        factors[name] = low_rank
    return factors
