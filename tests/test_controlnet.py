"""ControlNet against diffusers' ControlNet pipelines (SD and SDXL, each in text-to-image, image-to-image and
inpainting; one and two ControlNets; with a LoRA), on onnxruntime against torch, and its request errors.

The ControlNets are held-out tiny ones made here from the tiny models' UNets. diffusers starts a
ControlNet with its output convolutions at zero (its residuals would then change nothing), so
every parameter is drawn at random from a seed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
    UNet2DConditionModel,
)
from PIL import Image, ImageDraw

from engine.common.errors import ConfigError
from engine.models.builtin import builtin_model_folder
from engine.models.controlnet import CONTROLLED_UNET
from engine.models.model import load_model
from engine.serving.worker import Worker
from engine.settings import Settings
from perf.lora_files import write_lora
from tests.conftest import ROOT, export_command
from tests.parity import assert_same_images, decoded, generate, picture, reference_images, to_base64
from tests.test_inpaint import mask_image


def make_controlnet(model_folder: Path, target: Path, seed: int) -> ControlNetModel:
    """A ControlNet with the model's UNet's encoder, every weight random (scaled down, like trained ones)."""
    unet = UNet2DConditionModel.from_pretrained(model_folder / "unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in controlnet.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    controlnet.save_pretrained(target)
    return controlnet


@pytest.fixture(scope="module")
def controlnet_dir(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two SD ControlNets (``edges``, ``depth``) and one SDXL ControlNet (``edges-xl``)."""
    root = tmp_path_factory.mktemp("controlnets")
    make_controlnet(builtin_model_folder("tiny", cache_dir), root / "edges", seed=1)
    make_controlnet(builtin_model_folder("tiny", cache_dir), root / "depth", seed=2)
    make_controlnet(builtin_model_folder("tiny-sdxl", cache_dir), root / "edges-xl", seed=3)
    return root


def worker_for(model: str, cache_dir: Path, engine_dir: Path, controlnet_dir: Path, **extra) -> Worker:
    settings = Settings(
        model=model,
        cache_dir=cache_dir,
        engine_dir=engine_dir,
        controlnet_dir=controlnet_dir,
        device="cpu",
        **{"backend": "torch", **extra},
    )
    return Worker(settings)


def control_picture(width: int = 64, height: int = 64) -> Image.Image:
    """A line drawing: what an edge map looks like."""
    image = Image.new("RGB", (width, height), "black")
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 6, height // 5, width * 5 // 6, height * 4 // 5), outline="white", width=2)
    draw.line((0, height - 8, width, 8), fill="white", width=2)
    return image


def controlled(*controlnets: dict, **extra) -> dict:
    return {
        "prompt": "a red fox",
        "width": 64,
        "height": 64,
        "num_inference_steps": 4,
        "seed": 5,
        "controlnets": list(controlnets),
        **extra,
    }


def entry(name: str = "edges", **extra) -> dict:
    return {"name": name, "image": to_base64(control_picture()), **extra}


