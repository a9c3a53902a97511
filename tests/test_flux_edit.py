"""Flux's editing and control checkpoints against diffusers' own pipelines: Fill (``FluxFillPipeline``) on
tiny-flux-fill, Control (``FluxControlPipeline``) on tiny-flux-control and Kontext (``FluxKontextPipeline``)
on tiny-flux-kontext, on torch and onnxruntime, each told apart by its configs."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from diffusers import FluxControlPipeline, FluxFillPipeline, FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
from PIL import Image, ImageDraw

from engine.common.errors import ModelError
from engine.models.builtin import builtin_model_folder
from engine.models.model import load_model
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


@pytest.fixture(scope="module")
def held_out_fill(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-flux-fill's encoders and VAE with another Fill transformer: two blocks of each kind, three
    heads, other rotary axes, no guidance embedding; its model_index.json names FluxPipeline."""
    base = FluxFillPipeline.from_pretrained(builtin_model_folder("tiny-flux-fill", cache_dir))
    transformer = held_out_flux_transformer(base.transformer.config, seed=17)
    folder = tmp_path_factory.mktemp("held-out-fill")
    FluxFillPipeline(**{**base.components, "transformer": transformer}).save_pretrained(folder)
    return edited_copy(folder, folder.parent / "held-out-fill-as-flux", "FluxPipeline")


def test_a_held_out_fill_folder_matches_diffusers(held_out_fill, cache_dir, tmp_path):
    worker = cpu_worker(str(held_out_fill), cache_dir, tmp_path)
    assert worker.model.family.name == "flux-fill"
    assert "guidance" not in worker.model.specs["transformer"].input_names
    payload = fill_payload(128, 96, num_images=2, strength=0.9)
    pipe = diffusers_pipe(FluxFillPipeline, worker)
    # without a guidance embedding it reads T5 as schnell does, 256 tokens (see test_flux.py)
    ours, theirs = generate(worker, payload), reference_images(pipe, worker, payload, max_sequence_length=256)
    assert_same_images(ours, theirs)


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


def depth_map(width: int, height: int) -> Image.Image:
    """A depth-like map: a smooth gray ramp with a nearer disc."""
    ramp = np.tile(np.linspace(40, 200, width, dtype=np.uint8), (height, 1))
    image = Image.fromarray(np.stack([ramp] * 3, axis=-1))
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, width * 3 // 4, height * 3 // 4), fill=(240, 240, 240))
    return image


CONTROL = {
    "a depth map as given": {"control": {"image": to_base64(depth_map(128, 128))}},
    "canny edges of a photo, non-square, two images, size from the image": {
        "control": {"image": to_base64(depth_map(96, 128)), "preprocess": "canny", "low": 50, "high": 150},
        "num_images": 2,
        "guidance_scale": 10.0,
    },
}


@pytest.mark.parametrize("case", CONTROL)
def test_control_matches_diffusers(cache_dir, tmp_path, case):
    worker = cpu_worker("tiny-flux-control", cache_dir, tmp_path)
    assert worker.model.family.name == "flux-control"
    payload = {"prompt": "a red fox in the snow", "num_inference_steps": 3, "seed": 6, **CONTROL[case]}
    request, _ = worker.resolve(payload)
    assert (request.width, request.height) == Image.open(io.BytesIO(base64.b64decode(payload["control"]["image"]))).size
    pipe = diffusers_pipe(FluxControlPipeline, worker)
    assert_same_images(generate(worker, payload), reference_images(pipe, worker, payload))


CONTROL_ERRORS = {
    "no control image": ({}, "control: this is a Flux Control model"),
    "an input image": ({"image": "x", "control": {"image": "x"}}, "image: flux-control models take no input image"),
    "a mask": ({"mask": "x", "control": {"image": "x"}}, "mask: not supported for flux-control models"),
    "a negative prompt": ({"negative_prompt": "fog"}, "negative_prompt: flux-control models take none"),
    "thresholds without canny": ({"control": {"image": "x", "low": 5}}, "control: low and high only apply"),
}


