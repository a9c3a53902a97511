"""Flux's editing and control checkpoints against diffusers' own pipelines: Fill (``FluxFillPipeline``) on
the built-in tiny-flux-fill, on torch and onnxruntime, each told apart by its configs."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import FluxFillPipeline
from PIL import Image, ImageDraw

from tests.conftest import run_export
from tests.parity import (
    assert_same_images,
    cpu_worker,
    decoded,
    diffusers_pipe,
    generate,
    picture,
    reference_images,
    to_base64,
)


def mask(width: int, height: int) -> Image.Image:
    """White (repaint) over a rectangle off the centre, black elsewhere."""
    image = Image.new("L", (width, height), 0)
    ImageDraw.Draw(image).rectangle((width // 4, height // 3, width * 3 // 4, height - 8), fill=255)
    return image


def fill_payload(width: int, height: int, **extra) -> dict:
    return {
        "prompt": "a red fox in the snow",
        "image": to_base64(picture(width, height)),
        "mask": to_base64(mask(width, height)),
        "num_inference_steps": 3,
        "seed": 5,
        **extra,
    }


FILL = {
    "full strength": fill_payload(128, 128),
    "non-square, two images, part strength, another guidance": fill_payload(
        96, 128, num_images=2, strength=0.7, guidance_scale=10.0
    ),
}


@pytest.mark.parametrize("case", FILL)
def test_fill_matches_diffusers(cache_dir, tmp_path, case):
    worker = cpu_worker("tiny-flux-fill", cache_dir, tmp_path)
    assert worker.model.family.name == "flux-fill"
    assert worker.model.specs["transformer"].inputs[0].shape[1] == 16 + 16 + 64
    payload = FILL[case]
    pipe = diffusers_pipe(FluxFillPipeline, worker)
    assert_same_images(generate(worker, payload), reference_images(pipe, worker, payload))


FILL_ERRORS = {
    "no mask": ({"image": "x"}, "mask: this is an inpainting model"),
    "text to image": ({}, "mask: this is an inpainting model"),
    "a negative prompt": ({"negative_prompt": "fog"}, "negative_prompt: flux-fill models take none"),
    "true guidance": ({"true_cfg_scale": 2.0}, "true_cfg_scale: flux-fill models take none"),
    "a mask crop": ({"padding_mask_crop": 8}, "padding_mask_crop: not supported for flux-fill models"),
}


@pytest.mark.parametrize("case", FILL_ERRORS)
def test_what_fill_does_not_take_gets_a_named_error(cache_dir, tmp_path, case):
    worker = cpu_worker("tiny-flux-fill", cache_dir, tmp_path)
    extra, message = FILL_ERRORS[case]
    response = worker.handle({"id": "bad", "input": {"prompt": "a fox", "num_inference_steps": 2, **extra}})
    assert response["status"] == "error"
    assert message in response["error"], response["error"]


def test_fill_on_onnxruntime_matches_torch(cache_dir, tmp_path):
    done = run_export(tmp_path, cache_dir, "--model", "tiny-flux-fill", "--components", "transformer")
    assert done.returncode == 0, done.stderr[-3000:]
    torch_worker = cpu_worker("tiny-flux-fill", cache_dir, tmp_path)
    ort_worker = cpu_worker("tiny-flux-fill", cache_dir, tmp_path, backend="onnxruntime")
    payload = fill_payload(96, 128, num_images=2)
    expected = torch_worker.handle({"id": "t", "input": payload})
    actual = ort_worker.handle({"id": "o", "input": payload})
    assert actual["metrics"]["backends"]["transformer"] == "onnxruntime", actual["metrics"]["fallbacks"]
    for ours, theirs in zip(decoded(actual), decoded(expected), strict=True):
        assert np.abs(ours - theirs).max() <= 2
