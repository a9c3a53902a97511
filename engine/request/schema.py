"""The request schema: types, ranges and defaults, with errors that name the field and the rule.

Limits that depend on the deployment (largest image, most steps) and on the model
(native size) come in as validation context, so one schema serves every endpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from engine.common.errors import RequestError
from engine.prompts.syntax import PromptSyntax, weight_problems
from engine.request.resolved import CANNY_THRESHOLDS, ControlNetRequest, LoraRequest, ResolvedRequest
from engine.schedulers import SCHEDULER_NAMES
from engine.settings import Settings

MAX_SEED = 2**63 - 1
MAX_LORA_SCALE = 4.0
MAX_CONTROLNET_SCALE = 4.0
MAX_CANNY_THRESHOLD = 2000.0
MAX_PROMPT_CHARS = 10_000
DEFAULT_STRENGTH = 0.8


@dataclass(frozen=True)
class Limits:
    """Deployment and model limits a request is checked against."""

    native_size: int
    default_steps: int
    default_guidance_scale: float
    min_side: int
    max_side: int
    max_pixels: int
    max_steps: int
    max_images: int
    max_prompts: int
    max_timeout_s: float
    max_loras: int = 4
    max_controlnets: int = 2
    max_prompt_weight: float = 3.0
    inpaint_strength: float = 1.0
    """The family's inpainting default, as its diffusers pipeline has it."""
    schedulers: tuple[str, ...] = SCHEDULER_NAMES
    """The scheduler names the model's family takes."""
    size_multiple: int = 8
    """Width and height are multiples of this: the VAE's factor, times a transformer's patch size."""
    prompt_syntaxes: tuple[PromptSyntax, ...] = ("a1111", "plain")
    """How the family reads prompts; the first is the default."""

    def default_strength(self, inpainting: bool) -> float:
        return self.inpaint_strength if inpainting else DEFAULT_STRENGTH

    @classmethod
    def from_settings(cls, settings: Settings, native_size: int, default_guidance_scale: float, **model: Any) -> Limits:
        """The deployment's limits from ``settings``; the model's (``inpaint_strength``, ``schedulers``,
        ``size_multiple``, ``prompt_syntaxes``, and a ``max_side`` below the settings') as keywords."""
        return cls(
            native_size=native_size,
            default_steps=settings.default_steps,
            default_guidance_scale=default_guidance_scale,
            min_side=settings.min_image_side,
            max_side=min(settings.max_image_side, model.pop("max_side", None) or settings.max_image_side),
            max_pixels=settings.max_image_pixels,
            max_steps=settings.max_steps,
            max_images=settings.max_images,
            max_prompts=settings.max_prompts,
            max_timeout_s=settings.max_timeout_s,
            max_loras=settings.max_loras,
            max_controlnets=settings.max_controlnets,
            max_prompt_weight=settings.max_prompt_weight,
            **model,
        )


