"""A request whose activations cannot fit the memory left is refused with the fields named, before it runs.

The memory is this machine's, as the worker reads it; the headroom (MIN_FREE_MEMORY_GB) is set so that
about 1 GiB is left, which a 2048x2048 request on the tiny model does not fit and a 64x64 one does.
"""

from __future__ import annotations

import psutil
import pytest

from engine.memory import estimates
from engine.models import load_model
from engine.worker import Worker


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
