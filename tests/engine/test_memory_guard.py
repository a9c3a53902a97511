"""A request whose activations cannot fit the memory left is refused with the fields named, before it runs.

The memory is this machine's, as the worker reads it; the headroom (MIN_FREE_MEMORY_GB) is set so that
about 1 GiB is left, which a 2048x2048 request on the tiny model does not fit and a 64x64 one does.
"""

from __future__ import annotations

import psutil
import pytest
import torch

import engine.serving.memory as memory_module
from engine.backends.base import Runner
from engine.common.errors import RequestError
from engine.models.builtin import builtin_model_folder
from engine.models.controlnet import CONTROLLED_UNET
from engine.models.ip_adapter import IP_DENOISER
from engine.models.model import load_model
from engine.request.entries import LoraEntry
from engine.serving.memory import (
    ImagePromptLoad,
    available_bytes,
    cuda_room,
    estimates,
    image_encoder_bytes,
    image_prompt_load,
    patch_bytes,
    residual_elements,
)
from engine.serving.worker import Worker
from perf.ip_adapter_files import write_adapter, write_image_encoder
from perf.lora_files import write_lora
from tests.parity import picture, to_base64
from tests.test_controlnet import make_controlnet


@pytest.fixture
def tight_worker(make_settings) -> Worker:
    headroom_gb = psutil.virtual_memory().available / 2**30 - 1.0
    return Worker(make_settings(backend="torch", min_free_memory_gb=max(headroom_gb, 0.0)))


