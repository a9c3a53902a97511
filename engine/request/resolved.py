"""A request as the rest of the worker reads it: every default filled in.

A frozen dataclass, free of torch and the model families, so every stage (admission, the
LoRA library, the pipeline, the metrics) imports it one way.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.prompts.syntax import PromptSyntax
from engine.request.entries import ControlImageEntry, ControlNetEntry, LoraEntry
from engine.request.ip_adapter_entry import IpAdapterEntry


@dataclass(frozen=True)
class ResolvedRequest:
    """A valid request with every default filled in."""

    prompts: list[str]
    negative_prompts: list[str] | None
    images_per_prompt: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int | None
    scheduler: str | None
    output_format: str
    quality: int
    timeout_s: float
    image: str | None = None
    strength: float = 1.0
    loras: tuple[LoraEntry, ...] = ()
    prompt_syntax: PromptSyntax = "a1111"
    prompt_tokens: tuple[int, ...] = ()
    """Tokens in each prompt after parsing, once the worker has counted them."""
    prompt_chunks: int = 1
    """Chunks of the text encoder's length each prompt and negative prompt is padded to."""
    mask: str | None = None
    padding_mask_crop: int | None = None
    controlnets: tuple[ControlNetEntry, ...] = ()
    true_cfg_scale: float | None = None
    control: ControlImageEntry | None = None
    """A Flux Control model's control image."""
    ip_adapters: tuple[IpAdapterEntry, ...] = ()
    eta: float | None = None
    """The scheduler's ``eta`` where it takes one (TCD, DDIM); None for its default."""
    reference_image: bool = False
    """Whether ``image`` is a reference the model edits (Flux Kontext), not a start to re-noise."""

    @property
    def mode(self) -> str:
        """txt2img, img2img, inpaint or edit (a Flux Kontext model's reference image), with '+controlnet'
        when ControlNets steer it, '+control' with a Flux Control model's control image, then
        '+ip_adapter' with image prompts."""
        base = "inpaint" if self.mask is not None else "txt2img" if self.image is None else "img2img"
        if base == "img2img" and self.reference_image:
            base = "edit"
        if self.control is not None:
            base = f"{base}+control"
        elif self.controlnets:
            base = f"{base}+controlnet"
        return f"{base}+ip_adapter" if self.ip_adapters else base

    @property
    def guidance(self) -> tuple[float, float | None, bool]:
        """What a family's ``classifier_free_scale`` asks: guidance and true CFG scales, and whether
        there are negative prompts."""
        return self.guidance_scale, self.true_cfg_scale, self.negative_prompts is not None

    @property
    def num_images(self) -> int:
        return len(self.prompts) * self.images_per_prompt
