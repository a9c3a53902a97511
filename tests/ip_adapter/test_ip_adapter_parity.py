"""Image prompts against diffusers' own IP-Adapter loading, on the torch backend.

The reference is diffusers' pipeline after ``load_ip_adapter`` (the adapter file and the
``image_encoder/`` folder beside it), ``set_ip_adapter_scale`` and ``ip_adapter_image``; the worker
must give the same image within 2/255 per pixel, for SD and SDXL, plain, Plus and Full Face adapters,
at two scales and at per-block (InstantStyle) scales, with a LoRA in the same request, with a ControlNet,
for image-to-image, and with two adapters in one request.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.serving.worker import Worker
from engine.settings import Settings
from tests.ip_adapter.conftest import image_prompt, load_adapters, to_base64
from tests.lora.conftest import PAYLOAD, image_of, reference_pipeline
from tests.parity import TOLERANCE


def ip_payload(name: str, scale: float | dict, loras: tuple[tuple[str, float], ...] = (), images: int = 1) -> dict:
    entry = {"name": name, "scale": scale}
    if images == 1:
        entry["image"] = to_base64(image_prompt(0))
    else:
        entry["images"] = [to_base64(image_prompt(seed)) for seed in range(images)]
    payload = {**PAYLOAD, "ip_adapters": [entry]}
    if loras:
        payload["loras"] = [{"name": lora, "scale": lora_scale} for lora, lora_scale in loras]
    return payload


def diffusers_image(model, cache_dir, root, name, scale, loras=(), images=1) -> np.ndarray:
    folder, _, file = name.rpartition("/")
    pipe = load_adapters(reference_pipeline(model, cache_dir), root, folder, file, scale)
    for index, (lora, lora_scale) in enumerate(loras):
        pipe.load_lora_weights(str(root / "loras" / f"{lora}.safetensors"), adapter_name=f"l{index}")
        pipe.set_adapters([f"l{index}"], adapter_weights=[lora_scale])
    prompts = [image_prompt(seed) for seed in range(images)]
    image = pipe(
        PAYLOAD["prompt"],
        num_inference_steps=PAYLOAD["num_inference_steps"],
        width=PAYLOAD["width"],
        height=PAYLOAD["height"],
        generator=torch.Generator().manual_seed(PAYLOAD["seed"]),
        ip_adapter_image=prompts[0] if images == 1 else [prompts],
    ).images[0]
    return np.asarray(image, dtype=np.int16)


def make_worker(model, cache_dir, engine_dir, root) -> Worker:
    return Worker(
        Settings(
            model=model,
            cache_dir=cache_dir,
            engine_dir=engine_dir,
            ip_adapter_dir=root,
            lora_dir=root / "loras",
            device="cpu",
            backend="torch",
            ready_file=engine_dir / "ready",
            max_ip_adapters=2,
        )
    )


@pytest.fixture(scope="module")
def workers(request, cache_dir, tmp_path_factory):
    """A torch worker per model, made when a test first asks for it, with its adapters' folder."""
    made: dict[str, tuple[Worker, object]] = {}

    def get(model: str) -> tuple[Worker, object]:
        if model not in made:
            root = request.getfixturevalue("sd_adapters" if model == "tiny" else "sdxl_adapters")
            made[model] = (make_worker(model, cache_dir, tmp_path_factory.mktemp("engines"), root), root)
        return made[model]

    return get


CASES = [
    ("models/plain", 1.0, ()),
    ("models/plain", 0.5, ()),
    ("models/plus", 0.7, ()),
    ("models/plus", 1.0, (("c", 1.0),)),
    ("models/full-face", 0.6, ()),
]


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"], ids=["sd", "sdxl"])
@pytest.mark.parametrize(
    ("name", "scale", "loras"), CASES, ids=["plain-1", "plain-0.5", "plus-0.7", "plus+lora", "full-face"]
)
def test_image_prompts_match_diffusers(workers, cache_dir, model, name, scale, loras):
    worker, root = workers(model)
    reference = diffusers_image(model, cache_dir, root, name, scale, loras)
    plain = image_of(worker.handle({"input": PAYLOAD}))
    assert np.abs(reference - plain).max() > 4 * TOLERANCE, (
        "the adapter must change the image for the test to mean much"
    )
    response = worker.handle({"input": ip_payload(name, scale, loras)})
    difference = np.abs(image_of(response) - reference).max()
    assert difference <= TOLERANCE, f"{difference}/255 from diffusers"
    assert response["metrics"]["backends"]["unet_ip"] == "torch"
    assert "unet" not in response["metrics"]["backends"], "an image prompt runs the IP denoiser alone"