def reference_pipe(cls, worker: Worker, controlnet_dir: Path, names: list[str]):
    controlnets = [ControlNetModel.from_pretrained(controlnet_dir / name) for name in names]
    optional = {} if "XL" in cls.__name__ else {"safety_checker": None}
    pipe = cls.from_pretrained(
        worker.model.folder, controlnet=controlnets if len(controlnets) > 1 else controlnets[0], **optional
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def uncontrolled(worker: Worker, payload: dict) -> list[np.ndarray]:
    return generate(worker, {key: value for key, value in payload.items() if key != "controlnets"})


SD_CASES = {
    "one": [entry()],
    "scaled and late": [entry(scale=0.6, start=0.5)],
    "two, each for part of the steps": [entry(scale=1.3, end=0.5), entry("depth", scale=0.7, start=0.25)],
}


@pytest.mark.parametrize("case", SD_CASES)
def test_sd_text_to_image_matches_diffusers(cache_dir, tmp_path, controlnet_dir, case):
    worker = worker_for("tiny", cache_dir, tmp_path, controlnet_dir)
    payload = controlled(*SD_CASES[case], width=64, height=80, num_images=2)
    ours = generate(worker, payload)
    names = [controlnet["name"] for controlnet in SD_CASES[case]]
    pipe = reference_pipe(StableDiffusionControlNetPipeline, worker, controlnet_dir, names)
    assert_same_images(ours, reference_images(pipe, worker, payload))
    plain = uncontrolled(worker, payload)
    assert max(np.abs(mine - other).max() for mine, other in zip(ours, plain, strict=True)) > 20, "no visible effect"


def test_sd_image_to_image_matches_diffusers(cache_dir, tmp_path, controlnet_dir):
    worker = worker_for("tiny", cache_dir, tmp_path, controlnet_dir)
    payload = controlled(entry(scale=0.8), image=to_base64(picture(64, 64)), strength=0.7, scheduler="euler_a")
    pipe = reference_pipe(StableDiffusionControlNetImg2ImgPipeline, worker, controlnet_dir, ["edges"])
    assert_same_images(generate(worker, payload), reference_images(pipe, worker, payload))


@pytest.mark.parametrize("extra", [{}, {"strength": 0.7, "padding_mask_crop": 8}])
def test_sd_inpainting_matches_diffusers(cache_dir, tmp_path, controlnet_dir, extra):
    worker = worker_for("tiny", cache_dir, tmp_path, controlnet_dir)
    payload = controlled(entry(), image=to_base64(picture(64, 64)), mask=to_base64(mask_image()), **extra)
    pipe = reference_pipe(StableDiffusionControlNetInpaintPipeline, worker, controlnet_dir, ["edges"])
    assert_same_images(generate(worker, payload), reference_images(pipe, worker, payload))


def test_inpainting_with_a_9_channel_unet_matches_diffusers(inpainting_model, cache_dir, tmp_path, controlnet_dir):
    """The ControlNet takes the 4 latent channels; the UNet its 9."""
    worker = worker_for(str(inpainting_model), cache_dir, tmp_path, controlnet_dir)
    payload = controlled(entry(scale=1.5), image=to_base64(picture(64, 64)), mask=to_base64(mask_image()))
    pipe = reference_pipe(StableDiffusionControlNetInpaintPipeline, worker, controlnet_dir, ["edges"])
    assert_same_images(generate(worker, payload), reference_images(pipe, worker, payload))


def test_loras_change_the_controlled_unet_as_they_change_the_unet(cache_dir, tmp_path, controlnet_dir):
    """The controlled UNet shares the UNet's torch weights: a LoRA set through either is the other's,
    and the base weights come back for both."""
    write_lora(
        load_model("tiny", cache_dir), tmp_path / "loras" / "style.safetensors", "kohya", seed=3, rank=8, alpha=16
    )
    worker = worker_for("tiny", cache_dir, tmp_path / "engines", controlnet_dir, lora_dir=tmp_path / "loras")
    payload = controlled(entry(), loras=[{"name": "style", "scale": 0.8}])
    before = decoded(worker.handle({"input": controlled(entry())}))
    with_lora = decoded(worker.handle({"input": payload}))
    assert decoded(worker.handle({"input": {**payload, "controlnets": None}}))  # the UNet's own chain sets it
    assert np.array_equal(decoded(worker.handle({"input": controlled(entry())}))[0], before[0])
    pipe = reference_pipe(StableDiffusionControlNetPipeline, worker, controlnet_dir, ["edges"])
    pipe.load_lora_weights(str(tmp_path / "loras" / "style.safetensors"), adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.8])
    reference = reference_images(pipe, worker, payload)
    assert np.abs(reference[0] - before[0]).max() > 8, "the LoRA must change the image for the test to mean much"
    assert_same_images(with_lora, reference)