def test_a_request_that_cannot_fit_is_refused_and_the_worker_serves_on(tight_worker):
    big = tight_worker.handle({"input": {"prompt": "a fox", "width": 2048, "height": 2048, "num_inference_steps": 2}})
    assert big["status"] == "error"
    assert big["error"].startswith("width, height, num_images: 2048x2048 with 1 image(s) needs about ")
    assert "GiB of memory in vae_decoder" in big["error"] and "ask for a smaller size or fewer images" in big["error"]
    small = tight_worker.handle({"input": {"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 2}})
    assert small["status"] == "success"


def test_the_guard_can_be_turned_off(make_settings):
    worker = Worker(make_settings(backend="torch", memory_guard=False, min_free_memory_gb=10_000))
    assert worker.handle({"input": {"prompt": "a", "width": 64, "height": 64, "num_inference_steps": 1}})["status"] == (
        "success"
    )


def test_estimates_follow_the_measured_sd15_figures(cache_dir):
    """SD 1.5's VAE decoder peaked 2.1 GB above its weights at 768x768 and the UNet 0.75 GB (batch 2);
    the estimate must cover both without being wildly above (the margin is 10-20%)."""
    config = load_model("tiny", cache_dir).config
    config.configs["unet"]["block_out_channels"] = [320, 640, 1280, 1280]
    config.configs["vae"]["block_out_channels"] = [128, 256, 512, 512]
    found = {e.stage: e.bytes for e in estimates(config, 1, 768, 768, True, "fp32", "fp32")}
    assert 2.1e9 <= found["vae_decoder"] <= 2.6e9
    assert 0.75e9 <= found["unet"] <= 0.95e9


def test_estimates_count_each_stage_at_its_own_precision(cache_dir):
    """Under fp16, SDXL's VAE runs in fp32 (force_upcast): its activations take twice the bytes per value."""
    model = load_model("tiny-sdxl", cache_dir)
    precisions = [model.family.component_precision(c, "fp16", model.config) for c in ("unet", "vae_decoder")]
    assert precisions == ["fp16", "fp32"]
    mixed = {e.stage: e.bytes for e in estimates(model.config, 1, 512, 512, True, *precisions)}
    even = {e.stage: e.bytes for e in estimates(model.config, 1, 512, 512, True, "fp16", "fp16")}
    assert mixed["vae_decoder"] == 2 * even["vae_decoder"] and mixed["unet"] == even["unet"]


def test_controlnet_and_vae_encoder_estimates_follow_the_measured_sd15_figures(cache_dir):
    """SD 1.5's ControlNet (diffusers' default config) peaked 0.35 GB above its weights at 512x512 and
    0.84 GB at 768x768 (2 rows), its VAE encoder 0.68 GB and 1.52 GB (one image): covered, with a margin.
    Its residuals are the UNet's down-block shapes: 1640 values per latent pixel and row, as counted
    from diffusers' ControlNet outputs at 512x512."""
    config = load_model("tiny", cache_dir).config
    config.configs["unet"]["block_out_channels"] = [320, 640, 1280, 1280]
    config.configs["unet"]["layers_per_block"] = 2
    config.configs["vae"]["block_out_channels"] = [128, 256, 512, 512]
    assert residual_elements(config.configs["unet"], 64, 64) == 1640 * 64 * 64
    for size, controlnet_peak, encoder_peak in ((512, 0.35e9, 0.68e9), (768, 0.84e9, 1.52e9)):
        found = {e.stage: e.bytes for e in estimates(config, 1, size, size, True, "fp32", "fp32", ["c"], True)}
        assert controlnet_peak <= found["c"] <= 1.25 * controlnet_peak
        assert encoder_peak <= found["vae_encoder"] <= 1.25 * encoder_peak


def test_controlnets_add_their_residuals_to_the_unet_and_the_vae_encoder_counts_only_with_an_image(cache_dir):
    config = load_model("tiny", cache_dir).config
    plain = {e.stage: e.bytes for e in estimates(config, 1, 64, 64, True, "fp32", "fp32")}
    controlled = {e.stage: e.bytes for e in estimates(config, 1, 64, 64, True, "fp32", "fp32", ["a", "b"])}
    residuals = 2 * residual_elements(config.configs["unet"], 8, 8) * 4  # two rows, fp32
    assert controlled["unet"] == plain["unet"] + residuals
    assert controlled["b"] == controlled["a"] + residuals, "the second runs while the first's residuals are held"
    assert "vae_encoder" not in plain
    assert "vae_encoder" in {e.stage for e in estimates(config, 1, 64, 64, True, "fp32", "fp32", encodes_image=True)}


def test_torchs_cached_but_unused_memory_counts_as_room_on_a_gpu(monkeypatch):
    """No GPU here: torch.cuda's figures are set by hand. On a GPU they are the driver's free memory
    (mem_get_info) and torch's allocator's reserved and allocated bytes."""
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 7 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 3 * gib)
    assert available_bytes(torch.device("cuda")) == 6 * gib
    assert cuda_room(2 * gib, 3 * gib, 3 * gib) == 2 * gib


class EngineStandIn(Runner):
    """Holds a chain's first place as a TensorRT engine would (which allocates its activations up front);
    the checks below never run it."""

    backend = "tensorrt"

    def run(self, inputs):
        raise AssertionError("not run by a memory check")


@pytest.fixture
def room(monkeypatch) -> list[int]:
    """The free memory the worker reads, set by the test (MIN_FREE_MEMORY_GB=0 in these workers)."""
    free = [0]
    monkeypatch.setattr(memory_module, "available_bytes", lambda device: free[0])
    return free


def stage_bytes(worker: Worker, payload: dict, stage: str) -> int:
    request, _ = worker.resolve(payload)
    config = worker.model.config
    controlnets = [f"controlnet.{c.name}" for c in request.controlnets]
    found = estimates(
        config, request.num_images, request.height, request.width, True, "fp32", "fp32", controlnets, True
    )
    return next(e.bytes for e in found if e.stage == stage)


def as_on_a_gpu_with_engines(worker: Worker, components: list[str], monkeypatch) -> None:
    """The worker as on a GPU whose ``components`` run on TensorRT: only the rest count."""
    monkeypatch.setattr(worker, "device", torch.device("cuda"))
    for component in components:
        chain = worker.chains[component]
        chain.runners.insert(0, EngineStandIn(chain.runners[0].spec, "fp32", torch.device("cpu")))


PLAIN = {"prompt": "a fox", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 1}


def test_the_vae_encoder_counts_for_image_inputs(make_settings, room, monkeypatch):
    """With the UNet and the VAE decoder on engines, the torch VAE encoder is what an image input adds."""
    worker = Worker(make_settings(backend="torch", min_free_memory_gb=0))
    as_on_a_gpu_with_engines(worker, ["unet", "vae_decoder"], monkeypatch)
    image = {**PLAIN, "image": to_base64(picture(64, 64)), "strength": 0.5}
    room[0] = stage_bytes(worker, image, "vae_encoder") - 1
    worker._check_memory(worker.resolve(PLAIN)[0])
    with pytest.raises(RequestError, match="GiB of GPU in vae_encoder"):
        worker._check_memory(worker.resolve(image)[0])
    room[0] += 1
    worker._check_memory(worker.resolve(image)[0])


def test_a_controlnet_counts(make_settings, room, monkeypatch, cache_dir, tmp_path):
    """With the UNet, its controlled twin and the VAE on engines, a torch ControlNet's activations count."""
    make_controlnet(builtin_model_folder("tiny", cache_dir), tmp_path / "controlnets" / "edges", seed=1)
    worker = Worker(make_settings(backend="torch", min_free_memory_gb=0, controlnet_dir=tmp_path / "controlnets"))
    controlled = {**PLAIN, "controlnets": [{"name": "edges", "image": to_base64(picture(64, 64))}]}
    worker.resolve(controlled)  # adds the ControlNet's chain and the controlled UNet's
    as_on_a_gpu_with_engines(worker, ["unet", CONTROLLED_UNET, "vae_decoder"], monkeypatch)
    room[0] = stage_bytes(worker, controlled, "controlnet.edges") - 1
    worker._check_memory(worker.resolve(PLAIN)[0])
    with pytest.raises(RequestError, match=r"GiB of GPU in controlnet\.edges"):
        worker._check_memory(worker.resolve(controlled)[0])
    room[0] += 1
    worker._check_memory(worker.resolve(controlled)[0])


def test_a_lora_sets_patched_weights_count_on_top_of_the_peak(make_settings, room, cache_dir, tmp_path):
    """torch keeps a copy of each parameter a LoRA changes: a request that fits without the LoRA is
    refused with it when the room is one byte short of both, and served when it is not."""
    model = load_model("tiny", cache_dir)
    write_lora(model, tmp_path / "loras" / "a.safetensors", "peft", seed=1, rank=4, components=["unet"])
    worker = Worker(make_settings(backend="torch", min_free_memory_gb=0, lora_dir=tmp_path / "loras"))
    peak = estimates(worker.model.config, 1, 64, 64, True, "fp32", "fp32")[0].bytes
    patch = worker.loras.select([LoraEntry(name="a", scale=1.0)]).patches["unet"]
    lora = patch_bytes((worker.model.parameter_shapes["unet"][name] for name in patch.names), "fp32")
    assert lora > 0
    room[0] = peak + lora - 1
    assert worker.handle({"input": PLAIN})["status"] == "success"
    refused = worker.handle({"input": {**PLAIN, "loras": [{"name": "a"}]}})
    assert refused["status"] == "error"
    assert refused["error"].startswith("width, height, num_images, loras: 64x64 with 1 image(s) needs about")
    assert "of it for the LoRAs' patched weights" in refused["error"]
    room[0] += 1
    assert worker.handle({"input": {**PLAIN, "loras": [{"name": "a"}]}})["status"] == "success"
    assert worker.handle({"input": {**PLAIN, "loras": [{"name": "a"}]}})["status"] == "success", (
        "a set the weights already carry adds nothing"
    )


@pytest.fixture
def ip_worker(make_settings, cache_dir, tmp_path) -> Worker:
    """A torch worker with one tiny plain IP-Adapter (``models/plain``) and its image encoder."""
    write_image_encoder(tmp_path / "models" / "image_encoder")
    write_adapter(load_model("tiny", cache_dir), tmp_path / "models" / "plain.safetensors", "plain", seed=1)
    return Worker(make_settings(backend="torch", min_free_memory_gb=0, ip_adapter_dir=tmp_path))


def ip_estimates(worker: Worker, payload: dict) -> dict[str, int]:
    admitted = worker._admit(payload)
    loads = [image_prompt_load(prompt, worker.model) for prompt in admitted.image_prompts]
    found = estimates(worker.model.config, 1, 64, 64, True, "fp32", "fp32", image_prompts=loads)
    return {e.stage: e.bytes for e in found}


def test_an_image_prompts_encoder_counts(ip_worker, room, monkeypatch):
    """With the denoisers and the VAE on engines, the torch image encoder is what an image prompt adds:
    two images take twice one's."""
    one = {**PLAIN, "ip_adapters": [{"name": "models/plain", "image": to_base64(picture(80, 72))}]}
    two = {**PLAIN, "ip_adapters": [{"name": "models/plain", "images": [to_base64(picture(80, 72))] * 2}]}
    encoder = next(stage for stage in ip_estimates(ip_worker, one) if stage.startswith("image_encoder."))
    assert ip_estimates(ip_worker, two)[encoder] == 2 * ip_estimates(ip_worker, one)[encoder] > 0
    as_on_a_gpu_with_engines(ip_worker, ["unet", IP_DENOISER, "vae_decoder"], monkeypatch)
    room[0] = ip_estimates(ip_worker, one)[encoder] - 1
    ip_worker._check_memory(ip_worker.resolve(PLAIN)[0])
    with pytest.raises(RequestError, match=rf"GiB of GPU in {encoder}"):
        ip_worker._check_memory(ip_worker.resolve(one)[0], image_prompts=ip_worker._admit(one).image_prompts)
    room[0] += 1
    ip_worker._check_memory(ip_worker.resolve(one)[0], image_prompts=ip_worker._admit(one).image_prompts)


def test_the_ip_denoisers_second_attention_counts(ip_worker, room, monkeypatch):
    """With the VAE and the image encoder on engines, the torch IP denoiser's peak is the UNet's plus its
    attention over the image tokens (output and one map per head): the room for a plain request is short."""
    prompted = {**PLAIN, "ip_adapters": [{"name": "models/plain", "image": to_base64(picture(80, 72))}]}
    unet = ip_estimates(ip_worker, prompted)["unet"]
    plain = ip_estimates(ip_worker, PLAIN)["unet"]
    heads, channels = 8, ip_worker.model.config.configs["unet"]["block_out_channels"][0]
    assert unet - plain == 2 * 8 * 8 * (channels + heads * 4) * 4  # two rows, 8x8 latents, four tokens, fp32
    encoder = next(stage for stage in ip_estimates(ip_worker, prompted) if stage.startswith("image_encoder."))
    as_on_a_gpu_with_engines(ip_worker, ["vae_decoder", encoder], monkeypatch)
    room[0] = unet - 1
    ip_worker._check_memory(ip_worker.resolve(PLAIN)[0])
    admitted = ip_worker._admit(prompted)
    with pytest.raises(RequestError, match="GiB of GPU in unet"):
        ip_worker._check_memory(admitted.request, image_prompts=admitted.image_prompts)
    room[0] += 1
    ip_worker._check_memory(admitted.request, image_prompts=admitted.image_prompts)


def test_the_image_encoder_estimate_follows_the_measured_vit_h_figure():
    """A random ViT-H/14 (257 tokens of 1280) peaked 66 MB per image above its weights (eager attention;
    50 MB with SDPA): covered, with a margin."""
    vit_h = ImagePromptLoad("image_encoder.h", 1, 257, 1280, 4)
    assert 66e6 <= image_encoder_bytes(vit_h, 4) <= 1.25 * 66e6
    assert image_encoder_bytes(ImagePromptLoad("image_encoder.h", 3, 257, 1280, 4), 4) == 3 * image_encoder_bytes(
        vit_h, 4
    )
