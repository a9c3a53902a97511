"""Where a hub id's model comes from: RunPod's model cache (no network), a local folder, or the hub."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import huggingface_hub
import pytest

from engine.common.errors import ModelError
from engine.common.metrics import ColdStart
from engine.models.builtin import builtin_model_folder
from engine.models.model import load_model, locate_model
from engine.models.sources import ModelSource
from engine.serving.worker import Worker

HUB_ID = "acme/tiny-diffusion"
OLD, NEW = "a" * 40, "b" * 40


def add_snapshot(repo: Path, commit: str, source: Path) -> Path:
    """A snapshot as huggingface_hub writes it: each file a relative symlink to its blob, named by its hash."""
    snapshot = repo / "snapshots" / commit
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, cache_dir: Path) -> Path:
    """RunPod's model cache with two snapshots of the tiny model: refs/main names the newer, refs/v1 the older."""
    root = tmp_path / "huggingface-cache" / "hub"
    repo = root / ("models--" + HUB_ID.replace("/", "--"))
    tiny = builtin_model_folder("tiny", cache_dir)
    for commit in (OLD, NEW):
        add_snapshot(repo, commit, tiny)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(NEW)
    (repo / "refs" / "v1").write_text(OLD)
    os.utime(repo / "snapshots" / OLD, (2e9, 2e9))  # the older commit's folder is the newer one on disk
    return root


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """No download and no connection: either is recorded and fails, as it would on an offline host."""
    attempts: list[str] = []

    def no_download(repo_id: str, **_: object) -> str:
        attempts.append(repo_id)
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    def no_connect(self: socket.socket, address: object) -> None:
        attempts.append(f"connect {address}")
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    monkeypatch.setattr(socket.socket, "connect", no_connect)
    return attempts


def snapshot(root: Path, commit: str) -> Path:
    return root / ("models--" + HUB_ID.replace("/", "--")) / "snapshots" / commit


def test_a_cached_model_loads_from_the_snapshot_refs_main_names_with_no_network(hub_cache, cache_dir, offline):
    model = load_model(HUB_ID, cache_dir, model_cache=hub_cache)
    assert model.source is ModelSource.MODEL_CACHE
    assert model.folder == snapshot(hub_cache, NEW)
    assert (model.folder / "unet" / "config.json").is_symlink()
    assert model.missing_files() == []
    assert offline == []


@pytest.mark.parametrize(("revision", "commit"), [(OLD, OLD), ("v1", OLD), ("main", NEW), (NEW, NEW)])
def test_model_revision_picks_a_cached_snapshot_by_hash_or_ref(hub_cache, cache_dir, offline, revision, commit):
    location = locate_model(HUB_ID, cache_dir, revision, hub_cache)
    assert (location.folder, location.source) == (snapshot(hub_cache, commit), ModelSource.MODEL_CACHE)
    assert offline == []


def test_without_refs_main_the_newest_snapshot_is_taken(hub_cache, cache_dir, offline):
    (hub_cache / ("models--" + HUB_ID.replace("/", "--")) / "refs" / "main").unlink()
    assert locate_model(HUB_ID, cache_dir, None, hub_cache).folder == snapshot(hub_cache, OLD)


def test_a_revision_the_cache_lacks_goes_to_the_hub_and_fails_clearly_offline(hub_cache, cache_dir, offline):
    with pytest.raises(ModelError) as error:
        locate_model(HUB_ID, cache_dir, "v2", hub_cache)
    assert offline == [HUB_ID]
    message = str(error.value)
    assert f"MODEL={HUB_ID} at revision 'v2': not in the model cache" in message
    assert "MODEL_CACHE_DIR" in message and "cached model" in message


@pytest.mark.parametrize("revision", ["../../../etc", "refs/../../x", ""])
def test_a_revision_cannot_name_a_path_outside_the_cached_repo(hub_cache, cache_dir, offline, revision):
    with pytest.raises(ModelError, match="not in the model cache"):
        locate_model(HUB_ID, cache_dir, revision, hub_cache)


def test_not_cached_then_a_local_folder_then_the_hub(tmp_path, cache_dir, monkeypatch, offline):
    empty_cache = tmp_path / "empty"
    monkeypatch.chdir(tmp_path)
    local = tmp_path / HUB_ID
    local.parent.mkdir()
    local.symlink_to(builtin_model_folder("tiny", cache_dir))
    location = locate_model(HUB_ID, cache_dir, None, empty_cache)
    assert (location.folder, location.source) == (local.resolve(), ModelSource.FOLDER)
    assert offline == []

    downloaded = builtin_model_folder("tiny", cache_dir)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **_: str(downloaded))
    location = locate_model("acme/other", cache_dir, None, empty_cache)
    assert (location.folder, location.source) == (downloaded, ModelSource.HUB)


def test_the_cold_start_reports_the_model_source(hub_cache, make_settings, offline):
    worker = Worker(make_settings(model=HUB_ID, model_cache_dir=hub_cache, backend="torch"), ColdStart())
    response = worker.handle({"input": {"prompt": "a fox", "num_inference_steps": 1, "width": 64, "height": 64}})
    assert response["status"] == "success", response
    assert response["metrics"]["init_ms"]["model_source"] == "model_cache"
    assert offline == []


def test_a_download_takes_the_diffusers_files_and_leaves_variants_and_single_file_checkpoints():
    from huggingface_hub.utils import filter_repo_objects

    from engine.models.sources import HUB_IGNORED, HUB_PATTERNS

    repo = [
        "model_index.json",
        "README.md",
        "v1-5-pruned.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors",
        "safety_checker/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer_2/spiece.model",
        "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
    ]
    assert list(filter_repo_objects(repo, allow_patterns=HUB_PATTERNS, ignore_patterns=HUB_IGNORED)) == [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer_2/spiece.model",
        "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
    ]
