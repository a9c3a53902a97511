"""IP-Adapter requests: bad entries, names, files and images refused with the field and the rule, every
problem at once; adapters switched A -> B -> A byte for byte; a request without one runs the plain UNet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from engine.common.errors import RequestError
from engine.lora.files import LoraFiles
from engine.lora.ip_adapters import IpAdapterFiles
from engine.models.controlnet_folders import ControlNetFolders
from engine.models.model import load_model
from engine.serving.admission import Admission
from engine.serving.worker import Worker
from engine.settings import Settings
from tests.ip_adapter.conftest import image_prompt, to_base64, write_adapter
from tests.lora.conftest import PAYLOAD, image_of

IMAGE = to_base64(image_prompt(0))


@pytest.fixture(scope="module")
def folder(sd_adapters: Path, sdxl_adapters: Path, cache_dir: Path) -> Path:
    """The SD adapters, with broken and foreign files beside them."""
    models = sd_adapters / "models"
    (models / "pickled.bin").write_bytes(b"not read")
    (models / "garbage.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(models / "lora.safetensors"))
    write_adapter("tiny-sdxl", cache_dir, models / "for-sdxl.safetensors", "plain", seed=4)
    write_adapter("tiny", cache_dir, sd_adapters / "lonely" / "plain.safetensors", "plain", seed=5)
    face_id = {"image_proj.norm.weight": torch.ones(32), "ip_adapter.1.to_k_ip.weight": torch.zeros(32, 32)}
    save_file(face_id, str(models / "face-id.safetensors"))
    return sd_adapters


@pytest.fixture(scope="module")
def worker(cache_dir: Path, folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Worker:
    engines = tmp_path_factory.mktemp("engines")
    return Worker(
        Settings(
            model="tiny",
            cache_dir=cache_dir,
            engine_dir=engines,
            ip_adapter_dir=folder,
            device="cpu",
            backend="torch",
            ready_file=engines / "ready",
        )
    )


def error_of(worker: Worker, **fields: object) -> str:
    response = worker.handle({"input": {**PAYLOAD, **fields}})
    assert response["status"] == "error", response
    return response["error"]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"name": "models/plain", "image": IMAGE, "scale": float("inf")},
            "ip_adapters[0].scale: Input should be a finite number",
        ),
        (
            {"name": "models/plain", "image": IMAGE, "scale": 4.5},
            "ip_adapters[0].scale: Input should be less than or equal to 4",
        ),
        (
            {"name": "models/plain", "image": IMAGE, "scale": -1},
            "ip_adapters[0].scale: Input should be greater than or equal to 0",
        ),
        ({"name": "models/plain"}, "ip_adapters[0]: give either image or images"),
        ({"name": "models/plain", "image": IMAGE, "images": [IMAGE]}, "ip_adapters[0]: give either image or images"),
        ({"name": "models/plain", "images": [IMAGE] * 5}, "ip_adapters[0].images: List should have at most 4 items"),
        ({"name": "nope", "image": IMAGE}, "ip_adapters[0].name: no IP-Adapter named 'nope'"),
        (
            {"name": "../models/plain", "image": IMAGE},
            "ip_adapters[0].name: must name a file inside the IP-Adapter folder",
        ),
        ({"name": "/etc/passwd", "image": IMAGE}, "ip_adapters[0].name: must name a file inside the IP-Adapter folder"),
        ({"name": "a\x00b", "image": IMAGE}, "ip_adapters[0].name: must not contain control characters"),
        (
            {"name": "models/pickled.bin", "image": IMAGE},
            "ip_adapters[0].name: .bin files are refused (pickle can run code)",
        ),
        ({"name": "models/garbage", "image": IMAGE}, "ip_adapters[0].name: 'models/garbage' is not a safetensors file"),
        (
            {"name": "models/lora", "image": IMAGE},
            "ip_adapters[0].name: 'models/lora': it has no image_proj.* or no ip_adapter.*",
        ),
        ({"name": "models/for-sdxl", "image": IMAGE}, "ip_adapters[0].name: 'models/for-sdxl': made for another model"),
        ({"name": "lonely/plain", "image": IMAGE}, "ip_adapters[0].name: 'lonely/plain': no image encoder"),
        ({"name": "models/face-id", "image": IMAGE}, "'models/face-id': it is a FaceID adapter"),
        ({"name": "models/plain", "image": IMAGE, "scale": "high"}, "ip_adapters[0].scale: must be a number or"),
        (
            {"name": "models/plain", "image": IMAGE, "scale": {"down": {"block_9": 1.0}}},
            "ip_adapters[0].scale.down.block_9: this UNet's down blocks with attention layers are block_1",
        ),
        (
            {"name": "models/plain", "image": IMAGE, "scale": {"down": {"block_0": 1.0}}},
            "ip_adapters[0].scale.down.block_0: this UNet's down blocks with attention layers are block_1",
        ),
        (
            {"name": "models/plain", "image": IMAGE, "scale": {"up": {"block_0": [0.0, 1.0, 0.0]}}},
            "ip_adapters[0].scale.up.block_0: takes one value, or one per attention layer of the block (2), got 3",
        ),
        (
            {"name": "models/plain", "image": IMAGE, "scale": {"up": [0.0, 1.0, 0.0]}},
            "ip_adapters[0].scale.up: takes one value, or one per attention layer of the block (2), got 3",
        ),
        (
            {"name": "models/plain", "image": IMAGE, "scale": {"mid": [1.0, 1.0]}},
            "ip_adapters[0].scale.mid: the mid block takes one value (diffusers refuses a list of 2)",
        ),
        (
            {"name": "models/plain", "image": IMAGE, "scale": {"left": 1.0}},
            "ip_adapters[0].scale.left: per-block scales take down, mid and up only",
        ),
        (
            {"name": "models/plain", "image": IMAGE, "scale": {"up": {"b0": 1.0}}},
            "ip_adapters[0].scale.up.b0: blocks are named block_0, block_1",
        ),
        (
            {"name": "models/plain", "image": IMAGE, "scale": {"up": {"block_0": [0.5, float("nan")]}}},
            "ip_adapters[0].scale.up.block_0[1]: Input should be a finite number",
        ),
        (
            {"name": "models/plain", "image": IMAGE, "scale": {"down": {"block_1": 4.5}}},
            "ip_adapters[0].scale.down.block_1: Input should be less than or equal to 4",
        ),
        (
            {"name": "models/plain", "image": IMAGE, "scale": {"mid": True}},
            "ip_adapters[0].scale.mid: Input should be a valid number",
        ),
        (
            {"name": "models/plain", "image": IMAGE, "scale": {"up": {"block_0": []}}},
            "ip_adapters[0].scale.up.block_0: a list of 1 to 16 values",
        ),
        ({"name": "models/plain", "image": "not base64!"}, "ip_adapters[0].image:"),
        ({"name": "models/plain", "images": [IMAGE, "bad"]}, "ip_adapters[0].images[1]:"),
    ],
)
def test_a_bad_entry_is_refused_naming_the_field_and_the_rule(worker, entry, message):
    assert message in error_of(worker, ip_adapters=[entry])
    assert worker.handle({"input": PAYLOAD})["status"] == "success", "the worker serves on"


def test_bad_per_block_scales_are_refused_before_anything_runs(worker):
    """Refused at admission: no image prompt fetched, no runner chain added; every entry's problem named."""
    chains = dict(worker.served.chains)
    unreachable = "http://127.0.0.1:9/prompt.png"
    scale = {"down": {"block_9": 1.0}, "up": {"block_0": [1.0, 1.0, 1.0]}}
    error = error_of(worker, ip_adapters=[{"name": "models/plain", "image": unreachable, "scale": scale}])
    assert "ip_adapters[0].scale.down.block_9:" in error
    assert "ip_adapters[0].scale.up.block_0:" in error
    assert "ip_adapters[0].image" not in error, "the image is fetched only once every check has passed"
    assert dict(worker.served.chains) == chains


