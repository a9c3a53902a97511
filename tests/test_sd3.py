"""Stable Diffusion 3 against diffusers' SD3 pipelines, on the built-in tiny-sd3 and on a held-out
SD 3.5-style configuration (QK normalization, a dual-attention layer), on torch and onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline

from engine.models.builtin import builtin_model_folder
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


@pytest.fixture(scope="module")
def held_out_sd35(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-sd3's encoders and VAE with another transformer: three layers, RMS-normalized queries and
    keys, the first layer with SD 3.5's second (image-only) attention, and a scheduler shifted by 2."""
    folder = tmp_path_factory.mktemp("held-out-sd35")
    base = StableDiffusion3Pipeline.from_pretrained(builtin_model_folder("tiny-sd3", cache_dir))
    with torch.random.fork_rng():
        torch.manual_seed(11)
        transformer = SD3Transformer2DModel.from_config(
            {
                **base.transformer.config,
                "num_layers": 3,
                "num_attention_heads": 2,
                "attention_head_dim": 12,
                "caption_projection_dim": 24,
                "qk_norm": "rms_norm",
                "dual_attention_layers": (0,),
            }
        )
    scheduler = base.scheduler.from_config(base.scheduler.config, shift=2.0)
    StableDiffusion3Pipeline(**{**base.components, "transformer": transformer, "scheduler": scheduler}).save_pretrained(
        folder
    )
    return folder


TEXT_TO_IMAGE = {
    "square, guided, a negative prompt, two images": {
        "negative_prompt": "fog",
        "width": 128,
        "height": 128,
        "num_images": 2,
    },
    "non-square": {"width": 96, "height": 160, "guidance_scale": 4.5},
    "unguided": {"width": 128, "height": 96, "guidance_scale": 1.0},
}


@pytest.mark.parametrize("model", ["tiny-sd3", "held-out"])
@pytest.mark.parametrize("case", TEXT_TO_IMAGE)
def test_text_to_image_matches_diffusers(request, cache_dir, tmp_path, model, case):
    name = str(request.getfixturevalue("held_out_sd35")) if model == "held-out" else model
    worker = cpu_worker(name, cache_dir, tmp_path)
    payload = {"prompt": "a red fox in the snow", "num_inference_steps": 4, "seed": 3, **TEXT_TO_IMAGE[case]}
    pipe = diffusers_pipe(StableDiffusion3Pipeline, worker)
    assert_same_images(generate(worker, payload), reference_images(pipe, worker, payload))


@pytest.mark.parametrize(
    "extra",
    [
        {"strength": 0.6},  # 4 x 0.6: SD3's pipeline skips int(1.6) = 1 step, SD's would skip 2
        {"guidance_scale": 1.0, "width": 96, "height": 128},  # resized, unguided, the default strength
    ],
)
def test_image_to_image_matches_diffusers(cache_dir, tmp_path, extra):
    worker = cpu_worker("tiny-sd3", cache_dir, tmp_path)
    payload = {"prompt": "a watercolor fox", "image": to_base64(picture(128, 128)), "num_inference_steps": 4}
    payload |= {"seed": 5, **extra}
    pipe = diffusers_pipe(StableDiffusion3Img2ImgPipeline, worker)
    assert_same_images(generate(worker, payload), reference_images(pipe, worker, payload))


def test_onnxruntime_matches_torch(held_out_sd35, cache_dir, tmp_path):
    done = run_export(tmp_path, cache_dir, "--model", str(held_out_sd35))
    assert done.returncode == 0, done.stderr[-3000:]
    torch_worker = cpu_worker(str(held_out_sd35), cache_dir, tmp_path)
    ort_worker = cpu_worker(str(held_out_sd35), cache_dir, tmp_path, backend="onnxruntime")
    for payload in (
        {"prompt": "a red fox", "width": 96, "height": 160, "num_images": 2, "seed": 2},
        {"prompt": "a red fox", "image": to_base64(picture(128, 128)), "strength": 0.7, "seed": 2},
    ):
        payload["num_inference_steps"] = 4
        expected = torch_worker.handle({"id": "t", "input": payload})
        actual = ort_worker.handle({"id": "o", "input": payload})
        assert set(actual["metrics"]["backends"].values()) == {"onnxruntime"}, actual["metrics"]["fallbacks"]
        assert "transformer" in actual["metrics"]["backends"]
        for ours, theirs in zip(decoded(actual), decoded(expected), strict=True):
            assert np.abs(ours - theirs).max() <= 2


ERRORS = {
    "an SD scheduler": ({"scheduler": "euler_a"}, "scheduler: must be one of flow_euler for this model"),
    "a side the patches do not divide": ({"width": 72}, "width: must be a multiple of 16, got 72"),
    "past the position embedding": ({"width": 1024}, "width: must be 64 to 768, got 1024"),
    "weighted prompt syntax": ({"prompt_syntax": "a1111"}, "prompt_syntax: this model reads prompts as plain only"),
    "a LoRA": ({"loras": [{"name": "style"}]}, "loras: not supported for sd3 models yet"),
    "a mask": ({"image": to_base64(picture(64, 64)), "mask": "eA=="}, "mask: not supported for sd3 models yet"),
    "a ControlNet": ({"controlnets": [{"name": "c", "image": "eA=="}]}, "controlnets: not supported for sd3 models"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_what_sd3_does_not_take_gets_a_named_error(cache_dir, tmp_path, case):
    worker = cpu_worker("tiny-sd3", cache_dir, tmp_path)
    extra, message = ERRORS[case]
    response = worker.handle({"id": "bad", "input": {"prompt": "a fox", "num_inference_steps": 2, **extra}})
    assert response["status"] == "error"
    assert message in response["error"], response["error"]


def test_everything_sd3_does_not_take_is_named_in_one_error(cache_dir, tmp_path):
    worker = cpu_worker("tiny-sd3", cache_dir, tmp_path)
    cases = [case for name, case in ERRORS.items() if name != "past the position embedding"]  # width, again
    extra = {name: value for payload, _ in cases for name, value in payload.items()}
    response = worker.handle({"id": "bad", "input": {"prompt": "a fox", "num_inference_steps": 2, **extra}})
    assert response["status"] == "error"
    for _, message in cases:
        assert response["error"].count(message) == 1, (message, response["error"])


def test_prompts_are_plain_text_and_metrics_count_t5_tokens(cache_dir, tmp_path):
    worker = cpu_worker("tiny-sd3", cache_dir, tmp_path)
    response = worker.handle({"id": "p", "input": {"prompt": "(a fox:1.5)", "num_inference_steps": 2, "seed": 1}})
    metrics = response["metrics"]
    assert metrics["prompt_tokens"] == [len(worker.model.tokenizers["tokenizer_3"]("(a fox:1.5)").input_ids) - 1]
    assert metrics["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert metrics["image_size"] == "128x128"
