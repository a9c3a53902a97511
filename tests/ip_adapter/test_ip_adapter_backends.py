"""IP-Adapter components exported to ONNX and run by onnxruntime: the image encoder, each projection and the
IP denoiser, whose IP matrices a patch sets from the export's weight map as a LoRA's.

onnxruntime must give torch's image within 2/255 for a plain adapter (the 4 tokens the graph was
traced with) and a Plus one (16: the token axis is dynamic), with a LoRA in the same request, and at
per-block scales (one graph input, a value per cross-attention layer), on SD and SDXL, and for two
adapters in one request (the IP denoiser with two adapter slots); adapters
switched A -> B -> A give A's image byte for byte; a request without one runs the plain UNet's graph.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

from engine.serving.worker import Worker
from engine.settings import Settings
from tests.conftest import ROOT, export_command
from tests.ip_adapter.conftest import image_prompt, to_base64
from tests.lora.conftest import PAYLOAD, image_of
from tests.parity import TOLERANCE

ADAPTERS = ("models/plain", "models/plus", "models/plain-b")


def export(
    engine_dir: Path, cache_dir: Path, adapters: Path, *extra: str, max_adapters: int = 1
) -> subprocess.CompletedProcess:
    command, env = export_command(engine_dir, cache_dir, "--skip-engines", "--ip-adapters", *ADAPTERS, *extra)
    env["IP_ADAPTER_DIR"] = str(adapters)
    env["MAX_IP_ADAPTERS"] = str(max_adapters)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def store(cache_dir: Path, sd_adapters: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    engine_dir = tmp_path_factory.mktemp("ip-exported")
    done = export(engine_dir, cache_dir, sd_adapters, max_adapters=2)
    assert done.returncode == 0, done.stderr[-3000:]
    exported = ("image_encoder.models-", "ip_projection.models--plain-", "ip_projection.models--plus-", "unet_ip2")
    for component in exported:
        assert component in done.stdout
    return engine_dir


def worker(cache_dir: Path, store: Path, root: Path, backend: str, model: str = "tiny") -> Worker:
    return Worker(
        Settings(
            model=model,
            cache_dir=cache_dir,
            engine_dir=store,
            ip_adapter_dir=root,
            lora_dir=root / "loras",
            device="cpu",
            backend=backend,
            torch_fallback="off" if backend == "onnxruntime" else "lazy",
            ready_file=store / "ready",
            max_ip_adapters=2,
        )
    )


@pytest.fixture(scope="module")
def workers(cache_dir, store, sd_adapters) -> dict[str, Worker]:
    return {backend: worker(cache_dir, store, sd_adapters, backend) for backend in ("torch", "onnxruntime")}


INSTANT_STYLE = {"down": {"block_1": [0.6]}, "up": {"block_0": [0.0, 1.0]}}


def payload(name: str, scale: float | dict = 0.8, lora: bool = False) -> dict:
    extra = {"loras": [{"name": "c", "scale": 1.0}]} if lora else {}
    return {**PAYLOAD, **extra, "ip_adapters": [{"name": name, "image": to_base64(image_prompt(0)), "scale": scale}]}


@pytest.mark.parametrize(
    ("name", "scale", "lora"),
    [
        ("models/plain", 0.8, False),
        ("models/plus", 0.8, False),
        ("models/plus", 0.8, True),
        ("models/plus", INSTANT_STYLE, False),
    ],
    ids=["plain", "plus", "plus+lora", "plus-per-block"],
)
def test_onnxruntime_matches_torch(workers, name, scale, lora):
    torch_image = image_of(workers["torch"].handle({"input": payload(name, scale, lora)}))
    response = workers["onnxruntime"].handle({"input": payload(name, scale, lora)})
    assert response["status"] == "success", response
    backends = response["metrics"]["backends"]
    assert set(backends.values()) == {"onnxruntime"}, response["metrics"]["fallbacks"]
    assert "unet_ip" in backends and any(c.startswith("image_encoder.models-") for c in backends)
    difference = np.abs(image_of(response) - torch_image).max()
    assert difference <= TOLERANCE, f"{difference}/255 from torch"


def test_two_adapters_on_onnxruntime_match_torch(workers):
    """The IP denoiser with two adapter slots: each adapter's matrices patched into its own slot."""
    entries = [
        {"name": "models/plain", "image": to_base64(image_prompt(0)), "scale": 0.5},
        {"name": "models/plus", "image": to_base64(image_prompt(1)), "scale": INSTANT_STYLE},
    ]
    torch_image = image_of(workers["torch"].handle({"input": {**PAYLOAD, "ip_adapters": entries}}))
    response = workers["onnxruntime"].handle({"input": {**PAYLOAD, "ip_adapters": entries}})
    assert response["status"] == "success", response
    assert response["metrics"]["backends"]["unet_ip2"] == "onnxruntime", response["metrics"]["fallbacks"]
    difference = np.abs(image_of(response) - torch_image).max()
    assert difference <= TOLERANCE, f"{difference}/255 from torch"


def test_switching_adapters_is_a_patch_from_the_base(workers):
    """A -> B -> A on onnxruntime gives A's image byte for byte; the plain request runs the plain UNet."""
    ort = workers["onnxruntime"]
    plain = ort.handle({"input": PAYLOAD})
    assert "unet_ip" not in plain["metrics"]["backends"]
    assert plain["metrics"]["backends"]["unet"] == "onnxruntime"
    first_a = image_of(ort.handle({"input": payload("models/plain")}))
    b = image_of(ort.handle({"input": payload("models/plain-b")}))
    second_a = image_of(ort.handle({"input": payload("models/plain")}))
    assert np.array_equal(first_a, second_a)
    assert not np.array_equal(first_a, b)
    assert np.array_equal(image_of(ort.handle({"input": PAYLOAD})), image_of(plain))


def test_onnxruntime_matches_torch_for_sdxl(cache_dir, sdxl_adapters, tmp_path):
    done = export(tmp_path, cache_dir, sdxl_adapters, "--model", "tiny-sdxl")
    assert done.returncode == 0, done.stderr[-3000:]
    images = {}
    for backend in ("torch", "onnxruntime"):
        served = worker(cache_dir, tmp_path, sdxl_adapters, backend, "tiny-sdxl")
        for scale in (0.8, INSTANT_STYLE):
            response = served.handle({"input": payload("models/plus", scale)})
            assert response["status"] == "success", response
            assert response["metrics"]["backends"]["unet_ip"] == backend
            images[backend, str(scale)] = image_of(response)
    for scale in (0.8, INSTANT_STYLE):
        difference = np.abs(images["onnxruntime", str(scale)] - images["torch", str(scale)]).max()
        assert difference <= TOLERANCE, f"{difference}/255 from torch at scale {scale}"
