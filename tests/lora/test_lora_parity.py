"""LoRA images against diffusers' own LoRA loading, on every backend that runs here.

The reference is diffusers' pipeline with ``load_lora_weights(..., adapter_name=...)`` and
``set_adapters(names, adapter_weights=scales)``; the worker must give the same image within
2/255 per pixel, for SD and SDXL, with text-encoder parts, in the PEFT and kohya layouts,
at several ranks and alphas, two LoRAs at once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler

from tests.lora.conftest import PAYLOAD, image_of, make_worker, reference_pipeline
from tests.parity import TOLERANCE

CASES = {
    "peft+kohya": [("a", 0.8), ("styles/b", 0.6)],
    "kohya-unet-only": [("c.safetensors", -1.5)],
}


def lora_payload(loras: list[tuple[str, float]]) -> dict:
    return {**PAYLOAD, "loras": [{"name": name, "scale": scale} for name, scale in loras]}


def diffusers_image(model: str, cache_dir, folder, loras: list[tuple[str, float]], **call) -> np.ndarray:
    """diffusers' image with the LoRAs loaded; ``call`` overrides the pipeline's arguments (its
    ``scheduler`` is set on the pipeline, from its own config)."""
    pipe = reference_pipeline(model, cache_dir)
    if "scheduler" in call:
        pipe.scheduler = call.pop("scheduler").from_config(pipe.scheduler.config)
    names = []
    for index, (name, _) in enumerate(loras):
        file = folder / (name if name.endswith(".safetensors") else f"{name}.safetensors")
        pipe.load_lora_weights(str(file), adapter_name=f"lora{index}")
        names.append(f"lora{index}")
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
    image = pipe(
        PAYLOAD["prompt"],
        num_inference_steps=PAYLOAD["num_inference_steps"],
        width=PAYLOAD["width"],
        height=PAYLOAD["height"],
        generator=torch.Generator().manual_seed(PAYLOAD["seed"]),
        **call,
    ).images[0]
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def sd_workers(cache_dir, exported, sd_loras):
    return {
        backend: make_worker("tiny", cache_dir, exported, sd_loras, backend) for backend in ("torch", "onnxruntime")
    }


@pytest.fixture(scope="module")
def sdxl_workers(cache_dir, exported_sdxl, sdxl_loras):
    return {
        backend: make_worker("tiny-sdxl", cache_dir, exported_sdxl, sdxl_loras, backend)
        for backend in ("torch", "onnxruntime")
    }


FAMILIES = [("tiny", "sd_workers", "sd_loras"), ("tiny-sdxl", "sdxl_workers", "sdxl_loras")]


@pytest.mark.parametrize(("model", "workers_fixture", "loras_fixture"), FAMILIES, ids=["sd", "sdxl"])
@pytest.mark.parametrize("case", list(CASES))
def test_lora_images_match_diffusers_on_torch_and_onnxruntime(
    request, cache_dir, model, workers_fixture, loras_fixture, case
):
    workers = request.getfixturevalue(workers_fixture)
    folder = request.getfixturevalue(loras_fixture)
    loras = CASES[case]
    reference = diffusers_image(model, cache_dir, folder, loras)
    base = image_of(workers["torch"].handle({"input": PAYLOAD}))
    assert np.abs(reference - base).max() > 4 * TOLERANCE, "the LoRAs must change the image for the test to mean much"
    for backend, worker in workers.items():
        response = worker.handle({"input": lora_payload(loras)})
        image = image_of(response)
        assert set(response["metrics"]["backends"].values()) == {backend}, response["metrics"]["fallbacks"]
        difference = np.abs(image - reference).max()
        assert difference <= TOLERANCE, f"{backend}: {difference}/255 from diffusers"


@pytest.mark.parametrize(("model", "workers_fixture"), [("tiny", "sd_workers"), ("tiny-sdxl", "sdxl_workers")])
def test_switching_sets_always_starts_from_the_base_weights(request, model, workers_fixture):
    """A -> B -> A gives A's image byte for byte both times; no LoRA after any gives the base image."""
    for backend, worker in request.getfixturevalue(workers_fixture).items():
        base = image_of(worker.handle({"input": PAYLOAD}))
        a_payload, b_payload = lora_payload(CASES["peft+kohya"]), lora_payload(CASES["kohya-unet-only"])
        first_a = worker.handle({"input": a_payload})
        b = image_of(worker.handle({"input": b_payload}))
        second_a = worker.handle({"input": a_payload})
        again_a = worker.handle({"input": a_payload})
        after = image_of(worker.handle({"input": PAYLOAD}))
        assert np.array_equal(image_of(first_a), image_of(second_a)), backend
        assert not np.array_equal(image_of(first_a), b), backend
        assert np.array_equal(after, base), f"{backend}: the base image must come back exactly"
        assert again_a["metrics"]["lora_ms"] == 0, f"{backend}: the set was in place already"
        if backend == "torch":  # onnxruntime may switch to a session it keeps for the set: no work to time
            assert first_a["metrics"]["lora_ms"] > 0
        assert [entry["name"] for entry in first_a["metrics"]["loras"]] == ["a", "styles/b"]
        assert all(len(entry["sha256"]) == 64 for entry in first_a["metrics"]["loras"])


@pytest.mark.parametrize(("model", "workers_fixture", "loras_fixture"), FAMILIES, ids=["sd", "sdxl"])
def test_an_lcm_lora_request_matches_diffusers_lcm_recipe(request, cache_dir, model, workers_fixture, loras_fixture):
    """An LCM-LoRA (a UNet-only LoRA file) with ``scheduler: lcm`` and guidance 1 against diffusers' LCM-LoRA
    recipe: ``load_lora_weights``, ``LCMScheduler.from_config`` and ``guidance_scale=1``."""
    loras = CASES["kohya-unet-only"]
    reference = diffusers_image(
        model, cache_dir, request.getfixturevalue(loras_fixture), loras, scheduler=LCMScheduler, guidance_scale=1.0
    )
    payload = {**lora_payload(loras), "scheduler": "LCM", "guidance_scale": 1.0}
    for backend, worker in request.getfixturevalue(workers_fixture).items():
        response = worker.handle({"input": payload})
        assert set(response["metrics"]["backends"].values()) == {backend}, response["metrics"]["fallbacks"]
        difference = np.abs(image_of(response) - reference).max()
        assert difference <= TOLERANCE, f"{backend}: {difference}/255 from diffusers"