SDXL_CASES = {
    "text-to-image": (StableDiffusionXLControlNetPipeline, {"width": 80, "height": 64}),
    "image-to-image": (
        StableDiffusionXLControlNetImg2ImgPipeline,
        {"image": to_base64(picture(64, 64)), "strength": 0.7},
    ),
    "inpainting": (
        StableDiffusionXLControlNetInpaintPipeline,
        {"image": to_base64(picture(64, 64)), "mask": to_base64(mask_image())},
    ),
}


@pytest.mark.parametrize("case", SDXL_CASES)
def test_sdxl_matches_diffusers(cache_dir, tmp_path, controlnet_dir, case):
    worker = worker_for("tiny-sdxl", cache_dir, tmp_path, controlnet_dir)
    cls, extra = SDXL_CASES[case]
    payload = controlled(entry("edges-xl", scale=0.9, end=0.75), **extra)
    pipe = reference_pipe(cls, worker, controlnet_dir, ["edges-xl"])
    assert_same_images(generate(worker, payload), reference_images(pipe, worker, payload))


def test_the_first_control_image_sets_the_default_size(cache_dir, tmp_path, controlnet_dir):
    worker = worker_for("tiny", cache_dir, tmp_path, controlnet_dir)
    payload = controlled({"name": "edges", "image": to_base64(control_picture(88, 76))})
    del payload["width"], payload["height"]
    request, _ = worker.resolve(payload)
    assert (request.width, request.height) == (88, 72)


def test_canny_preprocessing_is_opencvs_edge_map(cache_dir, tmp_path, controlnet_dir):
    import cv2

    worker = worker_for("tiny", cache_dir, tmp_path, controlnet_dir)
    photo = picture(64, 64, seed=4).resize((64, 64))
    opencv = cv2.Canny(np.asarray(photo.convert("RGB")), 50, 120)  # the reference: OpenCV itself, white edges
    assert set(np.unique(opencv)) == {0, 255} and (opencv == 255).mean() < 0.5
    edges = Image.fromarray(np.repeat(opencv[:, :, None], 3, axis=2))
    given = generate(worker, controlled(entry(image=to_base64(edges))))
    made = generate(worker, controlled(entry(image=to_base64(photo), preprocess="canny", low=50, high=120)))
    assert_same_images(made, given)


def test_metrics_name_each_controlnet_and_its_steps(cache_dir, tmp_path, controlnet_dir):
    worker = worker_for("tiny", cache_dir, tmp_path, controlnet_dir)
    payload = controlled(entry(scale=0.5, end=0.5), entry("depth"), scheduler="euler")
    response = worker.handle({"id": "c", "input": payload})
    assert response["status"] == "success", response
    metrics = response["metrics"]
    assert metrics["mode"] == "txt2img+controlnet"
    found = [(c["name"], c["scale"], c["steps"]) for c in metrics["controlnets"]]
    assert found == [("edges", 0.5, 2), ("depth", 1.0, 4)]
    assert all(c["step_ms"] > 0 for c in metrics["controlnets"])
    assert metrics["backends"]["controlnet.edges"] == "torch"
    assert metrics["backends"][CONTROLLED_UNET] == "torch"
    assert metrics["unet_step_ms"]["count"] == 4


def test_preloaded_controlnets_are_loaded_before_the_first_request(cache_dir, tmp_path, controlnet_dir):
    """PRELOAD_CONTROLNETS=all loads what fits (not the SDXL ControlNet) at start-up, timed in init_ms; the
    images are those of a worker that loads them on first use."""
    preloaded = worker_for("tiny", cache_dir, tmp_path, controlnet_dir, preload_controlnets="all")
    assert {"controlnet.edges", "controlnet.depth", CONTROLLED_UNET} <= set(preloaded.chains)
    assert "controlnet.edges-xl" not in preloaded.chains
    assert preloaded.chains["controlnet.edges"].runners[0].loaded
    payload = controlled(entry())
    response = preloaded.handle({"id": "p", "input": payload})
    assert "controlnets_load" in response["metrics"]["init_ms"]
    on_first_use = worker_for("tiny", cache_dir, tmp_path, controlnet_dir).handle({"id": "l", "input": payload})
    assert [item["image"] for item in response["output"]] == [item["image"] for item in on_first_use["output"]]


