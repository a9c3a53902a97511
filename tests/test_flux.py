"""Flux against diffusers' Flux pipelines: the built-in tiny-flux (dev: embedded guidance) and a held-out
schnell-style configuration (no guidance input, its 4-step and 256-token defaults), on torch and onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from diffusers import FluxImg2ImgPipeline, FluxPipeline

from engine.models.builtin import builtin_model_folder
from tests.conftest import run_export
from tests.parity import (
    assert_same_images,
    cpu_worker,
    decoded,
    diffusers_pipe,
    generate,
    held_out_flux_transformer,
    picture,
    reference_images,
    to_base64,
)


@pytest.fixture(scope="module")
def held_out_schnell(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-flux's encoders and VAE with a schnell-style transformer: no guidance embedding, two
    double-stream and two single-stream blocks, other heads; nothing in its name says schnell."""
    folder = tmp_path_factory.mktemp("held-out-flux")
    base = FluxPipeline.from_pretrained(builtin_model_folder("tiny-flux", cache_dir))
    transformer = held_out_flux_transformer(base.transformer.config, seed=13)
    FluxPipeline(**{**base.components, "transformer": transformer}).save_pretrained(folder)
    return folder


TEXT_TO_IMAGE = {
    "square": {"width": 128, "height": 128},
    "non-square, two images, another guidance": {"width": 96, "height": 160, "num_images": 2, "guidance_scale": 5.0},
    "true classifier-free guidance": {"width": 128, "height": 96, "negative_prompt": "fog", "true_cfg_scale": 3.0},
}


@pytest.mark.parametrize("case", TEXT_TO_IMAGE)
def test_dev_text_to_image_matches_diffusers(cache_dir, tmp_path, case):
    worker = cpu_worker("tiny-flux", cache_dir, tmp_path)
    payload = {"prompt": "a red fox in the snow", "num_inference_steps": 4, "seed": 3, **TEXT_TO_IMAGE[case]}
    assert_same_images(
        generate(worker, payload), reference_images(diffusers_pipe(FluxPipeline, worker), worker, payload)
    )


@pytest.mark.parametrize(
    "extra",
    [
        {"strength": 0.6},
        {"width": 96, "height": 128, "num_images": 2},
        {"negative_prompt": "fog", "true_cfg_scale": 2.0},
    ],
)
def test_dev_image_to_image_matches_diffusers(cache_dir, tmp_path, extra):
    worker = cpu_worker("tiny-flux", cache_dir, tmp_path)
    payload = {"prompt": "a watercolor fox", "image": to_base64(picture(128, 128)), "num_inference_steps": 5}
    payload |= {"seed": 4, **extra}
    pipe = diffusers_pipe(FluxImg2ImgPipeline, worker)
    assert_same_images(generate(worker, payload), reference_images(pipe, worker, payload))


def test_schnell_is_told_apart_by_its_config_and_matches_diffusers(held_out_schnell, cache_dir, tmp_path):
    worker = cpu_worker(str(held_out_schnell), cache_dir, tmp_path)
    assert "guidance" not in worker.model.specs["transformer"].input_names
    request, _ = worker.resolve({"prompt": "a fox"})
    assert (request.steps, request.guidance_scale) == (4, 0.0), "schnell's defaults"
    assert worker.model.specs["text_encoder_2"].inputs[0].shape == ("text_batch", 256)
    payload = {"prompt": "a red fox", "width": 128, "height": 96, "seed": 2}
    pipe = diffusers_pipe(FluxPipeline, worker)
    assert_same_images(generate(worker, payload), reference_images(pipe, worker, payload, max_sequence_length=256))


def test_onnxruntime_matches_torch(held_out_schnell, cache_dir, tmp_path):
    done = run_export(tmp_path, cache_dir, "--model", str(held_out_schnell))
    assert done.returncode == 0, done.stderr[-3000:]
    torch_worker = cpu_worker(str(held_out_schnell), cache_dir, tmp_path)
    ort_worker = cpu_worker(str(held_out_schnell), cache_dir, tmp_path, backend="onnxruntime")
    for payload in (
        {"prompt": "a red fox", "width": 96, "height": 160, "num_images": 2, "negative_prompt": "fog"},
        {"prompt": "a red fox", "image": to_base64(picture(128, 128)), "strength": 0.7},
    ):
        payload |= {"seed": 2, "true_cfg_scale": 2.5}
        expected = torch_worker.handle({"id": "t", "input": payload})
        actual = ort_worker.handle({"id": "o", "input": payload})
        assert set(actual["metrics"]["backends"].values()) == {"onnxruntime"}, actual["metrics"]["fallbacks"]
        for ours, theirs in zip(decoded(actual), decoded(expected), strict=True):
            assert np.abs(ours - theirs).max() <= 2


ERRORS = {
    "a negative prompt without true guidance": (
        {"negative_prompt": "fog"},
        "negative_prompt: flux models use one only with true_cfg_scale above 1",
    ),
    "an SD scheduler": ({"scheduler": "dpmpp_2m"}, "scheduler: must be one of flow_euler for this model"),
    "a side the packing does not divide": ({"height": 120}, "height: must be a multiple of 16, got 120"),
    "a LoRA": ({"loras": [{"name": "style"}]}, "loras: not supported for flux models yet"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_what_flux_does_not_take_gets_a_named_error(cache_dir, tmp_path, case):
    worker = cpu_worker("tiny-flux", cache_dir, tmp_path)
    extra, message = ERRORS[case]
    response = worker.handle({"id": "bad", "input": {"prompt": "a fox", "num_inference_steps": 2, **extra}})
    assert response["status"] == "error"
    assert message in response["error"], response["error"]


def test_true_cfg_scale_is_refused_where_guidance_is_not_distilled(cache_dir, tmp_path):
    worker = cpu_worker("tiny", cache_dir, tmp_path)
    response = worker.handle({"id": "t", "input": {"prompt": "a fox", "true_cfg_scale": 2.0}})
    assert "true_cfg_scale: only for models with distilled guidance, not sd" in response["error"]