@pytest.mark.parametrize("case", CONTROL_ERRORS)
def test_what_control_does_not_take_gets_a_named_error(cache_dir, tmp_path, case):
    worker = cpu_worker("tiny-flux-control", cache_dir, tmp_path)
    extra, message = CONTROL_ERRORS[case]
    response = worker.handle({"id": "bad", "input": {"prompt": "a fox", "num_inference_steps": 2, **extra}})
    assert response["status"] == "error"
    assert message in response["error"], response["error"]


def test_control_is_refused_by_other_models(cache_dir, tmp_path):
    worker = cpu_worker("tiny-flux", cache_dir, tmp_path)
    response = worker.handle({"id": "bad", "input": {"prompt": "a fox", "control": {"image": "x"}}})
    assert "control: only for Flux Control models (Canny, Depth)" in response["error"], response["error"]


def test_control_on_onnxruntime_matches_torch(cache_dir, tmp_path):
    done = run_export(tmp_path, cache_dir, "--model", "tiny-flux-control", "--components", "transformer")
    assert done.returncode == 0, done.stderr[-3000:]
    torch_worker = cpu_worker("tiny-flux-control", cache_dir, tmp_path)
    ort_worker = cpu_worker("tiny-flux-control", cache_dir, tmp_path, backend="onnxruntime")
    payload = {"prompt": "a fox", "control": {"image": to_base64(depth_map(128, 96))}, "num_images": 2, "seed": 1}
    expected = torch_worker.handle({"id": "t", "input": {**payload, "num_inference_steps": 3}})
    actual = ort_worker.handle({"id": "o", "input": {**payload, "num_inference_steps": 3}})
    assert actual["metrics"]["backends"]["transformer"] == "onnxruntime", actual["metrics"]["fallbacks"]
    assert actual["metrics"]["mode"] == "txt2img+control"
    for ours, theirs in zip(decoded(actual), decoded(expected), strict=True):
        assert np.abs(ours - theirs).max() <= 2


def edited_copy(source: Path, target: Path, pipeline_class: str, in_channels: int | None = None) -> Path:
    """A copy of a model folder whose model_index.json names ``pipeline_class`` (and whose transformer
    takes ``in_channels``)."""
    shutil.copytree(source, target)
    index = json.loads((target / "model_index.json").read_text())
    (target / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline_class}))
    if in_channels is not None:
        config = json.loads((target / "transformer" / "config.json").read_text())
        (target / "transformer" / "config.json").write_text(json.dumps({**config, "in_channels": in_channels}))
    return target


def test_the_variant_is_told_by_the_transformers_input_width(cache_dir, tmp_path):
    fill = builtin_model_folder("tiny-flux-fill", cache_dir)
    assert load_model(str(edited_copy(fill, tmp_path / "fill", "FluxPipeline")), cache_dir).family.name == "flux-fill"
    control = builtin_model_folder("tiny-flux-control", cache_dir)
    as_plain = edited_copy(control, tmp_path / "control", "FluxImg2ImgPipeline")
    assert load_model(str(as_plain), cache_dir).family.name == "flux-control"


@pytest.mark.parametrize(
    ("pipeline_class", "in_channels", "message"),
    [
        ("FluxFillPipeline", 64, "names FluxFillPipeline, but its transformer's in_channels (64) are those of flux"),
        ("FluxPipeline", 80, "in_channels 80 is none of Flux.1 (64), Control (128) or Fill (384)"),
    ],
)
def test_a_flux_folder_whose_configs_disagree_is_refused(cache_dir, tmp_path, pipeline_class, in_channels, message):
    folder = edited_copy(builtin_model_folder("tiny-flux", cache_dir), tmp_path / "odd", pipeline_class, in_channels)
    with pytest.raises(ModelError, match=re.escape(message)):
        load_model(str(folder), cache_dir)


def test_kontext_matches_diffusers(cache_dir, tmp_path):
    """Two images with true guidance (the reference's rows doubled); onnxruntime's test below runs one without."""
    worker = cpu_worker("tiny-flux-kontext", cache_dir, tmp_path)
    assert worker.model.family.name == "flux-kontext"
    payload = {"prompt": "make it a winter scene", "image": to_base64(picture(128, 96)), "num_inference_steps": 3}
    payload |= {"seed": 7, "width": 96, "height": 128, "num_images": 2, "guidance_scale": 5.0}
    payload |= {"negative_prompt": "fog", "true_cfg_scale": 2.5}
    pipe = diffusers_pipe(FluxKontextPipeline, worker)
    area = payload["width"] * payload["height"]  # diffusers scales the size to max_area; the worker keeps it
    assert_same_images(generate(worker, payload), reference_images(pipe, worker, payload, max_area=area))


