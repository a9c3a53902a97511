"""The requests every backend is timed on, sized from the model's native resolution."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PROMPT = "a photograph of a red fox in the snow, golden hour, highly detailed"
NEGATIVE = "blurry, low quality"


@dataclass(frozen=True)
class Scenario:
    name: str
    payload: dict[str, Any]


def default_scenarios(native_size: int, steps: int) -> list[Scenario]:
    base = {
        "prompt": PROMPT,
        "negative_prompt": NEGATIVE,
        "num_inference_steps": steps,
        "seed": 0,
        "scheduler": "euler",
    }
    wide = native_size + native_size // 2
    return [
        Scenario(f"txt2img {native_size}x{native_size}", {**base, "width": native_size, "height": native_size}),
        Scenario(
            f"txt2img {native_size}x{native_size} x2",
            {**base, "width": native_size, "height": native_size, "num_images": 2},
        ),
        Scenario(f"txt2img {wide}x{native_size}", {**base, "width": wide, "height": native_size}),
    ]
