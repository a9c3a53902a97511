"""Inpainting against diffusers' inpaint pipelines (SD and SDXL, 4-channel and 9-channel UNets),
and on onnxruntime against torch."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers import (
    StableDiffusionInpaintPipeline,
    StableDiffusionXLInpaintPipeline,
)
from PIL import Image

from engine.common.errors import RequestError
from engine.serving.worker import Worker
from engine.settings import Settings
from tests.conftest import run_export
from tests.parity import assert_same_images, decoded, generate, picture, reference_images, to_base64


def mask_image(width: int = 64, height: int = 64, box: tuple[int, int, int, int] = (16, 16, 48, 40)) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, box)
    return mask


def inpaint(**extra) -> dict:
    return {
        "prompt": "a red fox",
        "image": to_base64(picture(64, 64)),
        "mask": to_base64(mask_image()),
        "width": 64,
        "height": 64,
        "num_inference_steps": 5,
        "seed": 3,
        **extra,
    }


def worker_for(model: str, cache_dir, engine_dir, backend: str = "torch") -> Worker:
    return Worker(Settings(model=model, cache_dir=cache_dir, engine_dir=engine_dir, device="cpu", backend=backend))


def reference(cls, worker: Worker):
    pipe = cls.from_pretrained(
        worker.model.folder, **({"safety_checker": None} if cls is not StableDiffusionXLInpaintPipeline else {})
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


SD_CASES = [
    {},  # strength 1: the masked region from noise
    {"strength": 0.6},
    {"scheduler": "euler_a", "num_images": 2},
    {"padding_mask_crop": 8, "strength": 0.7},
    {"mask": to_base64(mask_image(96, 80, (24, 20, 72, 60)))},  # a mask of another size is resized
]


@pytest.mark.parametrize("extra", SD_CASES)
def test_sd_inpainting_with_a_4_channel_unet_matches_diffusers(cache_dir, tmp_path, extra):
    worker = worker_for("tiny", cache_dir, tmp_path)
    assert_same_images(
        generate(worker, inpaint(**extra)),
        reference_images(reference(StableDiffusionInpaintPipeline, worker), worker, inpaint(**extra)),
    )


@pytest.mark.parametrize("extra", [{}, {"strength": 0.6, "scheduler": "euler_a"}, {"padding_mask_crop": 4}])
def test_sd_inpainting_with_a_9_channel_unet_matches_diffusers(inpainting_model, cache_dir, tmp_path, extra):
    worker = worker_for(str(inpainting_model), cache_dir, tmp_path)
    assert worker.model.specs["unet"].inputs[0].shape[1] == 9
    pipe = reference(StableDiffusionInpaintPipeline, worker)
    assert_same_images(generate(worker, inpaint(**extra)), reference_images(pipe, worker, inpaint(**extra)))


@pytest.mark.parametrize("extra", [{}, {"strength": 0.6}, {"padding_mask_crop": 8, "num_images": 2}])
def test_sdxl_inpainting_matches_diffusers(cache_dir, tmp_path, extra):
    worker = worker_for("tiny-sdxl", cache_dir, tmp_path)
    assert worker.resolve(inpaint())[0].strength == 0.9999, "StableDiffusionXLInpaintPipeline's default"
    pipe = reference(StableDiffusionXLInpaintPipeline, worker)
    assert_same_images(generate(worker, inpaint(**extra)), reference_images(pipe, worker, inpaint(**extra)))


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_onnxruntime_inpaints_as_torch_does(request, cache_dir, model):
    store = request.getfixturevalue("exported" if model == "tiny" else "exported_sdxl")
    torch_worker = worker_for(model, cache_dir, store)
    ort_worker = worker_for(model, cache_dir, store, backend="onnxruntime")
    for extra in ({}, {"strength": 0.6, "padding_mask_crop": 8}):
        expected = torch_worker.handle({"id": "t", "input": inpaint(**extra)})
        actual = ort_worker.handle({"id": "o", "input": inpaint(**extra)})
        assert actual["metrics"]["mode"] == expected["metrics"]["mode"] == "inpaint"
        assert set(actual["metrics"]["backends"].values()) == {"onnxruntime"}
        assert "vae_encode" in actual["metrics"]["stages_ms"]
        for mine, theirs in zip(decoded(actual), decoded(expected), strict=True):
            assert np.abs(mine - theirs).max() <= 2


def test_a_9_channel_unet_exports_and_inpaints_on_onnxruntime(inpainting_model, cache_dir, tmp_path):
    done = run_export(tmp_path, cache_dir, "--model", str(inpainting_model), "--components", "unet")
    assert done.returncode == 0, done.stderr[-3000:]
    torch_worker = worker_for(str(inpainting_model), cache_dir, tmp_path)
    ort_worker = Worker(
        Settings(
            model=str(inpainting_model),
            cache_dir=cache_dir,
            engine_dir=tmp_path,
            device="cpu",
            component_backends={"unet": "onnxruntime"},
            backend="torch",
        )
    )
    expected = torch_worker.handle({"id": "t", "input": inpaint()})
    actual = ort_worker.handle({"id": "o", "input": inpaint()})
    assert actual["metrics"]["backends"]["unet"] == "onnxruntime"
    for mine, theirs in zip(decoded(actual), decoded(expected), strict=True):
        assert np.abs(mine - theirs).max() <= 2


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"prompt": "x", "mask": to_base64(mask_image())}, "mask: needs an image, the picture to inpaint"),
        (inpaint(mask="bm90IGFuIGltYWdl"), "mask: not a PNG, JPEG or WebP image"),
        (inpaint(mask="%%%"), "mask: not valid base64"),
        ({"prompt": "x", "padding_mask_crop": 8}, "padding_mask_crop: only applies with a mask"),
        (inpaint(padding_mask_crop=-1), "padding_mask_crop: Input should be greater than or equal to 0"),
        (
            inpaint(mask=to_base64(Image.new("L", (96, 80))), padding_mask_crop=8),
            "mask: the mask is empty (all black); padding_mask_crop needs a white region",
        ),
    ],
)
def test_bad_inpainting_requests_name_the_field_and_the_worker_goes_on(cache_dir, tmp_path, payload, message):
    worker = worker_for("tiny", cache_dir, tmp_path)
    response = worker.handle({"id": "bad", "input": payload})
    assert response["status"] == "error" and message in response["error"], response
    assert worker.handle({"id": "ok", "input": inpaint(num_inference_steps=2)})["status"] == "success"


def test_a_mask_of_another_size_is_resized_to_the_image_before_the_crop(cache_dir, tmp_path):
    """The same image as when the client resizes the mask itself; outside the mask, the image as it was."""
    worker = worker_for("tiny", cache_dir, tmp_path)
    large = mask_image(96, 80, (24, 20, 72, 60))
    resized = large.convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)
    ours = decoded(worker.handle({"id": "a", "input": inpaint(mask=to_base64(large), padding_mask_crop=4)}))
    theirs = decoded(worker.handle({"id": "b", "input": inpaint(mask=to_base64(resized), padding_mask_crop=4)}))
    assert np.array_equal(ours[0], theirs[0])
    kept = np.asarray(resized.convert("L")) == 0
    assert np.array_equal(ours[0][kept], np.asarray(picture(64, 64), dtype=np.int16)[kept]), "pasted back"


def test_an_empty_mask_with_a_crop_is_refused_before_anything_runs(cache_dir, tmp_path, monkeypatch):
    worker = worker_for("tiny", cache_dir, tmp_path)
    monkeypatch.setattr(worker.pipeline, "prepare_images", lambda *args: pytest.fail("prepared an empty mask"))
    with pytest.raises(RequestError, match=r"^mask: the mask is empty \(all black\)"):
        worker.resolve(inpaint(mask=to_base64(Image.new("RGB", (64, 64))), padding_mask_crop=0))
    monkeypatch.undo()
    assert worker.handle({"id": "e", "input": inpaint(mask=to_base64(Image.new("L", (64, 64))))})["status"] == (
        "success"
    ), "without a crop, an empty mask repaints nothing, as in diffusers"


def test_an_inpainting_model_refuses_text_to_image_with_a_reason(inpainting_model, cache_dir, tmp_path):
    worker = worker_for(str(inpainting_model), cache_dir, tmp_path)
    response = worker.handle({"id": "t", "input": {"prompt": "a fox", "num_inference_steps": 2}})
    assert response["status"] == "error"
    assert response["error"].startswith("mask: this is an inpainting model")


def test_an_inpainting_model_warms_up_on_an_inpainting_call(inpainting_model, cache_dir, tmp_path):
    worker = worker_for(str(inpainting_model), cache_dir, tmp_path)
    worker.warmup()
    assert worker.handle({"id": "i", "input": inpaint(num_inference_steps=2)})["status"] == "success"
