"""Which TensorRT release may load which engine, decided from the store's keys before any plan is read.

Engines are built through the real export stage into a temporary store (tests/fake_tensorrt.py stands in
for TensorRT), then loaded by the worker's own loading code at another TensorRT version.
"""

from __future__ import annotations

import hashlib
import tracemalloc
from types import SimpleNamespace

import pytest
import torch

from engine.backends.tensorrt.loading import load_tensorrt
from engine.backends.tensorrt.runtime import version_refusal
from engine.serving.startup import Startup
from engine.sizes import SizeRange
from engine.store.fingerprint import component_fingerprint
from engine.store.keys import ENGINE_FILE
from export import stages
from export.stagelog import StageLog
from export.tensorrt import BuildOptions
from tests import fake_tensorrt


def publish_compatible(store, model, version: str):
    """A version-compatible UNet engine built by TensorRT ``version``."""
    exporter = stages.Exporter(model, store, torch.device("cpu"), "fp32")
    options = BuildOptions(2**30, 3, version_compatible=True)
    builder = stages.EngineBuilder.create(
        store, "sm90", [SizeRange(64, 64, 96, 2)], options, 30, 1, trt=fake_tensorrt.fake_tensorrt(version)
    )
    [onnx] = store.find(kind="onnx", component="unet")
    return exporter.engine("unet", onnx, builder, StageLog())


def load(store, model, version: str):
    fingerprint = component_fingerprint(model, "unet", store.file_digest)
    components = {"unet": (model.specs["unet"], fingerprint, "fp32")}
    return load_tensorrt(
        store, components, torch.device("cpu"), "sm90", False, trt=fake_tensorrt.fake_tensorrt(version)
    )


@pytest.mark.parametrize(
    ("tag", "runtime", "loads"),
    [
        ("11.4.0.106", "11.4.0.106", True),
        ("11.4.0.106", "11.5.0.1", False),
        ("11.0.0.1-vc", "11.4.0.106", True),
        ("11.4.0.106-vc", "11.4.0.106", True),
        ("11.4.0.106-vc", "11.4.1.2", True),
        ("11.5.0.1-vc", "11.4.0.106", False),
        ("11.4.0.107-vc", "11.4.0.106", False),
        ("10.16.1.11-vc", "11.4.0.106", False),
        ("11.x-vc", "11.4.0.106", False),
    ],
)
def test_version_compatible_engines_load_forward_only(tag, runtime, loads):
    assert (version_refusal(tag, runtime) is None) is loads


def test_an_engine_a_newer_tensorrt_built_is_never_deserialized_and_the_worker_serves_on(store, model, monkeypatch):
    monkeypatch.setattr(stages, "compare", fake_tensorrt.passing_compare)
    newer = publish_compatible(store, model, "11.5.0.1")
    assert newer.file(ENGINE_FILE).read_bytes().startswith(b"FAKEPLAN"), "a real plan file in the store"
    tried = []
    deserialize = fake_tensorrt.Runtime.deserialize_cuda_engine
    monkeypatch.setattr(
        fake_tensorrt.Runtime,
        "deserialize_cuda_engine",
        lambda self, serialized_engine: tried.append(len(serialized_engine)) or deserialize(self, serialized_engine),
    )

    older = load(store, model, "11.4.0.106")
    assert tried == [], "a plan only a newer release loads is skipped by its tag"
    assert older.runners == {}
    assert older.unusable is None, "nothing is wrong with the store: the worker serves on the next backend"
    assert older.missing == ["unet"]
    assert "built by TensorRT 11.5.0.1, newer than this worker's 11.4.0.106" in older.unavailable["unet"]
    checks = {check.__name__: check for check in Startup(None, SimpleNamespace(tensorrt=older), None).fitness_checks()}
    checks["engines_load"]()

    assert set(load(store, model, "11.6.0.3").runners) == {"unet"}, "a later release loads it"
    assert len(tried) == 1


def test_an_older_version_compatible_engine_is_loaded_alongside_none_newer(store, model, monkeypatch):
    monkeypatch.setattr(stages, "compare", fake_tensorrt.passing_compare)
    publish_compatible(store, model, "11.0.0.1")
    backend = load(store, model, "11.4.0.106")
    assert set(backend.runners) == {"unet"} and backend.unusable is None


def test_a_plan_is_hashed_and_loaded_through_a_mapping_not_a_copy(store, model, monkeypatch):
    """Serving maps the plan: hashing a 48 MB plan allocates no 48 MB buffer in this process."""
    monkeypatch.setattr(stages, "compare", fake_tensorrt.passing_compare)
    engine = publish_compatible(store, model, "11.4.0.106")
    plan = engine.file(ENGINE_FILE)
    plan.write_bytes(plan.read_bytes() + b" " * (48 * 2**20))  # JSON allows trailing blanks: still a fake plan
    engine.files[ENGINE_FILE]["size"] = plan.stat().st_size
    engine.files[ENGINE_FILE]["sha256"] = hashlib.sha256(plan.read_bytes()).hexdigest()
    tracemalloc.start()
    try:
        with engine.mapped_verified(ENGINE_FILE) as mapped:
            _, peak = tracemalloc.get_traced_memory()
            assert len(mapped) == plan.stat().st_size
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"{peak / 2**20:.0f} MB allocated to hash a 48 MB plan"
