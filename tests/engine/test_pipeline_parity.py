"""The worker's pipeline against diffusers' own StableDiffusionPipeline, same inputs, same seed.

diffusers is the outside reference: for the same model folder, prompts, seed, size,
steps, guidance and scheduler, the two images must agree within 2/255 per pixel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from engine.metrics import StageTimer
from engine.request import parse_request
from engine.schedulers import make_scheduler
from engine.worker import Worker

TOLERANCE = 2  # of 255, per pixel


@pytest.fixture(scope="module")
def worker(cache_dir, tmp_path_factory):
    from engine.settings import Settings

    settings = Settings(cache_dir=cache_dir, engine_dir=tmp_path_factory.mktemp("engines"), device="cpu")
    return Worker(settings)


@pytest.fixture(scope="module")
def reference(worker):
    pipe = StableDiffusionPipeline.from_pretrained(worker.model.folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(worker: Worker, payload: dict) -> list[np.ndarray]:
    request = parse_request(payload, worker.limits)
    seeds = [payload["seed"] + i for i in range(request.num_images)]
    runners, _ = worker._choose_runners(request)
    images = worker.pipeline(request, seeds, runners, StageTimer(worker.device))
    return [np.asarray(image, dtype=np.int16) for image in images]


def reference_images(reference, worker: Worker, payload: dict) -> list[np.ndarray]:
    request = parse_request(payload, worker.limits)
    reference.scheduler = make_scheduler(request.scheduler, worker.model.scheduler_config)
    generators = [torch.Generator().manual_seed(payload["seed"] + i) for i in range(request.num_images)]
    result = reference(
        prompt=request.prompts,
        negative_prompt=request.negative_prompts,
        height=request.height,
        width=request.width,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        num_images_per_prompt=request.images_per_prompt,
        generator=generators,
    )
    return [np.asarray(image, dtype=np.int16) for image in result.images]


def assert_same_images(ours: list[np.ndarray], theirs: list[np.ndarray]) -> None:
    assert len(ours) == len(theirs)
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.shape == reference.shape
        assert np.abs(mine - reference).max() <= TOLERANCE
        assert reference.std() > 1  # a real image, not a blank that trivially matches


@pytest.mark.parametrize(
    ("scheduler", "width", "height", "seed"),
    [
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
    ],
)
def test_matches_diffusers(worker, reference, scheduler, width, height, seed):
    payload = {
        "prompt": "a red fox",
        "negative_prompt": "blurry",
        "width": width,
        "height": height,
        "num_inference_steps": 8,
        "guidance_scale": 6.0,
        "seed": seed,
    }
    if scheduler:
        payload["scheduler"] = scheduler
    assert_same_images(generate(worker, payload), reference_images(reference, worker, payload))


def test_several_prompts_and_images_match_diffusers(worker, reference):
    payload = {
        "prompt": ["a red fox", "a blue whale"],
        "num_images": 2,
        "width": 64,
        "height": 64,
        "num_inference_steps": 5,
        "scheduler": "euler_a",
        "seed": 11,
    }
    assert_same_images(generate(worker, payload), reference_images(reference, worker, payload))


def test_without_guidance_matches_diffusers(worker, reference):
    payload = {"prompt": "a red fox", "guidance_scale": 1.0, "num_inference_steps": 5, "seed": 3}
    assert_same_images(generate(worker, payload), reference_images(reference, worker, payload))


def test_seed_changes_the_image(worker):
    first = generate(worker, {"prompt": "a red fox", "num_inference_steps": 4, "seed": 1})[0]
    second = generate(worker, {"prompt": "a red fox", "num_inference_steps": 4, "seed": 2})[0]
    again = generate(worker, {"prompt": "a red fox", "num_inference_steps": 4, "seed": 1})[0]
    assert np.abs(first - second).max() > 10
    assert np.array_equal(first, again)
