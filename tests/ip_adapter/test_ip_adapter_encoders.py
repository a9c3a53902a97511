"""Each IP-Adapter runs with the image encoder beside its own file: two encoders in folders of the same name
are two components, and an encoder replaced after its first use is served anew, never by the runners of
the one it replaced.

The reference for each image is a worker started with only that encoder on its volume, so what is
compared is the encoder's identity, not its numerics.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from engine.models.model import load_model
from engine.serving.worker import Worker
from engine.settings import Settings
from perf.ip_adapter_files import write_adapter, write_image_encoder
from tests.ip_adapter.conftest import image_prompt, to_base64
from tests.lora.conftest import PAYLOAD, image_of

REQUEST = {**PAYLOAD, "ip_adapters": [{"name": "models/plain", "image": to_base64(image_prompt(3))}]}


def volume(root: Path, cache_dir: Path, encoder_seed: int) -> Path:
    """``models/plain`` (the same adapter on every volume) with an encoder of its own beside it."""
    write_image_encoder(root / "models" / "image_encoder", seed=encoder_seed)
    write_adapter(load_model("tiny", cache_dir), root / "models" / "plain.safetensors", "plain", seed=7)
    return root


def worker(root: Path, cache_dir: Path, engines: Path) -> Worker:
    settings = Settings(
        model="tiny",
        cache_dir=cache_dir,
        engine_dir=engines,
        ip_adapter_dir=root,
        device="cpu",
        backend="torch",
        ready_file=engines / "ready",
    )
    return Worker(settings)


def served(worker: Worker, name: str) -> np.ndarray:
    entry = {**REQUEST["ip_adapters"][0], "name": name}
    response = worker.handle({"input": {**REQUEST, "ip_adapters": [entry]}})
    assert response["status"] == "success", response
    return image_of(response)


def alone(tmp_path: Path, cache_dir: Path, encoder_seed: int) -> np.ndarray:
    """The image of a worker whose volume holds only the adapter with this encoder."""
    root = volume(tmp_path / f"alone-{encoder_seed}", cache_dir, encoder_seed)
    return served(worker(root, cache_dir, tmp_path / f"engines-{encoder_seed}"), "models/plain")


def test_encoders_in_folders_of_the_same_name_are_not_shared(tmp_path, cache_dir):
    root = tmp_path / "volume"
    volume(root / "one", cache_dir, encoder_seed=11)
    volume(root / "two", cache_dir, encoder_seed=12)
    serving = worker(root, cache_dir, tmp_path / "engines")
    one, two = served(serving, "one/models/plain"), served(serving, "two/models/plain")
    assert not np.array_equal(one, two)
    assert np.array_equal(one, alone(tmp_path, cache_dir, 11))
    assert np.array_equal(two, alone(tmp_path, cache_dir, 12))


def test_an_encoder_replaced_after_its_first_use_is_served_anew(tmp_path, cache_dir):
    root = volume(tmp_path / "volume", cache_dir, encoder_seed=11)
    serving = worker(root, cache_dir, tmp_path / "engines")
    before = served(serving, "models/plain")
    write_image_encoder(root / "models" / "image_encoder", seed=12)
    weights = next((root / "models" / "image_encoder").glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new version even on a coarse clock
    after = served(serving, "models/plain")
    assert not np.array_equal(before, after)
    assert np.array_equal(after, alone(tmp_path, cache_dir, 12))


def test_the_encoder_component_names_its_folder_and_files(tmp_path, cache_dir):
    root = volume(tmp_path / "volume", cache_dir, encoder_seed=11)
    serving = worker(root, cache_dir, tmp_path / "engines")
    response = serving.handle({"input": REQUEST})
    encoders = [c for c in response["metrics"]["backends"] if c.startswith("image_encoder.")]
    assert len(encoders) == 1 and encoders[0].startswith("image_encoder.models-"), encoders