def _text_list(value: Any) -> Any:
    """A prompt is a string or a list of strings; anything else gets one clear message."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return value
    if isinstance(value, list) and not value:
        raise PydanticCustomError("empty", "must not be an empty list")
    raise PydanticCustomError("text", "must be a string or a list of strings")


TextList = Annotated[list[str], BeforeValidator(_text_list)]


def _rule(kind: str, message: str, **values: Any) -> PydanticCustomError:
    return PydanticCustomError(kind, message, values)


def _limits(info: ValidationInfo) -> Limits:
    if not isinstance(info.context, Limits):
        raise TypeError("GenerateRequest is validated with Limits as context")
    return info.context


class LoraEntry(BaseModel):
    """One LoRA of a request: a file in LORA_DIR by name, or a safetensors URL, and its scale."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str | None = Field(None, min_length=1, description="a file in LORA_DIR, with or without .safetensors")
    url: str | None = Field(None, min_length=1, description="an http(s) URL of a .safetensors file")
    scale: float = Field(1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_source(self) -> LoraEntry:
        if (self.name is None) == (self.url is None):
            raise _rule("one_of", "give either name or url")
        return self

    def to_request(self) -> LoraRequest:
        return LoraRequest(self.name, self.url, self.scale)


class ControlNetEntry(BaseModel):
    """One ControlNet of a request: a folder in CONTROLNET_DIR, its control image, and when it acts."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(min_length=1, description="a ControlNet folder in CONTROLNET_DIR")
    image: str = Field(
        min_length=1, description="the control image, or with preprocess the photo it is made from: base64 or a URL"
    )
    scale: float = Field(1.0, ge=0.0, le=MAX_CONTROLNET_SCALE, allow_inf_nan=False)
    start: float = Field(0.0, ge=0.0, le=1.0, description="fraction of the steps before the ControlNet acts")
    end: float = Field(1.0, ge=0.0, le=1.0, description="fraction of the steps after which it stops")
    preprocess: Literal["canny"] | None = Field(None, description="canny: OpenCV's edge map of the image")
    low: float | None = Field(None, ge=0.0, le=MAX_CANNY_THRESHOLD, description="Canny's lower threshold")
    high: float | None = Field(None, ge=0.0, le=MAX_CANNY_THRESHOLD, description="Canny's upper threshold")

    @model_validator(mode="after")
    def _check_together(self) -> ControlNetEntry:
        if self.start >= self.end:
            raise _rule("order", "start must be below end, got start {s} and end {e}", s=self.start, e=self.end)
        if self.preprocess is None and (self.low is not None or self.high is not None):
            raise _rule("preprocess", "low and high only apply with preprocess 'canny'")
        low, high = self.thresholds
        if low >= high:
            raise _rule("order", "low must be below high, got low {lo} and high {hi}", lo=low, hi=high)
        return self

    @property
    def thresholds(self) -> tuple[float, float]:
        defaults = CANNY_THRESHOLDS
        return (defaults[0] if self.low is None else self.low, defaults[1] if self.high is None else self.high)

    def to_request(self) -> ControlNetRequest:
        thresholds = self.thresholds if self.preprocess is not None else None
        return ControlNetRequest(self.name, self.image, self.scale, self.start, self.end, self.preprocess, thresholds)


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
    scheduler: str | None = None
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

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _check_texts(cls, texts: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if texts is not None and any(len(text) > MAX_PROMPT_CHARS for text in texts):
            raise _rule("too_long", "each must be at most {n} characters", n=MAX_PROMPT_CHARS)
        if info.field_name == "prompt" and texts is not None and len(texts) > _limits(info).max_prompts:
            raise _rule("too_many", "at most {n} prompts per request", n=_limits(info).max_prompts)
        return texts

    @field_validator("width", "height")
    @classmethod
    def _check_side(cls, side: int | None, info: ValidationInfo) -> int | None:
        limits = _limits(info)
        if side is None:
            return side
        if side % limits.size_multiple:
            raise _rule("multiple_of", "must be a multiple of {n}, got {v}", n=limits.size_multiple, v=side)
        if not limits.min_side <= side <= limits.max_side:
            raise _rule("range", "must be {lo} to {hi}, got {v}", lo=limits.min_side, hi=limits.max_side, v=side)
        return side

    @field_validator("num_inference_steps")
    @classmethod
    def _check_steps(cls, steps: int | None, info: ValidationInfo) -> int | None:
        if steps is not None and not 1 <= steps <= _limits(info).max_steps:
            raise _rule("range", "must be 1 to {n}, got {v}", n=_limits(info).max_steps, v=steps)
        return steps

    @field_validator("num_images")
    @classmethod
    def _check_images(cls, count: int, info: ValidationInfo) -> int:
        if count > _limits(info).max_images:
            raise _rule("range", "must be 1 to {n}, got {v}", n=_limits(info).max_images, v=count)
        return count

    @field_validator("scheduler")
    @classmethod
    def _check_scheduler(cls, name: str | None, info: ValidationInfo) -> str | None:
        names = _limits(info).schedulers
        if name is not None and name not in names:
            raise _rule("unknown", "must be one of {names} for this model, got '{v}'", names=", ".join(names), v=name)
        return name

    @field_validator("prompt_syntax")
    @classmethod
    def _check_syntax(cls, syntax: PromptSyntax | None, info: ValidationInfo) -> PromptSyntax | None:
        syntaxes = _limits(info).prompt_syntaxes
        if syntax is not None and syntax not in syntaxes:
            raise _rule("unsupported", "this model reads prompts as {names} only", names=" or ".join(syntaxes))
        return syntax

    @field_validator("loras")
    @classmethod
    def _check_loras(cls, loras: list[LoraEntry] | None, info: ValidationInfo) -> list[LoraEntry] | None:
        if loras is not None and len(loras) > _limits(info).max_loras:
            raise _rule("too_many", "at most {n} LoRAs per request, got {v}", n=_limits(info).max_loras, v=len(loras))
        return loras

    @field_validator("controlnets")
    @classmethod
    def _check_controlnets(
        cls, entries: list[ControlNetEntry] | None, info: ValidationInfo
    ) -> list[ControlNetEntry] | None:
        limit = _limits(info).max_controlnets
        if entries is not None and len(entries) > limit:
            raise _rule("too_many", "at most {n} per request (MAX_CONTROLNETS), got {v}", n=limit, v=len(entries))
        return entries

    @field_validator("timeout_s")
    @classmethod
    def _check_timeout(cls, timeout: float | None, info: ValidationInfo) -> float | None:
        if timeout is not None and timeout > _limits(info).max_timeout_s:
            raise _rule("range", "must be at most {n} seconds", n=_limits(info).max_timeout_s)
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
            output_format=self.output_format,
            quality=self.quality,
            timeout_s=min(self.timeout_s or limits.max_timeout_s, limits.max_timeout_s),
            image=self.image,
            strength=limits.default_strength(self.mask is not None) if self.strength is None else self.strength,
            loras=tuple(entry.to_request() for entry in self.loras or ()),
            prompt_syntax=self.prompt_syntax or limits.prompt_syntaxes[0],
            mask=self.mask,
            padding_mask_crop=self.padding_mask_crop,
            controlnets=tuple(entry.to_request() for entry in self.controlnets or ()),
        )


def cross_field_problems(values: dict[str, Any], limits: Limits) -> list[str]:
    """Rules that span fields, over the fields given (valid ones, already in their model form);
    a rule whose fields are not all given is skipped, so a request's problems come in one round."""
    problems = []
    prompts = values.get("prompt")
    negatives = values.get("negative_prompt")
    if (values.get("prompt_syntax") or limits.prompt_syntaxes[0]) == "a1111":
        problems += prompt_weight_problems("prompt", prompts, limits.max_prompt_weight)
        problems += prompt_weight_problems("negative_prompt", negatives, limits.max_prompt_weight)
    if prompts is not None and negatives is not None and len(negatives) not in (1, len(prompts)):
        problems.append("negative_prompt: must be one string or one per prompt")
    width, height = values.get("width") or limits.native_size, values.get("height") or limits.native_size
    if width * height > limits.max_pixels:
        problems.append(f"width: width x height must be at most {limits.max_pixels} pixels, got {width * height}")
    images = values.get("num_images", 1) * len(prompts) if prompts is not None and "num_images" in values else None
    if images is not None and images > limits.max_images:
        problems.append(f"num_images: num_images x prompts must be at most {limits.max_images}, got {images}")
    seed = values.get("seed")
    if seed is not None and images is not None and seed + images > MAX_SEED:
        problems.append("seed: seed plus the number of images must stay below 2**63")
    image, strength = values.get("image"), values.get("strength")
    if strength is not None and image is None and "image" in values:
        problems.append("strength: only applies with an image")
    mask = values.get("mask")
    if mask is not None and image is None and "image" in values:
        problems.append("mask: needs an image, the picture to inpaint")
    if values.get("padding_mask_crop") is not None and mask is None and "mask" in values:
        problems.append("padding_mask_crop: only applies with a mask")
    steps = values.get("num_inference_steps") or limits.default_steps
    effective = limits.default_strength(mask is not None) if strength is None else strength
    if image is not None and "strength" in values and int(steps * effective) < 1:
        problems.append(f"strength: with {steps} steps it must be at least {1 / steps:.3g} to denoise at all")
    return problems


def prompt_weight_problems(field: str, texts: list[str] | None, max_weight: float) -> list[str]:
    """Weights that are not numbers or are out of range, under the field (and position) they are in."""
    problems = []
    for index, text in enumerate(texts or ()):
        where = field if len(texts or ()) == 1 else f"{field}[{index}]"
        problems += [f"{where}: {problem}" for problem in weight_problems(text, max_weight)]
    return problems


def _location(loc: tuple[Any, ...]) -> str:
    """``loras[1].name``: list positions in brackets, as the request writes them."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text or "input"


def unencodable_texts(payload: dict[str, Any]) -> list[str]:
    """Where the payload holds text that is not Unicode: JSON can carry a lone UTF-16 surrogate
    (``"\\ud800"``), which the tokenizers, the log and the file system cannot take."""
    found = []
    pending: list[tuple[tuple[Any, ...], Any]] = [((key,), value) for key, value in payload.items()]
    while pending:  # a loop, not recursion: the payload's nesting is the caller's to choose
        loc, value = pending.pop()
        for text in (loc[-1], value):
            if isinstance(text, str) and not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    found.append(f"{_location(loc)}: holds an unpaired surrogate, which is not Unicode text")
                    break
        if isinstance(value, dict):
            pending += [((*loc, key), item) for key, item in value.items()]
        elif isinstance(value, list):
            pending += [((*loc, index), item) for index, item in enumerate(value)]
    return sorted(found)


def validate_request(payload: Any, limits: Limits) -> GenerateRequest:
    """Validates ``job["input"]``; raises RequestError listing every problem as 'field: rule'."""
    if not isinstance(payload, dict):
        raise RequestError("input: must be a JSON object")
    unencodable = unencodable_texts(payload)
    if unencodable:
        raise RequestError("; ".join(unencodable))
    try:
        return GenerateRequest.model_validate(payload, context=limits)
    except ValidationError as error:
        items = error.errors(include_url=False)
        problems = [f"{_location(item['loc'])}: {item['msg']}" for item in items]
        failed = {item["loc"][0] for item in items if item["loc"]}
        problems += cross_field_problems(_valid_fields(payload, failed), limits)
        raise RequestError("; ".join(dict.fromkeys(problems))) from None


def _valid_fields(payload: dict[str, Any], failed: set[Any]) -> dict[str, Any]:
    """The fields that passed on their own, in model form, with defaults for the ones not sent."""
    fields = GenerateRequest.model_fields
    values = {name: field.default for name, field in fields.items() if not field.is_required() and name not in failed}
    values.update({name: value for name, value in payload.items() if name in fields and name not in failed})
    for name in ("prompt", "negative_prompt"):
        if values.get(name) is not None:
            values[name] = _text_list(values[name])
    return values


def parse_request(payload: Any, limits: Limits) -> ResolvedRequest:
    """A text-to-image request, validated and with its defaults."""
    return validate_request(payload, limits).resolved(limits)
