"""Held-out few-step and Flux editing folders through the SDK's local API server, as a client sends them.

Each folder's configs are unlike the built-ins': an SDXL-Turbo-style folder (a narrower UNet, its
scheduler already Euler ancestral with trailing timesteps, as SDXL-Turbo ships), an LCM-distilled
SD folder saved as ``LatentConsistencyModelPipeline`` (a guidance embedding of another width), and
Flux Kontext, Fill and Control folders whose transformers have other depths, heads and rotary
axes and no guidance embedding. Each is served by ``handler.py --rp_serve_api`` with ``MODEL``
set to it; the requests name schedulers in each accepted style (ours, AUTOMATIC1111's,
ComfyUI's, or none), and the images that come back over HTTP must match diffusers' own
pipeline on the same folder within 2/255.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from diffusers import (
    EulerAncestralDiscreteScheduler,
    FluxControlPipeline,
    FluxFillPipeline,
    FluxKontextPipeline,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from engine.models.builtin import builtin_model_folder
from tests.conftest import runsync, serve_api, worker_env
from tests.parity import (
    assert_same_images,
    cpu_worker,
    decoded,
    diffusers_pipe,
    held_out_flux_transformer,
    picture,
    reference_images,
    to_base64,
)
from tests.test_flux_edit import depth_map, edited_copy, mask


@contextmanager
def served(folder: Path, cache_dir: Path, scratch: Path) -> Iterator[str]:
    """The SDK's local API server for the model folder, on the CPU, with its own engine store."""
    env = worker_env(cache_dir, scratch / "engines", MODEL=str(folder))
    with serve_api(env, scratch / "server.log") as (url, _):
        yield url


def client_images(url: str, payload: dict) -> tuple[list, dict]:
    """What a client gets back for ``payload``: the images, and the response's metrics."""
    body = runsync(url, payload, timeout=300).json()
    assert body["status"] == "COMPLETED", body
    return decoded(body["output"]), body["output"]["metrics"]


def check_against_diffusers(url: str, folder: Path, cache_dir: Path, scratch: Path, pipeline, cases, **call) -> None:
    """Each payload of ``cases`` (with the scheduler and mode the metrics must report) sent to the server,
    against ``pipeline`` on the same folder; ``call`` adds diffusers call arguments."""
    worker = cpu_worker(str(folder), cache_dir, scratch / "reference-engines")  # resolves requests as the server
    pipe = diffusers_pipe(pipeline, worker)
    for payload, scheduler, mode in cases:
        ours, metrics = client_images(url, payload)
        assert (metrics["scheduler"], metrics["mode"]) == (scheduler, mode), payload.get("scheduler")
        extra = {"max_area": payload["width"] * payload["height"]} if pipeline is FluxKontextPipeline else {}
        assert_same_images(ours, reference_images(pipe, worker, payload, **call, **extra))


def sd_payload(steps: int, seed: int, **extra) -> dict:
    return {"prompt": "a red fox", "width": 64, "height": 64, "num_inference_steps": steps, "seed": seed, **extra}


@pytest.fixture(scope="module")
def turbo_folder(cache_dir, tmp_path_factory) -> Path:
    """SDXL-Turbo's shape: Euler ancestral with trailing timesteps in the folder, a UNet unlike tiny-sdxl's."""
    folder = tmp_path_factory.mktemp("held-out-turbo")
    base = StableDiffusionXLPipeline.from_pretrained(builtin_model_folder("tiny-sdxl", cache_dir))
    with torch.random.fork_rng():
        torch.manual_seed(21)
        unet = UNet2DConditionModel.from_config(
            {**base.unet.config, "attention_head_dim": [4, 8], "transformer_layers_per_block": [1, 1]}
        )
    scheduler = EulerAncestralDiscreteScheduler.from_config(base.scheduler.config, timestep_spacing="trailing")
    StableDiffusionXLPipeline(**{**base.components, "unet": unet, "scheduler": scheduler}).save_pretrained(folder)
    return folder


def test_a_turbo_folder_served_to_a_client_matches_diffusers(turbo_folder, cache_dir, tmp_path):
    cases = [
        (sd_payload(2, 1, guidance_scale=0.0), "EulerAncestralDiscreteScheduler", "txt2img"),
        (sd_payload(1, 2, guidance_scale=0.0, scheduler="Euler SGM Uniform"), "euler_trailing", "txt2img"),
        (sd_payload(4, 3, guidance_scale=0.0, scheduler="euler_ancestral sgm_uniform"), "euler_a_trailing", "txt2img"),
        (sd_payload(8, 4, guidance_scale=3.0, num_images=2, scheduler="tcd", eta=0.6), "tcd", "txt2img"),
        (sd_payload(4, 5, guidance_scale=2.0, scheduler="DPM++ 2M SDE Karras"), "dpmpp_2m_sde_karras", "txt2img"),
    ]
    with served(turbo_folder, cache_dir, tmp_path) as url:
        check_against_diffusers(url, turbo_folder, cache_dir, tmp_path, StableDiffusionXLPipeline, cases)


