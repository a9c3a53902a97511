"""An IP-Adapter entry of a request: a file, its image prompts, and its scale, a number or per-block scales.

The scale takes what diffusers' ``set_ip_adapter_scale`` takes for one adapter: a number, or per-block
scales (InstantStyle's), ``{"down": ..., "mid": ..., "up": ...}``, where ``down`` and ``up`` are a
number, a list (one value per attention layer of a block, or one for all), or ``{"block_N": number
or list}``, and ``mid`` a number or a list of one. Here its shape and values are checked, every value
a finite number in 0..MAX_IP_ADAPTER_SCALE; admission checks its blocks and list lengths against the
model's UNet (``engine.models.ip_scales``). A problem names where it is, e.g.
``ip_adapters[0].scale.down.block_2[1]``, through the rule's ``at``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from engine.request.rules import rule

MAX_IP_ADAPTER_SCALE = 4.0
MAX_IP_ADAPTER_IMAGES = 4
"""Image prompts one IP-Adapter takes: their tokens are joined (4 per image for a plain adapter, 16 for Plus)."""
MAX_SCALE_BLOCKS = 8
"""Blocks one side of per-block scales may name (SD and SDXL have at most 3 with attention layers)."""
MAX_SCALE_LAYERS = 16
"""Values one list of per-block scales may hold (a block of SD or SDXL has at most 3 attention layers)."""
BLOCK_NAME = re.compile(r"block_[0-9]{1,3}")
"""A block's name as diffusers writes it (no UNet has a thousand blocks on one side)."""

Path = tuple[str | int, ...]
NUMBER = TypeAdapter(Annotated[float, Field(ge=0.0, le=MAX_IP_ADAPTER_SCALE, allow_inf_nan=False, strict=True)])


class IpAdapterEntry(BaseModel):
    """One IP-Adapter of a request: a file in IP_ADAPTER_DIR, its image prompt (or prompts), and its scale,
    as diffusers' ``set_ip_adapter_scale`` takes it for one adapter."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(min_length=1, description="a file in IP_ADAPTER_DIR, with or without .safetensors")
    image: str | None = Field(None, min_length=1, description="the image prompt: base64 or an http(s) URL")
    images: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, min_length=1, max_length=MAX_IP_ADAPTER_IMAGES, description="several image prompts, joined"
    )
    scale: float | dict[str, Any] = Field(1.0, description="a number, or per-block scales {down, mid, up}")

    @field_validator("scale", mode="plain")
    @classmethod
    def _check_scale(cls, scale: Any) -> float | dict[str, Any]:
        if isinstance(scale, dict):
            return _per_block(scale)
        return _number(scale, ())

    @model_validator(mode="after")
    def _one_source(self) -> IpAdapterEntry:
        if (self.image is None) == (self.images is None):
            raise rule("one_of", "give either image or images")
        return self

    @property
    def prompts(self) -> tuple[str, ...]:
        """The image prompts, one or several, in order."""
        return (self.image,) if self.image is not None else tuple(self.images or ())


def _per_block(scale: dict[Any, Any]) -> dict[str, Any]:
    """Per-block scales of the shape diffusers takes, every value checked."""
    checked: dict[str, Any] = {}
    for side, part in scale.items():
        if side not in ("down", "mid", "up"):
            raise rule("unknown", "per-block scales take down, mid and up only", at=(side,))
        if side == "mid":
            if isinstance(part, list) and len(part) != 1:
                raise rule(
                    "mid", "the mid block takes one value (diffusers refuses a list of {n})", n=len(part), at=(side,)
                )
            checked[side] = _layers(part, (side,))
        elif isinstance(part, dict):
            if len(part) > MAX_SCALE_BLOCKS:
                raise rule("too_many", "at most {n} blocks", n=MAX_SCALE_BLOCKS, at=(side,))
            for block in part:
                if not isinstance(block, str) or not BLOCK_NAME.fullmatch(block):
                    raise rule("block", "blocks are named block_0, block_1...", at=(side, str(block)))
            checked[side] = {block: _layers(value, (side, block)) for block, value in part.items()}
        else:
            checked[side] = _layers(part, (side,))
    return checked


def _layers(value: Any, at: Path) -> float | list[float]:
    """A number, or a list of them: one per attention layer of a block (or one for all)."""
    if not isinstance(value, list):
        return _number(value, at)
    if not 1 <= len(value) <= MAX_SCALE_LAYERS:
        raise rule("length", "a list of 1 to {n} values", n=MAX_SCALE_LAYERS, at=at)
    return [_number(item, (*at, index)) for index, item in enumerate(value)]


def _number(value: Any, at: Path) -> float:
    """A scale's value: a finite number in 0..MAX_IP_ADAPTER_SCALE, as pydantic words the rule."""
    try:
        return NUMBER.validate_python(value)
    except ValidationError as error:
        found = error.errors(include_url=False)[0]
        message = found["msg"] if at or isinstance(value, int | float) else "must be a number or per-block scales"
        raise rule(found["type"], message, at=at) from None
