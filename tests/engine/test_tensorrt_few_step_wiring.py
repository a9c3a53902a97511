"""The TensorRT wiring of two inputs few-step and editing models add, end to end on the CPU: an
LCM-distilled UNet's ``timestep_cond`` (its guidance embedding) and Flux Kontext's reference latents,
whose tokens lengthen the transformer's sequence.

Engines are built from the real exported ONNX graphs by tests/fake_tensorrt.py and published through
the real export stage; the worker, its runners, profiles and per-shape contexts are real. Each
check reads what the worker set on the engine: the profile's shape ranges, and the shapes each
request's context was given.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from engine.backends import assemble
from engine.backends.tensorrt.loading import load_tensorrt
from engine.models.builtin import builtin_model_folder
from engine.models.flux_variants import PREFERRED_KONTEXT_RESOLUTIONS
from engine.models.model import load_model
from engine.serving.worker import Worker
from engine.sizes import SizeRange
from engine.store.store import Store
from tests import fake_tensorrt
from tests.conftest import run_export
from tests.parity import picture, to_base64

RANGE = "64-128@64x2"


def tensorrt_worker(folder: str, component: str, cache_dir: Path, engines: Path, make_settings, monkeypatch) -> Worker:
    """A worker whose ``component`` runs on fake TensorRT engines built from its exported graph."""
    done = run_export(engines, cache_dir, "--model", folder, "--components", component)
    assert done.returncode == 0, done.stderr[-3000:]
    model = load_model(folder, cache_dir)
    fake_tensorrt.publish_fake_engines(Store(engines), model, [component], [SizeRange.parse(RANGE)], monkeypatch)
    monkeypatch.setattr(assemble, "tensorrt_runs_on", lambda device: True)
    monkeypatch.setattr(assemble, "gpu_tag", lambda device: "sm90")
    monkeypatch.setattr(assemble, "load_tensorrt", functools.partial(load_tensorrt, trt=fake_tensorrt.fake_tensorrt()))
    settings = make_settings(model=folder, backend="tensorrt", engine_dir=engines, engine_profiles=RANGE)
    return Worker(settings)


def shapes_set(worker: Worker, component: str, name: str) -> list[tuple]:
    """The shapes of input ``name`` the engine's contexts were given, one per shape the requests had."""
    [engine] = worker.tensorrt.runners[component].engines
    return [slot.context._shapes[name] for slot in engine.slots.values()]


def profile_range(worker: Worker, component: str, name: str) -> tuple[tuple, tuple, tuple]:
    [engine] = worker.tensorrt.runners[component].engines
    [profile] = engine.profiles
    found = dict(profile.inputs)[name]
    return found.minimum, found.optimum, found.maximum


@pytest.fixture
def lcm_folder(cache_dir, tmp_path) -> str:
    """An LCM-distilled SD folder: a UNet with a guidance embedding of width 24."""
    base = StableDiffusionPipeline.from_pretrained(builtin_model_folder("tiny", cache_dir), safety_checker=None)
    with torch.random.fork_rng():
        torch.manual_seed(4)
        unet = UNet2DConditionModel.from_config({**base.unet.config, "time_cond_proj_dim": 24})
    scheduler = LCMScheduler.from_config(base.scheduler.config)
    StableDiffusionPipeline(**{**base.components, "unet": unet, "scheduler": scheduler}).save_pretrained(
        tmp_path / "lcm"
    )
    return str(tmp_path / "lcm")


def test_an_lcm_unets_guidance_embedding_is_an_engine_input_set_per_request(
    lcm_folder, cache_dir, tmp_path, make_settings, monkeypatch
):
    """One row for the whole batch (the graph expands it to every image), holding the request's guidance
    as diffusers' ``get_guidance_scale_embedding`` of ``guidance_scale - 1`` embeds it."""
    worker = tensorrt_worker(lcm_folder, "unet", cache_dir, tmp_path / "engines", make_settings, monkeypatch)
    assert profile_range(worker, "unet", "timestep_cond") == ((1, 24),) * 3
    guidance = {1: 4.0, 3: 2.5}  # images: guidance scale; each batch size is a shape of its own
    for images, scale in guidance.items():
        payload = {
            "prompt": "a fox",
            "num_inference_steps": 2,
            "seed": 1,
            "num_images": images,
            "guidance_scale": scale,
        }
        response = worker.handle({"id": f"n{images}", "input": {**payload, "width": 64, "height": 64}})
        assert response["status"] == "success", response
        assert response["metrics"]["backends"]["unet"] == "tensorrt", response["metrics"]["fallbacks"]
    assert shapes_set(worker, "unet", "timestep_cond") == [(1, 24), (1, 24)]
    [engine] = worker.tensorrt.runners["unet"].engines
    pipe = StableDiffusionPipeline.from_pretrained(lcm_folder, safety_checker=None)
    for slot, (images, scale) in zip(engine.slots.values(), guidance.items(), strict=True):
        assert slot.context._shapes["sample"][0] == images  # no guidance rows: the embedding steers instead
        given = torch.from_numpy(slot.context._array("timestep_cond", (1, 24)).copy())
        expected = pipe.get_guidance_scale_embedding(torch.tensor([scale - 1.0]), embedding_dim=24)
        torch.testing.assert_close(given, expected)


def test_kontexts_reference_axes_cover_every_preferred_resolution_and_are_set_per_request(
    cache_dir, tmp_path, make_settings, monkeypatch
):
    """The engine's image range (64-128 px) is far below the references' (672-1568 px, about 1024² each):
    the profile's reference axes cover them all, and each request sets its own reference's shape."""
    folder = str(builtin_model_folder("tiny-flux-kontext", cache_dir))
    worker = tensorrt_worker(folder, "transformer", cache_dir, tmp_path / "engines", make_settings, monkeypatch)
    factor = worker.model.specs["transformer"].latent_factor
    sides = [side for size in PREFERRED_KONTEXT_RESOLUTIONS for side in size]
    [engine] = worker.tensorrt.runners["transformer"].engines
    assert [profile.label for profile in engine.profiles] == [f"{RANGE}+ref{min(sides)}-{max(sides)}"]
    low, opt, high = profile_range(worker, "transformer", "image_latents")
    assert (low[2:], opt[2:], high[2:]) == (
        (min(sides) // factor,) * 2,
        (1024 // factor,) * 2,
        (max(sides) // factor,) * 2,
    )
    expected = []
    for width, height in [(128, 96), (64, 320), (96, 128)]:  # 4:3, 1:5 (the tallest preferred, 672x1568), 3:4
        payload = {"prompt": "a fox", "image": to_base64(picture(width, height)), "num_inference_steps": 2, "seed": 1}
        response = worker.handle({"id": f"{width}x{height}", "input": {**payload, "width": 64, "height": 64}})
        assert response["status"] == "success", response
        assert response["metrics"]["backends"]["transformer"] == "tensorrt", response["metrics"]["fallbacks"]
        assert response["metrics"]["mode"] == "edit"
        reference = worker.model.family.size_for_image(width, height)
        expected.append((1, worker.model.config.latent_channels, reference[1] // factor, reference[0] // factor))
    assert shapes_set(worker, "transformer", "image_latents") == expected
    assert expected[1][2:] == (1568 // factor, 672 // factor)