@pytest.fixture(scope="module")
def lcm_folder(cache_dir, tmp_path_factory) -> Path:
    """An LCM-distilled SD checkpoint as LCM Dreamshaper ships: a ``LatentConsistencyModelPipeline`` folder
    whose UNet embeds the guidance scale (``time_cond_proj_dim``, here 48), with the LCM scheduler."""
    folder = tmp_path_factory.mktemp("held-out-lcm")
    base = StableDiffusionPipeline.from_pretrained(builtin_model_folder("tiny", cache_dir), safety_checker=None)
    with torch.random.fork_rng():
        torch.manual_seed(23)
        unet = UNet2DConditionModel.from_config(
            {**base.unet.config, "time_cond_proj_dim": 48, "attention_head_dim": 4, "layers_per_block": 1}
        )
        torch.nn.init.normal_(unet.time_embedding.cond_proj.weight, std=0.5)
    components = {**base.components, "unet": unet, "scheduler": LCMScheduler.from_config(base.scheduler.config)}
    components |= {"safety_checker": None, "feature_extractor": None}
    LatentConsistencyModelPipeline(**components, requires_safety_checker=False).save_pretrained(folder)
    return folder


def test_an_lcm_folder_served_to_a_client_matches_diffusers(lcm_folder, cache_dir, tmp_path):
    """Without steps or guidance the request gets the LCM pipeline's defaults (4 steps, guidance 8.5)."""
    defaults = {"prompt": "a red fox", "width": 64, "height": 64, "seed": 6}
    cases = [
        (defaults, "LCMScheduler", "txt2img"),
        (sd_payload(1, 7, guidance_scale=3.0, scheduler="LCM"), "lcm", "txt2img"),
        (sd_payload(8, 8, guidance_scale=1.5, num_images=2, scheduler="lcm"), "lcm", "txt2img"),
    ]
    with served(lcm_folder, cache_dir, tmp_path) as url:
        assert client_images(url, defaults)[1]["num_inference_steps"] == 4
        check_against_diffusers(url, lcm_folder, cache_dir, tmp_path, LatentConsistencyModelPipeline, cases)


def held_out_flux_folder(pipeline, builtin: str, cache_dir: Path, folder: Path, seed: int) -> Path:
    """The built-in's encoders and VAE with a transformer unlike any built-in's (see ``held_out_flux_transformer``)."""
    base = pipeline.from_pretrained(builtin_model_folder(builtin, cache_dir))
    transformer = held_out_flux_transformer(base.transformer.config, seed=seed)
    pipeline(**{**base.components, "transformer": transformer}).save_pretrained(folder)
    return folder


def flux_payload(seed: int, **extra) -> dict:
    return {
        "prompt": "make it a winter scene",
        "width": 96,
        "height": 128,
        "num_inference_steps": 3,
        "seed": seed,
    } | extra


def test_a_kontext_folder_served_to_a_client_matches_diffusers(cache_dir, tmp_path):
    folder = held_out_flux_folder(FluxKontextPipeline, "tiny-flux-kontext", cache_dir, tmp_path / "kontext", seed=31)
    image = to_base64(picture(128, 96))
    cases = [
        (flux_payload(1, image=image), "FlowMatchEulerDiscreteScheduler", "edit"),
        (
            flux_payload(2, image=image, num_images=2, scheduler="flow_euler", num_inference_steps=4),
            "flow_euler",
            "edit",
        ),
    ]
    with served(folder, cache_dir, tmp_path) as url:
        check_against_diffusers(url, folder, cache_dir, tmp_path, FluxKontextPipeline, cases, max_sequence_length=256)


def test_a_fill_folder_named_flux_served_to_a_client_matches_diffusers(cache_dir, tmp_path):
    saved = held_out_flux_folder(FluxFillPipeline, "tiny-flux-fill", cache_dir, tmp_path / "fill", seed=33)
    folder = edited_copy(saved, tmp_path / "fill-as-flux", "FluxPipeline")
    payload = flux_payload(3, image=to_base64(picture(96, 128)), mask=to_base64(mask(96, 128)), strength=0.9)
    cases = [(payload, "FlowMatchEulerDiscreteScheduler", "inpaint")]
    with served(folder, cache_dir, tmp_path) as url:
        check_against_diffusers(url, folder, cache_dir, tmp_path, FluxFillPipeline, cases, max_sequence_length=256)


def test_a_control_folder_served_to_a_client_matches_diffusers(cache_dir, tmp_path):
    folder = held_out_flux_folder(FluxControlPipeline, "tiny-flux-control", cache_dir, tmp_path / "control", seed=35)
    depth = {"control": {"image": to_base64(depth_map(96, 128))}}
    edges = {"control": {"image": to_base64(depth_map(96, 128)), "preprocess": "canny", "low": 50, "high": 150}}
    cases = [
        (flux_payload(4, **depth), "FlowMatchEulerDiscreteScheduler", "txt2img+control"),
        (flux_payload(5, num_images=2, scheduler="flow_euler", **edges), "flow_euler", "txt2img+control"),
    ]
    with served(folder, cache_dir, tmp_path) as url:
        check_against_diffusers(url, folder, cache_dir, tmp_path, FluxControlPipeline, cases, max_sequence_length=256)
