"""The limits a request is checked against: the deployment's (settings) and the model's (native size, defaults).

They come in as the schema's validation context, so one schema serves every endpoint and model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.prompts.syntax import PromptSyntax
from engine.schedulers import SCHEDULER_NAMES
from engine.settings import Settings

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
    max_ip_adapters: int = 1
    max_prompt_weight: float = 3.0
    inpaint_strength: float = 1.0
    """The family's inpainting default, as its diffusers pipeline has it."""
    schedulers: tuple[str, ...] = SCHEDULER_NAMES
    """The scheduler names the model's family takes."""
    size_multiple: int = 8
    """Width and height are multiples of this: the VAE's factor, times a transformer's patch size."""
    prompt_syntaxes: tuple[PromptSyntax, ...] = ("a1111", "plain")
    """How the family reads prompts; the first is the default."""
    reference_image: bool = False
    """Whether ``image`` is a reference the model edits (Flux Kontext), never re-noised: no ``strength``."""
    model_scheduler: str = ""
    """The diffusers class of the model folder's own scheduler, which a request without ``scheduler`` runs
    (empty where unknown)."""

    def default_strength(self, inpainting: bool) -> float:
        return self.inpaint_strength if inpainting else DEFAULT_STRENGTH

    @classmethod
    def from_settings(cls, settings: Settings, native_size: int, default_guidance_scale: float, **model: Any) -> Limits:
        """The deployment's limits from ``settings``; the model's (``inpaint_strength``, ``schedulers``,
        ``size_multiple``, ``prompt_syntaxes``, ``reference_image``, ``model_scheduler``, and a ``max_side`` below the
        settings') as keywords."""
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
            max_ip_adapters=settings.max_ip_adapters,
            max_prompt_weight=settings.max_prompt_weight,
            **model,
        )
