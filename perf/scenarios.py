"""The requests every backend is timed on, sized from the model's native resolution."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from engine.models.model import Model
from engine.prompts.tokens import content_length, tokenize_prompt

FEW_STEPS = 4
"""The few-step scenario's steps: SDXL-Turbo's, SDXL-Lightning's, LCM-LoRA's and Flux schnell's."""

PROMPT = "a photograph of a red fox in the snow, golden hour, highly detailed"
NEGATIVE = "blurry, low quality"
LONG_PHRASES = (
    "(a photograph of a red fox:1.2)",
    "in the snow at golden hour",
    "frost on its whiskers",
    "breath steaming in the cold air",
    "pine forest behind",
    "soft bokeh",
    "[muted colors]",
    "shot on a telephoto lens",
    "shallow depth of field",
    "((highly detailed fur))",
    "award winning wildlife photography",
    "national geographic",
)


@dataclass(frozen=True)
class Scenario:
    name: str
    payload: dict[str, Any]
    diffusers_comparable: bool = True
    """False where diffusers' pipelines would do less: they cut prompts at 77 tokens and read brackets as text."""


def long_prompt(tokenizer: Any) -> str:
    """A weighted prompt of two chunks for this tokenizer, as prompts written for AUTOMATIC1111 often are."""
    phrases: list[str] = []
    while tokenize_prompt(tokenizer, ", ".join(phrases)).count <= content_length(tokenizer):
        phrases.append(LONG_PHRASES[len(phrases) % len(LONG_PHRASES)])
    return ", ".join(phrases)


def input_image(width: int, height: int) -> str:
    """A smooth synthetic picture (gradients and a disc) as base64 PNG, the same on every run."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    disc = ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.08).astype(np.float64)
    pixels = np.stack([x, y, 0.3 + 0.7 * disc], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray((pixels * 255).astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def default_scenarios(model: Model, steps: int) -> list[Scenario]:
    """The requests for this model, in what its family takes: SD and SDXL with Euler, a negative prompt
    and a weighted two-chunk prompt; SD3 and Flux with their flow-matching default, Flux without a
    negative prompt (it would need true_cfg_scale), and plain prompts."""
    family, native_size = model.family, model.config.native_size
    base: dict[str, Any] = {"prompt": PROMPT, "num_inference_steps": steps, "seed": 0}
    if "euler" in family.scheduler_names:
        base["scheduler"] = "euler"
    if not family.true_cfg:
        base["negative_prompt"] = NEGATIVE
    wide = (native_size + native_size // 2) // model.config.size_multiple * model.config.size_multiple
    square = {"width": native_size, "height": native_size}
    scenarios = [
        Scenario(f"txt2img {native_size}x{native_size}", {**base, **square}),
        Scenario(f"txt2img {native_size}x{native_size} x2", {**base, **square, "num_images": 2}),
        Scenario(f"txt2img {wide}x{native_size}", {**base, "width": wide, "height": native_size}),
    ]
    if "a1111" in family.prompt_syntaxes:
        scenarios.append(
            Scenario(
                f"txt2img {native_size}x{native_size} weighted prompt, 2 chunks",
                {**base, **square, "prompt": long_prompt(model.tokenizers["tokenizer"])},
                diffusers_comparable=False,
            )
        )
    image = input_image(native_size, native_size)
    scenarios.append(
        Scenario(f"img2img {native_size}x{native_size} strength 0.6", {**base, "image": image, "strength": 0.6})
    )
    scenarios.append(few_step_scenario(model, base))
    return scenarios


def few_step_scenario(model: Model, base: dict[str, Any]) -> Scenario:
    """Text-to-image at the native size in ``FEW_STEPS`` steps with the family's few-step scheduler: LCM
    without classifier-free guidance for SD and SDXL (LCM-LoRA's recipe: one UNet row per step), the
    flow-matching default for SD3 and Flux. With so few steps the text encoders, the VAE and the
    per-step work outside the denoiser show next to it."""
    size = model.config.native_size
    payload = {**base, "width": size, "height": size, "num_inference_steps": FEW_STEPS}
    if "lcm" in model.family.scheduler_names:
        payload |= {"scheduler": "lcm", "guidance_scale": 1.0}
        payload.pop("negative_prompt", None)
    scheduler = payload.get("scheduler", "its own scheduler")
    return Scenario(f"few-step {size}x{size} {FEW_STEPS} steps, {scheduler}", payload)


def controlnet_scenario(model: Model, steps: int, name: str) -> Scenario:
    """Text-to-image at the native size steered by the ControlNet ``name`` (from CONTROLNET_DIR) through
    the edges of the synthetic picture, as a Canny ControlNet is used."""
    size = model.config.native_size
    control = {"name": name, "image": input_image(size, size), "preprocess": "canny"}
    payload = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "num_inference_steps": steps, "seed": 0}
    payload |= {"scheduler": "euler", "width": size, "height": size, "controlnets": [control]}
    return Scenario(f"txt2img {size}x{size} + controlnet {name}", payload)
