"""The entries of a request's lists: a LoRA (a file and its scale), a ControlNet (a folder, its control
image, when it acts, and its preprocessing), and a control image on its own (Flux Control's); an
IP-Adapter's is in ``engine.request.ip_adapter_entry``.

Each keeps one shape from the schema to the pipeline and its metrics: frozen, so a resolved
request holds them as they came.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.request.rules import rule

MAX_LORA_SCALE = 4.0
MAX_CONTROLNET_SCALE = 4.0
MAX_CANNY_THRESHOLD = 2000.0
CANNY_THRESHOLDS = (100.0, 200.0)
"""OpenCV Canny's lower and upper thresholds when a request gives none, as diffusers' examples use."""


class LoraEntry(BaseModel):
    """One LoRA of a request: a file in LORA_DIR by name, or a safetensors URL, and its scale."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str | None = Field(None, min_length=1, description="a file in LORA_DIR, with or without .safetensors")
    url: str | None = Field(None, min_length=1, description="an http(s) URL of a .safetensors file")
    scale: float = Field(1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_source(self) -> LoraEntry:
        if (self.name is None) == (self.url is None):
            raise rule("one_of", "give either name or url")
        return self


class ControlImageEntry(BaseModel):
    """A control image and its preprocessing: a Flux Control model's ``control``, and every ControlNet's."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    image: str = Field(
        min_length=1, description="the control image, or with preprocess the photo it is made from: base64 or a URL"
    )
    preprocess: Literal["canny"] | None = Field(None, description="canny: OpenCV's edge map of the image")
    low: float | None = Field(None, ge=0.0, le=MAX_CANNY_THRESHOLD, description="Canny's lower threshold")
    high: float | None = Field(None, ge=0.0, le=MAX_CANNY_THRESHOLD, description="Canny's upper threshold")

    @model_validator(mode="after")
    def _check_preprocess(self) -> ControlImageEntry:
        if self.preprocess is None and (self.low is not None or self.high is not None):
            raise rule("preprocess", "low and high only apply with preprocess 'canny'")
        low, high = self.thresholds
        if low >= high:
            raise rule("order", "low must be below high, got low {lo} and high {hi}", lo=low, hi=high)
        return self

    @property
    def thresholds(self) -> tuple[float, float]:
        """Canny's thresholds, the request's or the defaults."""
        defaults = CANNY_THRESHOLDS
        return (defaults[0] if self.low is None else self.low, defaults[1] if self.high is None else self.high)


class ControlNetEntry(ControlImageEntry):
    """One ControlNet of a request: a folder in CONTROLNET_DIR, its control image, and when it acts."""

    name: str = Field(min_length=1, description="a ControlNet folder in CONTROLNET_DIR")
    scale: float = Field(1.0, ge=0.0, le=MAX_CONTROLNET_SCALE, allow_inf_nan=False)
    start: float = Field(0.0, ge=0.0, le=1.0, description="fraction of the steps before the ControlNet acts")
    end: float = Field(1.0, ge=0.0, le=1.0, description="fraction of the steps after which it stops")

    @model_validator(mode="after")
    def _check_steps(self) -> ControlNetEntry:
        if self.start >= self.end:
            raise rule("order", "start must be below end, got start {s} and end {e}", s=self.start, e=self.end)
        return self