def test_every_problem_is_named_at_once(worker):
    error = error_of(
        worker,
        width=65,
        ip_adapters=[{"name": "nope", "image": IMAGE}],
        loras=[{"name": "x", "scale": 9}],
    )
    assert "width: must be a multiple of 8" in error
    assert "ip_adapters[0].name: no IP-Adapter named 'nope'" in error
    assert "loras[0].scale" in error


def test_more_adapters_than_max_ip_adapters_are_refused(worker):
    entry = {"name": "models/plain", "image": IMAGE}
    assert "ip_adapters: at most 1 per request (MAX_IP_ADAPTERS), got 2" in error_of(worker, ip_adapters=[entry] * 2)


def test_max_ip_adapters_is_at_most_the_two_adapter_slots(make_settings):
    with pytest.raises(ValidationError, match="less than or equal to 2"):
        make_settings(max_ip_adapters=3)


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_families_without_ip_adapters_refuse_the_field(cache_dir, folder, make_settings, model):
    settings = make_settings(model=model, ip_adapter_dir=folder)
    loaded = load_model(model, cache_dir)
    admission = Admission(
        settings,
        loaded,
        ControlNetFolders(folder, loaded),
        LoraFiles(folder, settings.max_lora_bytes, int(settings.lora_cache_gb * 1e9)),
        IpAdapterFiles(folder, loaded, settings.max_lora_bytes),
    )
    payload = {"prompt": "a fox", "ip_adapters": [{"name": "models/plain", "image": IMAGE}]}
    with pytest.raises(RequestError, match=rf"ip_adapters: not supported for {loaded.family.name} models"):
        admission.admit(payload)


def test_switching_adapters_starts_from_the_base_weights(worker):
    """A -> B -> A gives A's image byte for byte; a request without one then gives the plain image."""
    plain = image_of(worker.handle({"input": PAYLOAD}))

    def with_adapter(name: str) -> np.ndarray:
        return image_of(worker.handle({"input": {**PAYLOAD, "ip_adapters": [{"name": name, "image": IMAGE}]}}))

    first_a, b, second_a = with_adapter("models/plain"), with_adapter("models/plain-b"), with_adapter("models/plain")
    assert np.array_equal(first_a, second_a)
    assert not np.array_equal(first_a, b)
    assert not np.array_equal(first_a, plain)
    assert np.array_equal(image_of(worker.handle({"input": PAYLOAD})), plain)
