"""A LoRA file as low-rank factors per torch parameter, read with diffusers' own loaders.

diffusers reads every format it knows (its PEFT layout, kohya/A1111 ``lora_unet_…`` keys
with ``alpha``, SDXL's ``lora_te1_``/``lora_te2_``) into one layout with ``lora_state_dict``,
and turns it into PEFT's with its converters. The rank and alpha of each module come
from diffusers' ``get_peft_kwargs`` (or the file's own adapter metadata) and PEFT's
pattern rule, so the scaling is exactly what ``load_lora_weights`` would use. The
factors stay low-rank until a backend asks for a dense delta; every one is checked first
(dimensions, ranks, values, alpha, the size of the change it makes), so a file no backend
could apply is a request error and never a backend's failure.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.common.errors import RequestError
from engine.lora.files import shown
from engine.models.family import LoraTarget

log = logging.getLogger(__name__)

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"
TEXT_MODEL = "text_model."
MAX_WEIGHT_CHANGE = 10.0
"""The most one file, at scale 1, may change any one weight by (as bounded by ``LowRank.largest_change``).
Trained LoRAs change weights by well under 1, the tests' random ones (stronger, to be seen on tiny
images) by under 0.5; factors scaled by 1e20 or a kohya alpha of 1e30 are refused. With a request's
largest scale (4) on each of up to 4 LoRAs, a weight moves by at most 160: finite in fp16."""


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

    def largest_change(self) -> float:
        """A bound on the largest entry of the delta: by Cauchy-Schwarz, each entry is at most |scaling| times
        a row norm of ``up`` times a column norm of ``down`` (flattened over a kernel's positions)."""
        rows = self.up.double().flatten(1).norm(dim=1).max()
        columns = self.down.double().flatten(1).norm(dim=0).max()
        return float(abs(self.scaling) * rows * columns)

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
    against the model's parameters (component -> name -> shape), all before any is used; any problem is a
    RequestError naming ``field``, the file and the key."""
    from diffusers.configuration_utils import FrozenDict

    where = f"{field}: {shown(label)}"
    try:
        state_dict, alphas, metadata = loader.lora_state_dict(
            str(path), unet_config=FrozenDict(unet_config), return_lora_metadata=True
        )
    except Exception as error:  # diffusers raises ValueError, KeyError... for what it cannot read
        log.info("%s: lora_state_dict failed on %s: %s", field, path, error)
        raise RequestError(f"{where}: diffusers cannot read it as a LoRA ({type(error).__name__})") from None
    known = tuple(f"{target.prefix}." for target in targets.values())
    foreign = sorted({key.split(".")[0] for key in state_dict if not key.startswith(known)})
    if foreign:
        raise RequestError(
            f"{where}: it has weights for {', '.join(foreign)}, which this model does not have "
            f"(is it a LoRA for another model family?)"
        )
    components = {}
    for component, target in targets.items():
        factors = _component_factors(state_dict, alphas, metadata, target, parameters[component], where)
        if factors:
            components[component] = factors
    if not components:
        raise RequestError(f"{where}: it holds no LoRA weights for this model")
    return LoraWeights(label, sha256, components)


def _component_factors(
    state_dict: Mapping[str, torch.Tensor],
    alphas: Mapping[str, float] | None,
    metadata: Mapping[str, Any] | None,
    target: LoraTarget,
    parameters: Mapping[str, tuple[int, ...]],
    where: str,
) -> dict[str, LowRank]:
    """The steps of diffusers' ``load_lora_adapter`` (UNet) and ``_load_lora_into_text_encoder``,
    up to the LoRA config, then PEFT's rank and alpha lookup per module."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    prefix = f"{target.prefix}."
    own = {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}
    if not own:
        return {}
    own_alphas = {k.removeprefix(prefix): v for k, v in (alphas or {}).items() if k.split(".")[0] == target.prefix}
    own_metadata = {k.removeprefix(prefix): v for k, v in (metadata or {}).items() if k.startswith(prefix)} or None
    if target.is_unet:
        if "lora_A" not in next(iter(own)):
            own = convert_unet_state_dict_to_peft(own)
    else:
        own = convert_state_dict_to_peft(convert_state_dict_to_diffusers(own))
        if not any(name.startswith(f"{target.module_prefix}{TEXT_MODEL}") for name in parameters):
            own = {key.removeprefix(TEXT_MODEL): value for key, value in own.items()}
    unsupported = sorted({key for key in own if not key.endswith((LORA_A, LORA_B))})
    if unsupported:
        raise RequestError(
            f"{where}: only plain LoRA weights are supported, it also has {', '.join(unsupported[:3])} "
            f"({len(unsupported)} such keys: DoRA, LoKr, biases or full weights)"
        )
    for module in sorted({key.removesuffix(LORA_A).removesuffix(LORA_B) for key in own}):
        _check_pair(own.get(f"{module}{LORA_A}"), own.get(f"{module}{LORA_B}"), f"{target.prefix}.{module}", where)
    if target.is_unet:
        rank = {f"^{key}": value.shape[1] for key, value in own.items() if key.endswith(LORA_B)}
    else:
        rank = {key: value.shape[1] for key, value in own.items() if key.endswith(LORA_B)}
    config = own_metadata or _peft_kwargs(rank, own_alphas, own, target, where)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    factors = {}
    for key in sorted(own):
        if not key.endswith(LORA_A):
            continue
        module = key.removesuffix(LORA_A)
        r = rank_pattern.get(pattern_key(rank_pattern, module), config.get("r"))
        alpha = alpha_pattern.get(pattern_key(alpha_pattern, module), config.get("lora_alpha"))
        low_rank = LowRank(
            own[key], own[f"{module}{LORA_B}"], _scaling(r, alpha, config, f"{target.prefix}.{module}", where)
        )
        name = f"{target.module_prefix}{module}.weight"
        shape = parameters.get(name)
        if shape is None:
            raise RequestError(f"{where}: it changes {target.prefix}.{module}, which this model does not have")
        if tuple(shape) != low_rank.shape:
            raise RequestError(
                f"{where}: it changes {target.prefix}.{module} to shape {list(low_rank.shape)}, the model's is "
                f"{list(shape)} (is it a LoRA for another model?)"
            )
        change = low_rank.largest_change()
        if not change <= MAX_WEIGHT_CHANGE:
            raise RequestError(
                f"{where}: {target.prefix}.{module} can change a weight by up to {change:.3g} (scaling "
                f"{low_rank.scaling:.3g}); a LoRA may change one by at most {MAX_WEIGHT_CHANGE:g}"
            )
        factors[name] = low_rank
    return factors


def _check_pair(down: torch.Tensor | None, up: torch.Tensor | None, module: str, where: str) -> None:
    """One module's factors, checked before any arithmetic: both there, both matrices (linear) or both
    4-D with a 1x1 ``lora_B`` (convolution, as PEFT composes them), one rank > 0, every value finite."""
    if down is None or up is None:
        have, lack = ("lora_A", "lora_B") if up is None else ("lora_B", "lora_A")
        raise RequestError(f"{where}: {module} has {have} without {lack}")
    if down.ndim not in (2, 4) or up.ndim != down.ndim or (up.ndim == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise RequestError(
            f"{where}: {module} has lora_A of shape {list(down.shape)} and lora_B of shape {list(up.shape)}; "
            f"a LoRA's are two matrices, or 4-D with a 1x1 lora_B for a convolution"
        )
    if down.shape[0] != up.shape[1]:
        raise RequestError(
            f"{where}: {module} has lora_A of rank {down.shape[0]} and lora_B of rank {up.shape[1]}; they must agree"
        )
    if down.shape[0] == 0:
        raise RequestError(f"{where}: {module} has rank 0")
    for suffix, factor in ((LORA_A, down), (LORA_B, up)):
        if not bool(torch.isfinite(factor).all()):
            raise RequestError(f"{where}: {module}{suffix} holds NaN or infinite values")


def _peft_kwargs(
    rank: dict[str, int],
    alphas: Mapping[str, float],
    own: Mapping[str, torch.Tensor],
    target: LoraTarget,
    where: str,
) -> dict[str, Any]:
    """diffusers' LoRA config for these factors (rank and alpha per module)."""
    from diffusers.utils.peft_utils import get_peft_kwargs

    try:
        return get_peft_kwargs(rank, alphas or None, own, is_unet=target.is_unet)
    except Exception as error:  # whatever diffusers raises for alphas it cannot match
        log.info("%s: get_peft_kwargs failed: %s", where, error)
        raise RequestError(f"{where}: diffusers cannot read its ranks and alphas ({type(error).__name__})") from None


def _scaling(r: Any, alpha: Any, config: Mapping[str, Any], module: str, where: str) -> float:
    """PEFT's scaling, alpha / r (alpha / sqrt(r) with rsLoRA), once both are positive finite numbers."""
    for what, value in (("rank", r), ("alpha", alpha)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise RequestError(f"{where}: {module} has {what} {value!r}; it must be a positive finite number")
    return float(alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)