@pytest.mark.parametrize("size", [(128, 96), (300, 700), (512, 512), (1600, 600)])
def test_kontext_sizes_its_reference_and_its_default_output_as_diffusers_does(cache_dir, tmp_path, size):
    worker = cpu_worker("tiny-flux-kontext", cache_dir, tmp_path)
    width, height = size[0] // 16 * 16, size[1] // 16 * 16
    expected = min((abs(width / height - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)[1:]
    assert worker.model.family.size_for_image(*size) == expected
    request, inputs = worker.resolve({"prompt": "a fox", "image": to_base64(picture(*size))})
    assert (request.width, request.height) == expected
    prepared = worker.pipeline.prepare_images(inputs, request)
    assert prepared.reference is not None and prepared.reference.shape[2:] == (expected[1], expected[0])


KONTEXT_ERRORS = {
    "no image": ({}, "image: flux-kontext models edit an image; send image"),
    "a strength": ({"image": "x", "strength": 0.5}, "strength: flux-kontext models take none"),
    "a mask": ({"image": "x", "mask": "x"}, "mask: not supported for flux-kontext models"),
}


@pytest.mark.parametrize("case", KONTEXT_ERRORS)
def test_what_kontext_does_not_take_gets_a_named_error(cache_dir, tmp_path, case):
    worker = cpu_worker("tiny-flux-kontext", cache_dir, tmp_path)
    extra, message = KONTEXT_ERRORS[case]
    response = worker.handle({"id": "bad", "input": {"prompt": "a fox", "num_inference_steps": 2, **extra}})
    assert response["status"] == "error"
    assert message in response["error"], response["error"]


def test_kontext_on_onnxruntime_matches_torch(cache_dir, tmp_path):
    done = run_export(tmp_path, cache_dir, "--model", "tiny-flux-kontext", "--components", "transformer")
    assert done.returncode == 0, done.stderr[-3000:]
    torch_worker = cpu_worker("tiny-flux-kontext", cache_dir, tmp_path)
    ort_worker = cpu_worker("tiny-flux-kontext", cache_dir, tmp_path, backend="onnxruntime")
    # the reference (1184x880 from a 4:3 image) is not the output's size: its own axis of the sequence
    payload = {"prompt": "a fox", "image": to_base64(picture(128, 96)), "width": 128, "height": 128, "seed": 1}
    payload |= {"num_inference_steps": 3}
    expected = torch_worker.handle({"id": "t", "input": payload})
    actual = ort_worker.handle({"id": "o", "input": payload})
    assert actual["metrics"]["backends"]["transformer"] == "onnxruntime", actual["metrics"]["fallbacks"]
    for ours, theirs in zip(decoded(actual), decoded(expected), strict=True):
        assert np.abs(ours - theirs).max() <= 2


@pytest.mark.parametrize(
    ("model", "extra", "mode"),
    [
        ("tiny-flux-kontext", {"image": to_base64(picture(64, 64)), "num_inference_steps": 1}, "edit"),
        ("tiny-flux-fill", {"image": to_base64(picture(64, 64)), "mask": to_base64(mask(64, 64))}, "inpaint"),
        ("tiny-flux", {"image": to_base64(picture(64, 64))}, "img2img"),
    ],
)
def test_the_mode_in_the_metrics_says_what_the_request_does(cache_dir, tmp_path, model, extra, mode):
    """Kontext's reference is never re-noised, so one step is a whole edit (img2img's default strength
    would leave no step)."""
    worker = cpu_worker(model, cache_dir, tmp_path)
    payload = {"prompt": "a fox", "num_inference_steps": 2, "width": 64, "height": 64, "seed": 1, **extra}
    response = worker.handle({"id": "m", "input": payload})
    assert response["status"] == "success", response
    assert response["metrics"]["mode"] == mode
