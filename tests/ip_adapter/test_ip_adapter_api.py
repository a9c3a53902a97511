"""Held-out IP-Adapters through the SDK's local API server, as a client sends them: JSON with base64 image
prompts, answered by the real handler, against diffusers' pipeline after ``load_ip_adapter``.

The adapters (plain and Plus) are written here with seeds the other tests do not use, beside an image
encoder of another shape than perf's (a 48 px input in 12 px patches, two layers, two heads), so
nothing is shared with the parity tests but the layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.models.model import load_model
from perf.ip_adapter_files import ENCODER, write_adapter
from tests.conftest import runsync, serve_api, worker_env
from tests.ip_adapter.conftest import image_prompt, load_adapters, to_base64
from tests.lora.conftest import image_of, reference_pipeline
from tests.parity import TOLERANCE

HELD_OUT_ENCODER = {**ENCODER, "image_size": 48, "patch_size": 12, "num_hidden_layers": 2, "num_attention_heads": 2}
"""perf's widths (the adapters' projections read them), at another input size, depth and head count."""
PAYLOAD = {"prompt": "a lighthouse at dusk", "seed": 21, "num_inference_steps": 3, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def held_out(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    root = tmp_path_factory.mktemp("ip-held-out")
    torch.manual_seed(41)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**HELD_OUT_ENCODER)).eval()
    encoder.save_pretrained(root / "held" / "image_encoder")
    model = load_model("tiny", cache_dir)
    write_adapter(model, root / "held" / "plain.safetensors", "plain", seed=42)
    write_adapter(model, root / "held" / "plus.safetensors", "plus", seed=43)
    return root


@pytest.fixture(scope="module")
def api_server(cache_dir: Path, held_out: Path) -> Iterator[str]:
    engine_dir = held_out / "engines"
    env = worker_env(cache_dir, engine_dir, IP_ADAPTER_DIR=str(held_out), MAX_IP_ADAPTERS="1")
    with serve_api(env, held_out / "server.log") as (url, _):
        yield url


def diffusers_image(cache_dir: Path, root: Path, name: str, scale: float, seed: int) -> np.ndarray:
    pipe = load_adapters(reference_pipeline("tiny", cache_dir), root, "held", name, scale)
    image = pipe(
        PAYLOAD["prompt"],
        num_inference_steps=PAYLOAD["num_inference_steps"],
        width=PAYLOAD["width"],
        height=PAYLOAD["height"],
        generator=torch.Generator().manual_seed(PAYLOAD["seed"]),
        ip_adapter_image=image_prompt(seed, size=72),
    ).images[0]
    return np.asarray(image, dtype=np.int16)


def served(url: str, payload: dict) -> dict:
    response = runsync(url, payload)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "COMPLETED", body
    return body["output"]


@pytest.mark.parametrize(("name", "scale", "seed"), [("plain", 0.6, 31), ("plus", 0.9, 32)])
def test_held_out_adapters_through_the_api_match_diffusers(api_server, cache_dir, held_out, name, scale, seed):
    entry = {"name": f"held/{name}", "image": to_base64(image_prompt(seed, size=72)), "scale": scale}
    output = served(api_server, {**PAYLOAD, "ip_adapters": [entry]})
    reference = diffusers_image(cache_dir, held_out, name, scale, seed)
    plain = image_of(served(api_server, PAYLOAD))
    assert np.abs(reference - plain).max() > 4 * TOLERANCE, "the adapter must change the image to mean much"
    difference = np.abs(image_of(output) - reference).max()
    assert difference <= TOLERANCE, f"{difference}/255 from diffusers"
    assert output["metrics"]["ip_adapters"][0]["kind"] == name


def test_a_malformed_entry_is_refused_by_field_and_the_server_answers_on(api_server):
    image = to_base64(image_prompt(33, size=72))
    for entry, message in (
        ({"name": "held/plain", "image": image, "scale": "strong"}, "ip_adapters[0].scale: "),
        ({"name": "held/plain", "image": "bm90IGFuIGltYWdl"}, "ip_adapters[0].image: "),
    ):
        body = runsync(api_server, {**PAYLOAD, "ip_adapters": [entry]}).json()
        assert body["status"] == "FAILED", body
        assert message in body["error"] and "Traceback" not in body["error"], body["error"]
    assert served(api_server, {**PAYLOAD, "ip_adapters": [{"name": "held/plain", "image": image}]})["status"] == (
        "success"
    )
