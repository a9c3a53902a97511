"""The worker's pipeline against diffusers' own pipelines, same inputs, same seed.

diffusers is the outside reference: for the same model folder, prompts, seed, size,
steps, guidance and scheduler, the two images must agree within 2/255 per pixel.
"""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)

from tests.parity import assert_same_images, cpu_worker, diffusers_pipe, generate, picture, reference_images, to_base64

SD = StableDiffusionPipeline, StableDiffusionImg2ImgPipeline
SDXL = StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline


@pytest.fixture(scope="module")
def sd(cache_dir, tmp_path_factory):
    worker = cpu_worker("tiny", cache_dir, tmp_path_factory.mktemp("sd"))
    return worker, diffusers_pipe(SD[0], worker), diffusers_pipe(SD[1], worker)


@pytest.fixture(scope="module")
def sdxl(cache_dir, tmp_path_factory):
    worker = cpu_worker("tiny-sdxl", cache_dir, tmp_path_factory.mktemp("sdxl"))
    return worker, diffusers_pipe(SDXL[0], worker), diffusers_pipe(SDXL[1], worker)


TEXT_TO_IMAGE = [
    (None, 64, 64, 0),
    ("ddim", 64, 96, 1),
    ("euler", 96, 64, 2),
    ("euler_a", 64, 64, 3),
    ("dpmpp_2m", 80, 64, 4),
    ("dpmpp_2m_karras", 64, 64, 5),
    ("pndm", 64, 72, 6),
    ("unipc", 64, 64, 7),
    ("heun", 64, 64, 8),
    ("dpmpp_2m_sde", 64, 64, 9),
]


def text_to_image(scheduler, width, height, seed, **extra) -> dict:
    payload = {
        "prompt": "a red fox",
        "width": width,
        "height": height,
        "num_inference_steps": 8,
        "guidance_scale": 6.0,
        "seed": seed,
        **extra,
    }
    if scheduler:
        payload["scheduler"] = scheduler
    return payload


@pytest.mark.parametrize(("scheduler", "width", "height", "seed"), TEXT_TO_IMAGE)
def test_sd_text_to_image_matches_diffusers(sd, scheduler, width, height, seed):
    worker, pipe, _ = sd
    payload = text_to_image(scheduler, width, height, seed, negative_prompt="blurry")
    assert_same_images(generate(worker, payload), reference_images(pipe, worker, payload))


@pytest.mark.parametrize(("scheduler", "width", "height", "seed"), TEXT_TO_IMAGE[:6])
def test_sdxl_text_to_image_matches_diffusers(sdxl, scheduler, width, height, seed):
    worker, pipe, _ = sdxl
    payload = text_to_image(scheduler, width, height, seed)  # no negative: SDXL's zeroed negative embeddings
    assert_same_images(generate(worker, payload), reference_images(pipe, worker, payload))


def test_sdxl_with_a_negative_prompt_matches_diffusers(sdxl):
    worker, pipe, _ = sdxl
    payload = text_to_image("euler", 96, 64, 12, negative_prompt="low quality")
    assert_same_images(generate(worker, payload), reference_images(pipe, worker, payload))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_several_prompts_and_images_match_diffusers(request, family):
    worker, pipe, _ = request.getfixturevalue(family)
    payload = {
        "prompt": ["a red fox", "a blue whale"],
        "num_images": 2,
        "width": 64,
        "height": 64,
        "num_inference_steps": 5,
        "scheduler": "euler_a",
        "seed": 11,
    }
    assert_same_images(generate(worker, payload), reference_images(pipe, worker, payload))


def test_without_guidance_matches_diffusers(sd):
    worker, pipe, _ = sd
    payload = {"prompt": "a red fox", "guidance_scale": 1.0, "num_inference_steps": 5, "seed": 3}
    assert_same_images(generate(worker, payload), reference_images(pipe, worker, payload))


IMAGE_TO_IMAGE = [
    (None, 0.6, (96, 72), 1),
    ("ddim", 0.8, (64, 64), 2),
    ("euler_a", 0.5, (72, 96), 3),
    ("dpmpp_2m_karras", 0.75, (96, 64), 4),
    ("unipc", 1.0, (64, 64), 5),
]


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize(("scheduler", "strength", "size", "seed"), IMAGE_TO_IMAGE)
def test_image_to_image_matches_diffusers(request, family, scheduler, strength, size, seed):
    worker, _, pipe = request.getfixturevalue(family)
    payload = {
        "prompt": "a fox in the snow",
        "image": to_base64(picture(*size, seed=seed)),
        "strength": strength,
        "num_inference_steps": 10,
        "seed": seed,
        "negative_prompt": "blurry",
    }
    if scheduler:
        payload["scheduler"] = scheduler
    ours = generate(worker, payload)
    assert ours[0].shape[:2] == (size[1], size[0])
    assert_same_images(ours, reference_images(pipe, worker, payload))


def test_image_to_image_with_several_images_matches_diffusers(sd):
    worker, _, pipe = sd
    payload = {
        "prompt": "a fox",
        "image": to_base64(picture(64, 64)),
        "num_images": 2,
        "strength": 0.7,
        "num_inference_steps": 6,
        "scheduler": "euler_a",
        "seed": 21,
    }
    assert_same_images(generate(worker, payload), reference_images(pipe, worker, payload))


def test_seed_changes_the_image(sd):
    worker, _, _ = sd
    first = generate(worker, {"prompt": "a red fox", "num_inference_steps": 4, "seed": 1})[0]
    second = generate(worker, {"prompt": "a red fox", "num_inference_steps": 4, "seed": 2})[0]
    again = generate(worker, {"prompt": "a red fox", "num_inference_steps": 4, "seed": 1})[0]
    assert np.abs(first - second).max() > 10
    assert np.array_equal(first, again)