INSTANT_STYLE = {"down": {"block_1": [0.6]}, "up": {"block_0": [0.0, 1.0]}}
"""InstantStyle's shape on the tiny UNets (down block 1 has one attention layer, up block 0 two; SDXL's
have two transformer blocks each): the mid block, not given, is 0 as diffusers expands it."""


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"], ids=["sd", "sdxl"])
def test_per_block_scales_match_diffusers(workers, cache_dir, model):
    """``set_ip_adapter_scale`` with a dict: a different scale per layer, 0 in some, in one graph's input."""
    worker, root = workers(model)
    reference = diffusers_image(model, cache_dir, root, "models/plus", INSTANT_STYLE)
    response = worker.handle({"input": ip_payload("models/plus", INSTANT_STYLE)})
    difference = np.abs(image_of(response) - reference).max()
    assert difference <= TOLERANCE, f"{difference}/255 from diffusers"
    assert response["metrics"]["ip_adapters"][0]["scale"] == INSTANT_STYLE
    everywhere = image_of(worker.handle({"input": ip_payload("models/plus", 0.6)}))
    assert np.abs(everywhere - reference).max() > 4 * TOLERANCE, "per-block scales must change the image"


TWO_ADAPTERS = (("plain", 0, 0.5), ("plus", 1, INSTANT_STYLE))
"""A plain adapter at 0.5 and a Plus one at per-block scales, each with its own image prompt."""


def two_adapters() -> list[dict]:
    return [
        {"name": f"models/{name}", "image": to_base64(image_prompt(seed)), "scale": scale}
        for name, seed, scale in TWO_ADAPTERS
    ]


def test_two_adapters_match_diffusers(workers, cache_dir):
    """Two IP-Adapters in one request, as diffusers loads a list of them: each with its own IP matrices, image
    and scale (the Plus one's per block), in the IP denoiser with two adapter slots."""
    worker, root = workers("tiny")
    names, scales = [n for n, _, _ in TWO_ADAPTERS], [scale for _, _, scale in TWO_ADAPTERS]
    pipe = load_adapters(reference_pipeline("tiny", cache_dir), root, "models", names, scales)
    reference = pipe(
        PAYLOAD["prompt"],
        num_inference_steps=PAYLOAD["num_inference_steps"],
        width=PAYLOAD["width"],
        height=PAYLOAD["height"],
        generator=torch.Generator().manual_seed(PAYLOAD["seed"]),
        ip_adapter_image=[image_prompt(seed) for _, seed, _ in TWO_ADAPTERS],
    ).images[0]
    reference = np.asarray(reference, dtype=np.int16)
    response = worker.handle({"input": {**PAYLOAD, "ip_adapters": two_adapters()}})
    assert response["metrics"]["backends"]["unet_ip2"] == "torch", response
    difference = np.abs(image_of(response) - reference).max()
    assert difference <= TOLERANCE, f"{difference}/255 from diffusers"
    alone = image_of(worker.handle({"input": {**PAYLOAD, "ip_adapters": two_adapters()[:1]}}))
    assert np.abs(alone - reference).max() > 4 * TOLERANCE, "the second adapter must change the image"