def test_a_preloaded_controlnet_that_is_not_there_is_a_configuration_error(cache_dir, tmp_path, controlnet_dir):
    with pytest.raises(ConfigError, match=r"PRELOAD_CONTROLNETS: no ControlNet 'sketch' in CONTROLNET_DIR"):
        worker_for("tiny", cache_dir, tmp_path, controlnet_dir, preload_controlnets="edges, sketch")


ERRORS = {
    "unknown": ([entry("sketch")], "controlnets[0].name: no ControlNet 'sketch'"),
    "other family": ([entry("edges-xl")], "controlnets[0].name: ControlNet 'edges-xl' was made for another model"),
    "path": ([entry("../edges")], "controlnets[0].name: must be the name of a folder"),
    "dot": ([entry(".")], "controlnets[0].name: must name a file or folder, got '.'"),
    "NUL": ([entry("a\x00b")], "controlnets[0].name: must not contain control characters"),
    "long": ([entry("e" * 300)], "controlnets[0].name: at most 255 bytes"),
    "not an image": ([entry(image="bm90IGFuIGltYWdl")], "controlnets[0].image:"),
    "start after end": ([entry(start=0.6, end=0.4)], "controlnets[0]: start must be below end, got start 0.6"),
    "too many": ([entry(), entry(), entry()], "controlnets: at most 2 per request (MAX_CONTROLNETS)"),
    "thresholds without canny": ([entry(low=10)], "low and high only apply with preprocess"),
    "scale": ([entry(scale=9)], "controlnets[0].scale:"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_bad_controlnet_entries_get_a_named_error(cache_dir, tmp_path, controlnet_dir, case):
    worker = worker_for("tiny", cache_dir, tmp_path, controlnet_dir)
    entries, message = ERRORS[case]
    response = worker.handle({"id": "bad", "input": controlled(*entries)})
    assert response["status"] == "error"
    assert message in response["error"], response["error"]
    assert str(controlnet_dir) not in response["error"] and "depth" not in response["error"], "no folder or listing"
    assert worker.handle({"id": "ok", "input": controlled(entry())})["status"] == "success"


def test_a_refused_request_adds_no_controlnet_to_the_model(cache_dir, tmp_path, controlnet_dir):
    """A request whose ControlNet is fine but whose size is not is refused, and the model is as it was."""
    worker = worker_for("tiny", cache_dir, tmp_path, controlnet_dir)
    specs = set(worker.model.specs)
    response = worker.handle({"id": "bad", "input": controlled(entry("depth"), width=65)})
    assert response["status"] == "error" and "width" in response["error"]
    assert (set(worker.model.specs), worker.model.controlnets, set(worker.chains)) == (specs, {}, specs)
    assert worker.handle({"id": "ok", "input": controlled(entry("depth"))})["status"] == "success"
    assert "controlnet.depth" in worker.model.controlnets and "controlnet.depth" in worker.chains


def export_with_controlnets(store: Path, cache_dir: Path, controlnet_dir: Path, *extra: str) -> str:
    """`python -m export` (ONNX only) with ``CONTROLNET_DIR`` set; its output."""
    command, env = export_command(store, cache_dir, "--skip-engines", *extra)
    env["CONTROLNET_DIR"] = str(controlnet_dir)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def controlnet_store(cache_dir: Path, controlnet_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported with its ControlNets (the ones that fit it) and the controlled UNet."""
    store = tmp_path_factory.mktemp("controlnet-store")
    output = export_with_controlnets(store, cache_dir, controlnet_dir)
    assert "skipped CONTROLNET_DIR: ControlNet 'edges-xl' was made for another model" in output, output
    return store


def test_export_validates_each_controlnet_and_the_controlled_unet(controlnet_store):
    manifests = [json.loads(path.read_text()) for path in controlnet_store.glob("artifacts/*/manifest.json")]
    by_component = {manifest["key"]["component"]: manifest for manifest in manifests}
    assert {"controlnet.edges", "controlnet.depth", CONTROLLED_UNET} <= set(by_component)
    assert "controlnet.edges-xl" not in by_component
    for component in ("controlnet.edges", CONTROLLED_UNET):
        parity = by_component[component]["parity"]
        assert parity and all(check["passed"] for check in parity)
    outputs = {check["output"] for check in by_component["controlnet.edges"]["parity"]}
    assert outputs == {"down_residual_0", "down_residual_1", "down_residual_2", "down_residual_3", "mid_residual"}


def test_export_refuses_a_named_controlnet_for_another_model(cache_dir, controlnet_dir, tmp_path):
    command, env = export_command(tmp_path, cache_dir, "--skip-engines", "--controlnets", "edges-xl")
    env["CONTROLNET_DIR"] = str(controlnet_dir)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "--controlnets: ControlNet 'edges-xl' was made for another model than this sd one" in done.stderr


def assert_onnxruntime_matches_torch(model: str, store: Path, cache_dir: Path, controlnet_dir: Path, *payloads):
    torch_worker = worker_for(model, cache_dir, store, controlnet_dir)
    ort_worker = worker_for(model, cache_dir, store, controlnet_dir, backend="onnxruntime")
    for payload in payloads:
        expected = torch_worker.handle({"id": "t", "input": payload})
        actual = ort_worker.handle({"id": "o", "input": payload})
        assert actual["status"] == "success", actual
        assert set(actual["metrics"]["backends"].values()) == {"onnxruntime"}, actual["metrics"]["fallbacks"]
        for ours, theirs in zip(decoded(actual), decoded(expected), strict=True):
            assert np.abs(ours - theirs).max() <= 2


def test_onnxruntime_matches_torch(cache_dir, controlnet_dir, controlnet_store):
    assert_onnxruntime_matches_torch(
        "tiny",
        controlnet_store,
        cache_dir,
        controlnet_dir,
        controlled(entry(scale=1.2, end=0.75), entry("depth", scale=0.5)),
        controlled(entry(), image=to_base64(picture(64, 64)), mask=to_base64(mask_image()), strength=0.8),
    )


def test_onnxruntime_matches_torch_for_sdxl(cache_dir, controlnet_dir, tmp_path):
    export_with_controlnets(tmp_path, cache_dir, controlnet_dir, "--model", "tiny-sdxl", "--controlnets", "edges-xl")
    payload = controlled(entry("edges-xl", scale=0.7), image=to_base64(picture(64, 64)), strength=0.75)
    assert_onnxruntime_matches_torch("tiny-sdxl", tmp_path, cache_dir, controlnet_dir, payload)


def test_a_controlnet_folder_without_weights_is_refused(cache_dir, tmp_path, controlnet_dir):
    root = tmp_path / "controlnets"
    (root / "empty").mkdir(parents=True)
    shutil.copy(controlnet_dir / "edges" / "config.json", root / "empty" / "config.json")
    worker = worker_for("tiny", cache_dir, tmp_path / "engines", root)
    response = worker.handle({"id": "e", "input": controlled(entry("empty"))})
    assert "controlnets[0].name: ControlNet 'empty' has a config.json but no weights" in response["error"]


def test_export_of_a_family_without_controlnets_skips_them(cache_dir, controlnet_dir, tmp_path):
    """An SD3 model exported with SD ControlNets in CONTROLNET_DIR: its own components, and each
    ControlNet listed as skipped."""
    output = export_with_controlnets(tmp_path, cache_dir, controlnet_dir, "--model", "tiny-sd3")
    assert "skipped CONTROLNET_DIR: ControlNets are not supported for sd3 models yet" in output, output
    assert "transformer-onnx" in output
