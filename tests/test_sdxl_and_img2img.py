"""The worker serves tiny-sdxl, image-to-image and long weighted prompts on PyTorch and, after export,
on ONNX Runtime."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from engine.serving.worker import Worker
from tests.conftest import ROOT, worker_env
from tests.parity import picture, to_base64

SDXL_COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder")
TEXT = {"prompt": "a red fox", "width": 96, "height": 64, "num_inference_steps": 5, "seed": 3}
IMAGE = {
    "prompt": "a red fox",
    "image": to_base64(picture(72, 96)),
    "strength": 0.6,
    "num_inference_steps": 6,
    "seed": 4,
}
LONG_WEIGHTED = {  # 201 tokens in three chunks, weighted, with a BREAK
    "prompt": "(a watercolor painting:1.3) of a ((lighthouse)) on a rocky coast at dusk, [seagulls] over the waves, "
    "warm light in the windows, (fishing boats:0.7) in the harbor, seen from a cliff path BREAK clouds lit orange "
    "and violet, (fine detail:1.2), soft brush strokes on rough paper",
    "negative_prompt": "(blurry:1.2), [cropped]",
    "width": 64,
    "height": 64,
    "num_inference_steps": 4,
    "seed": 5,
}


def images(response: dict) -> list[np.ndarray]:
    assert response["status"] == "success", response
    return [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(item["image"]))), dtype=np.int16)
        for item in response["output"]
    ]


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"])
def test_onnxruntime_after_export_matches_torch_for_both_tasks(request, model, make_settings):
    store = request.getfixturevalue("exported" if model == "tiny" else "exported_sdxl")
    torch_worker = Worker(make_settings(model=model, backend="torch", engine_dir=store))
    ort_worker = Worker(make_settings(model=model, backend="onnxruntime", engine_dir=store))
    for payload, components in ((TEXT, ()), (LONG_WEIGHTED, ()), (IMAGE, ("vae_encoder",))):
        expected = torch_worker.handle({"id": "t", "input": payload})
        actual = ort_worker.handle({"id": "o", "input": payload})
        encoders = SDXL_COMPONENTS if model == "tiny-sdxl" else ("text_encoder", "unet", "vae_decoder")
        assert actual["metrics"]["backends"] == dict.fromkeys((*encoders, *components), "onnxruntime")
        assert set(expected["metrics"]["backends"].values()) == {"torch"}
        for mine, reference in zip(images(actual), images(expected), strict=True):
            assert np.abs(mine - reference).max() <= 2
        mode = "img2img" if components else "txt2img"
        assert actual["metrics"]["mode"] == expected["metrics"]["mode"] == mode
        if payload is LONG_WEIGHTED:
            assert actual["metrics"]["prompt_tokens"] == [201]
            assert actual["metrics"]["prompt_chunks"] == 3
    assert "vae_encode" in actual["metrics"]["stages_ms"]
    assert actual["metrics"]["image_size"] == "72x96"


def test_image_to_image_output_takes_the_input_size_unless_asked(make_settings):
    worker = Worker(make_settings(backend="torch"))
    assert images(worker.handle({"id": "a", "input": IMAGE}))[0].shape[:2] == (96, 72)
    resized = worker.handle({"id": "b", "input": {**IMAGE, "width": 64, "height": 64}})
    assert images(resized)[0].shape[:2] == (64, 64)
    odd = worker.handle({"id": "c", "input": {**IMAGE, "image": to_base64(picture(75, 70))}})
    assert images(odd)[0].shape[:2] == (64, 72)


def test_a_bad_image_is_a_clear_error_and_the_worker_goes_on(make_settings):
    worker = Worker(make_settings(backend="torch"))
    response = worker.handle({"id": "bad", "input": {**IMAGE, "image": "%%%"}})
    assert response == {"status": "error", "error": "image: not valid base64 (or an http(s) URL)", "request_id": "bad"}
    assert worker.handle({"id": "good", "input": IMAGE})["status"] == "success"


def test_the_handler_serves_sdxl_image_to_image(cache_dir, tmp_path):
    import subprocess
    import sys

    env = worker_env(cache_dir, tmp_path / "engines", MODEL="tiny-sdxl")
    done = subprocess.run(
        [sys.executable, "handler.py", "--test_input", json.dumps({"input": IMAGE})],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    response = json.loads(next(line for line in done.stdout.splitlines() if line.startswith('{"status"')))
    assert response["metrics"]["backends"] == {**dict.fromkeys(SDXL_COMPONENTS, "torch"), "vae_encoder": "torch"}
    assert images(response)[0].shape[:2] == (96, 72)