@pytest.mark.parametrize("adapters", [1, 2], ids=["one-adapter", "two-adapters"])
def test_controlnets_and_image_prompts_together_match_diffusers(workers, cache_dir, tmp_path, adapters):
    """A ControlNet acting on part of the steps: the controlled IP denoiser there, the IP denoiser elsewhere,
    against diffusers' ControlNet pipeline after ``load_ip_adapter``; with one adapter, or two."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from engine.models.builtin import builtin_model_folder
    from tests.test_controlnet import control_picture, make_controlnet

    worker, root = workers("tiny")
    make_controlnet(builtin_model_folder("tiny", cache_dir), tmp_path / "edges", seed=1)
    worker.controlnets.root = tmp_path
    scale, start = 0.8, 0.5
    payload = ip_payload("models/plus", 0.7) if adapters == 1 else {**PAYLOAD, "ip_adapters": two_adapters()}
    payload["controlnets"] = [{"name": "edges", "image": to_base64(control_picture()), "scale": scale, "start": start}]
    response = worker.handle({"input": payload})
    suffix = "" if adapters == 1 else "2"
    assert {f"unet_ip{suffix}", f"unet_controlled_ip{suffix}"} <= set(response["metrics"]["backends"]), response
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        worker.model.folder, controlnet=ControlNetModel.from_pretrained(tmp_path / "edges"), safety_checker=None
    )
    if adapters == 1:
        load_adapters(pipe, root, "models", "plus", 0.7)
    else:
        load_adapters(pipe, root, "models", [n for n, _, _ in TWO_ADAPTERS], [s for _, _, s in TWO_ADAPTERS])
    reference = pipe(
        PAYLOAD["prompt"],
        image=control_picture(),
        num_inference_steps=PAYLOAD["num_inference_steps"],
        width=PAYLOAD["width"],
        height=PAYLOAD["height"],
        generator=torch.Generator().manual_seed(PAYLOAD["seed"]),
        ip_adapter_image=image_prompt(0) if adapters == 1 else [image_prompt(seed) for _, seed, _ in TWO_ADAPTERS],
        controlnet_conditioning_scale=scale,
        control_guidance_start=start,
    ).images[0]
    difference = np.abs(image_of(response) - np.asarray(reference, dtype=np.int16)).max()
    assert difference <= TOLERANCE, f"{difference}/255 from diffusers"


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl"], ids=["sd", "sdxl"])
def test_several_images_join_their_tokens_as_diffusers(workers, cache_dir, model):
    worker, root = workers(model)
    reference = diffusers_image(model, cache_dir, root, "models/plain", 0.8, images=2)
    difference = np.abs(image_of(worker.handle({"input": ip_payload("models/plain", 0.8, images=2)})) - reference).max()
    assert difference <= TOLERANCE, f"{difference}/255 from diffusers"


def test_image_to_image_with_an_image_prompt_matches_diffusers(workers, cache_dir):
    from diffusers import StableDiffusionImg2ImgPipeline

    worker, root = workers("tiny")
    start = image_prompt(7, size=64).resize((64, 64))
    payload = {**ip_payload("models/plain", 0.9), "image": to_base64(start), "strength": 0.7}
    response = worker.handle({"input": payload})
    assert response["metrics"]["mode"] == "img2img+ip_adapter"
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(worker.model.folder, safety_checker=None)
    load_adapters(pipe, root, "models", "plain", 0.9)
    reference = pipe(
        PAYLOAD["prompt"],
        image=start,
        strength=0.7,
        num_inference_steps=PAYLOAD["num_inference_steps"],
        generator=torch.Generator().manual_seed(PAYLOAD["seed"]),
        ip_adapter_image=image_prompt(0),
    ).images[0]
    difference = np.abs(image_of(response) - np.asarray(reference, dtype=np.int16)).max()
    assert difference <= TOLERANCE, f"{difference}/255 from diffusers"


def test_inpainting_with_an_image_prompt_matches_diffusers(workers, cache_dir):
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    worker, root = workers("tiny")
    start = image_prompt(7, size=64).resize((64, 64))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 56))
    payload = {**ip_payload("models/plus", 0.8), "image": to_base64(start), "mask": to_base64(mask)}
    response = worker.handle({"input": payload})
    assert response["metrics"]["mode"] == "inpaint+ip_adapter"
    pipe = StableDiffusionInpaintPipeline.from_pretrained(worker.model.folder, safety_checker=None)
    load_adapters(pipe, root, "models", "plus", 0.8)
    reference = pipe(
        PAYLOAD["prompt"],
        image=start,
        mask_image=mask,
        num_inference_steps=PAYLOAD["num_inference_steps"],
        generator=torch.Generator().manual_seed(PAYLOAD["seed"]),
        ip_adapter_image=image_prompt(0),
    ).images[0]
    difference = np.abs(image_of(response) - np.asarray(reference, dtype=np.int16)).max()
    assert difference <= TOLERANCE, f"{difference}/255 from diffusers"
