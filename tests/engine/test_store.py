"""The engine store on real files: keys, atomic publish, integrity, quarantine, sweeping."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from engine.common.errors import ArtifactError
from engine.store.artifact import ArtifactKey
from engine.store.staging import HOST, Staging
from engine.store.store import MANIFEST, Store

REAL_TIME = time.time
KEY = ArtifactKey(kind="onnx", component="unet", fingerprint="f" * 64, precision="fp32", exporter="x-v1")


def write_payload(staging: Staging, payload: bytes = b"graph bytes") -> None:
    (staging.path / "model.onnx").write_bytes(payload)
    staging.info["note"] = "built"


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "change",
    [
        {"fingerprint": "e" * 64},
        {"component": "vae_decoder"},
        {"precision": "fp16"},
        {"exporter": "x-v2"},
        {"kind": "tensorrt", "gpu": "sm90", "tensorrt": "11.4.0", "profile": "b1-4"},
        {"gpu": "sm89"},
        {"tensorrt": "10.16"},
        {"profile": "b1-8"},
    ],
)
def test_every_key_field_changes_the_location(change):
    assert replace(KEY, **change).dirname != KEY.dirname


def test_ensure_builds_once_and_publishes_a_manifest(tmp_path):
    store = Store(tmp_path)
    calls = []

    def build(staging: Staging) -> None:
        calls.append(1)
        write_payload(staging)

    first = store.ensure(KEY, build)
    second = store.ensure(KEY, build)
    assert calls == [1]
    assert first.path == second.path
    assert first.manifest["key"]["component"] == "unet"
    assert first.manifest["note"] == "built"
    assert first.files["model.onnx"]["size"] == len(b"graph bytes")
    assert "build_seconds" in first.manifest
    first.verify()
    assert store.find(kind="onnx", component="unet")[0].path == first.path
    assert store.find(component="vae_decoder") == []
    assert list(store.staging.iterdir()) == []


def test_a_failed_build_publishes_nothing(tmp_path):
    store = Store(tmp_path)

    def build(staging: Staging) -> None:
        write_payload(staging)
        raise RuntimeError("export crashed")

    with pytest.raises(RuntimeError):
        store.ensure(KEY, build)
    assert store.get(KEY) is None
    assert list(store.staging.iterdir()) == []
    assert not any(store.locks.iterdir())


def test_a_flipped_byte_is_detected_and_rebuilt(tmp_path):
    store = Store(tmp_path)
    artifact = store.ensure(KEY, write_payload)
    flip_a_byte(artifact.file("model.onnx"))
    with pytest.raises(ArtifactError, match="sha256"):
        artifact.verify()
    with pytest.raises(ArtifactError), artifact.mapped_verified("model.onnx"):
        pass
    rebuilt = store.ensure(KEY, write_payload)
    with rebuilt.mapped_verified("model.onnx") as mapped:
        assert mapped[:] == b"graph bytes"
    assert len(list(store.quarantine_dir.iterdir())) == 1


def test_a_truncated_file_fails_the_cheap_check(tmp_path):
    store = Store(tmp_path)
    artifact = store.ensure(KEY, write_payload)
    artifact.file("model.onnx").write_bytes(b"graph")
    with pytest.raises(ArtifactError, match="truncated"):
        store.get(KEY)


def test_staging_of_dead_processes_is_swept(tmp_path):
    store = Store(tmp_path)
    process = multiprocessing.get_context("spawn").Process(target=os.getpid)
    process.start()
    process.join()
    dead = store.staging / f"{HOST}-{process.pid}-abc"
    alive = store.staging / f"{HOST}-{os.getpid()}-def"
    elsewhere = store.staging / f"another-host-{process.pid}-ghi"
    for path in (dead, alive, elsewhere):
        path.mkdir(parents=True)
    store.sweep_staging()
    assert not dead.exists()
    assert alive.exists() and elsewhere.exists()


def test_file_digest_is_memoized_per_file_version(tmp_path):
    store = Store(tmp_path / "store")
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"a" * 1000)
    first = store.file_digest(weights)
    assert store.file_digest(weights) == first
    assert len(list(store.digests.iterdir())) == 1
    weights.write_bytes(b"b" * 1000)
    os.utime(weights, ns=(1, 1))
    assert store.file_digest(weights) != first


def name_outside(tmp_path: Path, artifact_path: Path, way: str) -> str:
    """A manifest file name that leads to ``outside/secret.bin`` next to the store, by one kind of path."""
    outside = tmp_path / "outside" / "secret.bin"
    if way == "absolute":
        return str(outside)
    if way == "symlink":
        (artifact_path / "link").symlink_to(outside.parent, target_is_directory=True)
        return "link/secret.bin"
    up = "../" * len(artifact_path.relative_to(tmp_path).parts)
    return f"{up}outside/secret.bin" if way == "dot-dot" else f"sub/../{up}outside/secret.bin"


@pytest.mark.parametrize("way", ["dot-dot", "dot-dot after a folder", "absolute", "symlink"])
def test_a_manifest_naming_a_file_outside_its_artifact_is_refused_and_never_read(tmp_path, way):
    store = Store(tmp_path / "store")
    artifact = store.ensure(KEY, write_payload)
    secret = b"not the store's"
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.bin").write_bytes(secret)
    manifest = json.loads((artifact.path / MANIFEST).read_text())
    # an entry that would pass every size and hash check if the name were followed
    name = name_outside(tmp_path, artifact.path, way)
    manifest["files"][name] = {"sha256": hashlib.sha256(secret).hexdigest(), "size": len(secret)}
    (artifact.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="outside the artifact"):
        store.get(KEY)
    assert store.find(component="unet") == []
    with pytest.raises(ArtifactError, match="outside the artifact"):
        artifact.file(name)
    rebuilt = store.ensure(KEY, write_payload)  # quarantined, then built again
    assert list(rebuilt.files) == ["model.onnx"]
    assert len(list(store.quarantine_dir.iterdir())) == 1


@pytest.mark.parametrize("files", [None, [], {"model.onnx": {"size": "11"}}, {"a\x00b": {"sha256": "0", "size": 1}}])
def test_a_manifest_without_a_valid_file_list_is_a_broken_artifact(tmp_path, files):
    store = Store(tmp_path)
    artifact = store.ensure(KEY, write_payload)
    manifest = json.loads((artifact.path / MANIFEST).read_text())
    manifest["files"] = files
    (artifact.path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError):
        store.get(KEY)


def test_files_in_folders_inside_the_artifact_are_kept(tmp_path):
    def build(staging: Staging) -> None:
        (staging.path / "weights").mkdir()
        (staging.path / "weights" / "part.bin").write_bytes(b"weights")

    artifact = Store(tmp_path).ensure(KEY, build)
    assert list(artifact.files) == ["weights/part.bin"]
    artifact.verify()
    with artifact.mapped_verified("weights/part.bin") as mapped:
        assert mapped[:] == b"weights"


def test_staging_age_is_read_on_the_storage_clock_not_this_host(tmp_path, monkeypatch):
    """A host whose clock runs days ahead (or behind) sweeps no build in progress elsewhere, and still
    sweeps what the storage itself dates from days ago."""
    store = Store(tmp_path)
    fresh = store.staging / "another-host-123-live"
    old = store.staging / "another-host-456-abandoned"
    for path in (fresh, old):
        path.mkdir(parents=True)
    two_days = 2 * 24 * 3600
    os.utime(old, (time.time() - two_days, time.time() - two_days))
    for skew in (two_days, -two_days):
        monkeypatch.setattr(time, "time", lambda skew=skew: REAL_TIME() + skew)  # this host's clock
        store.sweep_staging()
        assert fresh.exists()
    assert not old.exists()
    assert sorted(path.name for path in store.staging.iterdir()) == [fresh.name]
