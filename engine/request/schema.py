"""The request schema: types, ranges and defaults, with errors that name the field and the rule.

Limits that depend on the deployment (largest image, most steps) and on the model
(native size) come in as validation context (``engine.request.limits``), so one schema
serves every endpoint.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from engine.common.errors import RequestError
from engine.prompts.syntax import PromptSyntax
from engine.request.entries import ControlImageEntry, ControlNetEntry, LoraEntry
from engine.request.ip_adapter_entry import IpAdapterEntry
from engine.request.limits import Limits
from engine.request.resolved import ResolvedRequest
from engine.request.rules import MAX_SEED, cross_field_problems, rule
from engine.schedulers import offered_name

MAX_PROMPT_CHARS = 10_000


def text_list(value: Any) -> Any:
    """A prompt is a string or a list of strings; anything else gets one clear message."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return value
    if isinstance(value, list) and not value:
        raise PydanticCustomError("empty", "must not be an empty list")
    raise PydanticCustomError("text", "must be a string or a list of strings")


TextList = Annotated[list[str], BeforeValidator(text_list)]


def _limits(info: ValidationInfo) -> Limits:
    if not isinstance(info.context, Limits):
        raise TypeError("GenerateRequest is validated with Limits as context")
    return info.context


class GenerateRequest(BaseModel):
    """One generation job's input, as sent in RunPod's ``job["input"]``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    prompt: TextList
    negative_prompt: TextList | None = None
    prompt_syntax: PromptSyntax | None = Field(
        None,
        description="a1111: (weights), [less] and BREAK as AUTOMATIC1111 reads them; plain: text as is. "
        "Default: a1111 where the model's family reads it, else plain",
    )
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = Field(None, ge=0.0, le=50.0)
    true_cfg_scale: float | None = Field(
        None, ge=1.0, le=50.0, description="Flux: classifier-free guidance with negative_prompt, above 1"
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    num_images: int = Field(1, ge=1)
    scheduler: str | None = Field(
        None, max_length=64, description="a name in any accepted style; bounded, since a refusal quotes it"
    )
    eta: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="the stochasticity of schedulers that take it (tcd, ddim); default tcd 0.3, ddim 0",
    )
    output_format: Literal["png", "jpeg", "webp"] = "png"
    quality: int = Field(90, ge=1, le=100, description="jpeg and webp quality")
    timeout_s: float | None = Field(None, gt=0)
    image: str | None = Field(None, min_length=1, description="image-to-image input: base64 or an http(s) URL")
    strength: float | None = Field(None, gt=0.0, le=1.0, description="how much of the image is re-noised")
    mask: str | None = Field(
        None, min_length=1, description="inpainting: white repaints, black keeps; base64 or an http(s) URL"
    )
    padding_mask_crop: int | None = Field(
        None, ge=0, description="inpaint a crop around the mask, this many pixels wider, and paste it back"
    )
    loras: list[LoraEntry] | None = Field(None, description="LoRAs applied for this request, each with its scale")
    controlnets: list[ControlNetEntry] | None = Field(
        None, description="ControlNets steering this request, each with its control image"
    )
    control: ControlImageEntry | None = Field(
        None, description="Flux Control (Canny, Depth) models: the control image, with preprocess canny the photo"
    )
    ip_adapters: list[IpAdapterEntry] | None = Field(
        None, description="IP-Adapters: image prompts, each adapter with its images and scale"
    )

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _check_texts(cls, texts: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if texts is not None and any(len(text) > MAX_PROMPT_CHARS for text in texts):
            raise rule("too_long", "each must be at most {n} characters", n=MAX_PROMPT_CHARS)
        if info.field_name == "prompt" and texts is not None and len(texts) > _limits(info).max_prompts:
            raise rule("too_many", "at most {n} prompts per request", n=_limits(info).max_prompts)
        return texts

    @field_validator("width", "height")
    @classmethod
    def _check_side(cls, side: int | None, info: ValidationInfo) -> int | None:
        limits = _limits(info)
        if side is None:
            return side
        if side % limits.size_multiple:
            raise rule("multiple_of", "must be a multiple of {n}, got {v}", n=limits.size_multiple, v=side)
        if not limits.min_side <= side <= limits.max_side:
            raise rule("range", "must be {lo} to {hi}, got {v}", lo=limits.min_side, hi=limits.max_side, v=side)
        return side

    @field_validator("num_inference_steps")
    @classmethod
    def _check_steps(cls, steps: int | None, info: ValidationInfo) -> int | None:
        if steps is not None and not 1 <= steps <= _limits(info).max_steps:
            raise rule("range", "must be 1 to {n}, got {v}", n=_limits(info).max_steps, v=steps)
        return steps

    @field_validator("num_images")
    @classmethod
    def _check_images(cls, count: int, info: ValidationInfo) -> int:
        if count > _limits(info).max_images:
            raise rule("range", "must be 1 to {n}, got {v}", n=_limits(info).max_images, v=count)
        return count

    @field_validator("scheduler")
    @classmethod
    def _check_scheduler(cls, name: str | None, info: ValidationInfo) -> str | None:
        """Our name for the scheduler, typed in any accepted style (see ``engine.schedulers``)."""
        if name is None:
            return None
        names = _limits(info).schedulers
        found = offered_name(name, names)
        if found not in names:
            raise rule(
                "unknown",
                "must be one of {names} for this model (or an AUTOMATIC1111 or ComfyUI name for one, "
                "such as 'DPM++ 2M Karras'), got '{v}'",
                names=", ".join(names),
                v=name,
            )
        return found

    @field_validator("prompt_syntax")
    @classmethod
    def _check_syntax(cls, syntax: PromptSyntax | None, info: ValidationInfo) -> PromptSyntax | None:
        syntaxes = _limits(info).prompt_syntaxes
        if syntax is not None and syntax not in syntaxes:
            raise rule("unsupported", "this model reads prompts as {names} only", names=" or ".join(syntaxes))
        return syntax

    @field_validator("loras")
    @classmethod
    def _check_loras(cls, loras: list[LoraEntry] | None, info: ValidationInfo) -> list[LoraEntry] | None:
        if loras is not None and len(loras) > _limits(info).max_loras:
            raise rule("too_many", "at most {n} LoRAs per request, got {v}", n=_limits(info).max_loras, v=len(loras))
        return loras

    @field_validator("controlnets")
    @classmethod
    def _check_controlnets(
        cls, entries: list[ControlNetEntry] | None, info: ValidationInfo
    ) -> list[ControlNetEntry] | None:
        limit = _limits(info).max_controlnets
        if entries is not None and len(entries) > limit:
            raise rule("too_many", "at most {n} per request (MAX_CONTROLNETS), got {v}", n=limit, v=len(entries))
        return entries

    @field_validator("ip_adapters")
    @classmethod
    def _check_ip_adapters(
        cls, entries: list[IpAdapterEntry] | None, info: ValidationInfo
    ) -> list[IpAdapterEntry] | None:
        limit = _limits(info).max_ip_adapters
        if entries is not None and len(entries) > limit:
            raise rule("too_many", "at most {n} per request (MAX_IP_ADAPTERS), got {v}", n=limit, v=len(entries))
        return entries

    @field_validator("timeout_s")
    @classmethod
    def _check_timeout(cls, timeout: float | None, info: ValidationInfo) -> float | None:
        if timeout is not None and timeout > _limits(info).max_timeout_s:
            raise rule("range", "must be at most {n} seconds", n=_limits(info).max_timeout_s)
        return timeout

    @model_validator(mode="after")
    def _check_together(self, info: ValidationInfo) -> GenerateRequest:
        """Rules that span fields, once every field is valid on its own."""
        problems = cross_field_problems({name: getattr(self, name) for name in type(self).model_fields}, _limits(info))
        if problems:
            raise RequestError("; ".join(problems))
        return self

    def resolved(self, limits: Limits, image_size: tuple[int, int] | None = None) -> ResolvedRequest:
        """Every default filled in; an input image's size (rounded down to a multiple of 8) is the default size."""
        step = limits.size_multiple
        width = self.width or (image_size[0] // step * step if image_size else limits.native_size)
        height = self.height or (image_size[1] // step * step if image_size else limits.native_size)
        if width * height > limits.max_pixels:
            field = "image" if image_size and not (self.width and self.height) else "width"
            raise RequestError(f"{field}: {width}x{height} is more than {limits.max_pixels} pixels")
        prompts = list(self.prompt)
        negatives = self.negative_prompt
        if negatives is not None and len(negatives) == 1:
            negatives = negatives * len(prompts)
        return ResolvedRequest(
            prompts=prompts,
            negative_prompts=negatives,
            images_per_prompt=self.num_images,
            width=width,
            height=height,
            steps=self.num_inference_steps or limits.default_steps,
            guidance_scale=limits.default_guidance_scale if self.guidance_scale is None else self.guidance_scale,
            true_cfg_scale=self.true_cfg_scale,
            seed=self.seed,
            scheduler=self.scheduler,
            eta=self.eta,
            output_format=self.output_format,
            quality=self.quality,
            timeout_s=min(self.timeout_s or limits.max_timeout_s, limits.max_timeout_s),
            image=self.image,
            strength=limits.default_strength(self.mask is not None) if self.strength is None else self.strength,
            loras=tuple(self.loras or ()),
            prompt_syntax=self.prompt_syntax or limits.prompt_syntaxes[0],
            mask=self.mask,
            padding_mask_crop=self.padding_mask_crop,
            controlnets=tuple(self.controlnets or ()),
            control=self.control,
            ip_adapters=tuple(self.ip_adapters or ()),
        )
