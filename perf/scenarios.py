"""The requests every backend is timed on, sized from the model's native resolution."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

PROMPT = "a photograph of a red fox in the snow, golden hour, highly detailed"
NEGATIVE = "blurry, low quality"


@dataclass(frozen=True)
class Scenario:
    name: str
    payload: dict[str, Any]


def input_image(width: int, height: int) -> str:
    """A smooth synthetic picture (gradients and a disc) as base64 PNG, the same on every run."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    disc = ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.08).astype(np.float64)
    pixels = np.stack([x, y, 0.3 + 0.7 * disc], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray((pixels * 255).astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


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
        Scenario(
            f"img2img {native_size}x{native_size} strength 0.6",
            {**base, "image": input_image(native_size, native_size), "strength": 0.6},
        ),
    ]
