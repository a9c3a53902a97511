"""IP-Adapters and quantized denoisers on real TensorRT engines on a GPU, against torch. Skipped where
TensorRT cannot build (see test_tensorrt_gpu.py): the CPU suite checks the same paths on onnxruntime
and on the fake TensorRT of tests/fake_tensorrt.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, export_command, run_export
from tests.test_tensorrt_gpu import full_tensorrt_reason, images

pytestmark = [
    pytest.mark.tensorrt,
    pytest.mark.skipif(full_tensorrt_reason() is not None, reason=full_tensorrt_reason() or ""),
]

PAYLOAD = {"prompt": "a fox", "num_inference_steps": 6, "seed": 7, "scheduler": "euler"}
QUANTIZED_MEAN_BOUND = 12 / 255
"""The mean per-pixel difference a quantized denoiser's image may have from the unquantized one. Measured on
the CPU (onnxruntime against the unquantized graph, tiny UNet, 64x64, 6 euler steps, seeds 7 and 8, calibrated
at 2 steps of 64x64): INT8 1.9-2.1/255 (max 15-17), FP8 3.7/255 (max 23-31); the GPU's figures go here once
measured. A wrong scale or a lost dequantization gives noise, tens of /255."""


def export_with(store: Path, cache_dir: Path, *extra: str, **env: str) -> None:
    command, environment = export_command(store, cache_dir, "--device", "cuda", *extra)
    done = subprocess.run(command, cwd=ROOT, env={**environment, **env}, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]


def test_ip_adapters_run_on_the_ip_denoiser_engine_and_switch_by_refit(tmp_path, cache_dir, make_settings):
    """Plain and Plus adapters on the IP denoiser's engine (its encoder and projections on theirs) against torch;
    A -> B -> A bit for bit; a request without an adapter then runs the plain UNet's engine, as before."""
    from engine.models.model import load_model
    from engine.serving.worker import Worker
    from perf.agreement import compare_images
    from perf.ip_adapter_files import write_adapters
    from tests.ip_adapter.conftest import image_prompt, to_base64

    adapters, store = write_adapters(load_model("tiny", cache_dir), tmp_path / "adapters"), tmp_path / "engines"
    names = ("models/plain", "models/plus", "models/plain-b")
    export_with(store, cache_dir, "--ip-adapters", *names, IP_ADAPTER_DIR=str(adapters))
    image = to_base64(image_prompt(1))

    def request(name: str | None) -> dict:
        extra = {"ip_adapters": [{"name": name, "image": image, "scale": 0.7}]} if name else {}
        return {"id": name or "plain", "input": {**PAYLOAD, **extra}}

    settings = {"device": "cuda", "engine_dir": store, "ip_adapter_dir": adapters}
    reference = Worker(make_settings(backend="torch", **settings))
    worker = Worker(make_settings(backend="tensorrt", **settings))
    plain = images(worker.handle(request(None)))
    served = {}
    for name in ("models/plain", "models/plus"):
        response = worker.handle(request(name))
        assert set(response["metrics"]["backends"].values()) == {"tensorrt"}, response["metrics"]["fallbacks"]
        assert "unet_ip" in response["metrics"]["backends"]
        served[name] = images(response)
        for candidate, expected in zip(served[name], images(reference.handle(request(name))), strict=True):
            diff = compare_images(candidate, expected, "fp16")
            assert diff.passed, (name, diff)
    worker.handle(request("models/plain-b"))
    again = images(worker.handle(request("models/plus")))
    assert all(np.array_equal(x, y) for x, y in zip(again, served["models/plus"], strict=True))
    after = worker.handle(request(None))
    assert "unet_ip" not in after["metrics"]["backends"] and after["metrics"]["backends"]["unet"] == "tensorrt"
    assert all(np.array_equal(x, y) for x, y in zip(images(after), plain, strict=True))


@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_quantized_engines_serve_and_a_lora_falls_back_to_the_unquantized_one(
    quant, tmp_path, cache_dir, make_settings
):
    """A quantized UNet engine (strongly typed from the Q/DQ graph) serves the request, close to the unquantized
    engine's image but not equal to it; a request with a LoRA runs the unquantized engine, refitted, with the
    reason in ``metrics.fallbacks``, and gives the unquantized worker's image bit for bit."""
    import torch

    from engine.models.model import load_model
    from engine.serving.worker import Worker
    from perf.agreement import compare_images
    from perf.lora_files import write_lora

    if quant == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 engines need compute capability 8.9 or newer")
    store, loras = tmp_path / "engines", tmp_path / "loras"
    calibration = ("--calib-steps", "2", "--calib-size", "128")
    done = run_export(store, cache_dir, "--device", "cuda", "--quantize", quant, *calibration)
    assert done.returncode == 0, done.stderr[-3000:]
    write_lora(load_model("tiny", cache_dir), loras / "a.safetensors", "peft", seed=1, components=["unet"])
    settings = {"device": "cuda", "backend": "tensorrt", "engine_dir": store, "lora_dir": loras}
    quantized = Worker(make_settings(quantize=quant, **settings))
    unquantized = Worker(make_settings(**settings))

    served = quantized.handle({"id": "q", "input": PAYLOAD})
    metrics = served["metrics"]
    assert metrics["backends"]["unet"] == "tensorrt" and "unet" not in metrics.get("fallbacks", {}), metrics
    assert metrics["precisions"]["unet"].startswith(quant), metrics["precisions"]
    for candidate, expected in zip(images(served), images(unquantized.handle({"input": PAYLOAD})), strict=True):
        assert np.isfinite(candidate).all()
        diff = compare_images(candidate, expected)
        assert 0 < diff.mean_abs <= QUANTIZED_MEAN_BOUND, diff

    with_lora = {**PAYLOAD, "loras": [{"name": "a"}]}
    fell_back = quantized.handle({"id": "l", "input": with_lora})
    assert f"the {quant} graph takes no LoRAs" in fell_back["metrics"]["fallbacks"]["unet"], fell_back["metrics"]
    assert fell_back["metrics"]["backends"]["unet"] == "tensorrt"
    want = images(unquantized.handle({"input": with_lora}))
    assert all(np.array_equal(x, y) for x, y in zip(images(fell_back), want, strict=True))
