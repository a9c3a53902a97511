"""The engine build and its publication, with TensorRT's builder stood in for by tests/fake_tensorrt.py.

TensorRT's full libraries and a GPU do not exist on this machine; everything around
them does: network flags, profiles, workspace, timing cache, keys, manifests, and the
validation gate. tests/test_tensorrt_gpu.py repeats the chain for real where it can.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
import torch

from engine.common.errors import ArtifactError
from engine.sizes import SizeRange
from engine.store.keys import ONNX_FILE
from engine.store.profiles import profile_for
from engine.store.store import Store
from export import stages
from export.stagelog import StageLog
from export.stages import EngineBuilder, Exporter
from export.tensorrt import BuildOptions, TimingCache, build_engine, network_flags, timing_cache_name
from tests import fake_tensorrt

OPTIONS = BuildOptions(workspace_bytes=2**30, optimization_level=4, version_compatible=False)


def onnx_artifact(store: Store, component: str):
    [artifact] = store.find(kind="onnx", component=component)
    return artifact


def test_tensorrt_11_networks_are_strongly_typed_without_flags_and_tensorrt_10_asks_for_it():
    """The flag's value is TensorRT 10's own, as its bindings' stubs record it (not the fake's constant)."""
    assert network_flags(fake_tensorrt.fake_tensorrt("11.4.0.106")) == 0
    stubs = json.loads((Path(__file__).parents[1] / "engine" / "tensorrt_builder_api.json").read_text())
    strongly_typed = stubs["classes"]["NetworkDefinitionCreationFlag"]["STRONGLY_TYPED"]
    assert network_flags(fake_tensorrt.fake_tensorrt("10.16.1.11")) == 1 << strongly_typed == 2


def test_build_sets_the_profiles_workspace_level_and_timing_cache(store, model, tmp_path):
    trt = fake_tensorrt.fake_tensorrt()
    spec = model.specs["unet"]
    profiles = [profile_for(spec, SizeRange(64, 64, 128, 2)), profile_for(spec, SizeRange.parse("64x1"))]
    cache = TimingCache(tmp_path / "cache" / "sm90-trt11.cache", 30, 1)
    plan = tmp_path / "engine.plan"
    build_engine(trt, None, onnx_artifact(store, "unet").file(ONNX_FILE), profiles, OPTIONS, cache, plan)
    built = json.loads(plan.read_bytes()[len(b"FAKEPLAN") :])
    dynamic, static = built["profiles"]
    assert dynamic["sample"] == [[1, 4, 8, 8], [2, 4, 8, 8], [4, 4, 16, 16]]
    assert dynamic["timestep"] == [[1], [1], [1]]
    assert static["sample"] == [[2, 4, 8, 8]] * 3
    assert built["flags"] == 0
    assert set(built["tensors"]) == {"sample", "timestep", "encoder_hidden_states", "noise_pred"}
    assert json.loads(cache.path.read_bytes()) == {"tactic-0": 1}

    build_engine(trt, None, onnx_artifact(store, "unet").file(ONNX_FILE), profiles[1:], OPTIONS, cache, plan)
    assert len(json.loads(cache.path.read_bytes())) == 2, "the second build merges into the saved cache"


def test_parse_and_build_failures_are_reported(store, model, tmp_path):
    trt = fake_tensorrt.fake_tensorrt()
    profile = profile_for(model.specs["unet"], SizeRange(64, 64, 128, 2))
    cache = TimingCache(tmp_path / "c.cache", 30, 1)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not onnx")
    with pytest.raises(ArtifactError, match=r"could not parse broken\.onnx"):
        build_engine(trt, None, broken, [profile], OPTIONS, cache, tmp_path / "a.plan")
    fake_tensorrt.Builder.failures = 1
    with pytest.raises(ArtifactError, match=r"failed to build model\.onnx for profiles 64-128@64x2"):
        build_engine(
            trt, None, onnx_artifact(store, "unet").file(ONNX_FILE), [profile], OPTIONS, cache, tmp_path / "b.plan"
        )


def make_builder(store: Store, ranges: list[SizeRange], version_compatible: bool = False) -> EngineBuilder:
    options = BuildOptions(2**30, 3, version_compatible)
    trt = fake_tensorrt.fake_tensorrt()
    return EngineBuilder.create(store, "sm90", ranges, options, 30, 1, trt=trt, max_prompt_chunks=3)


def test_one_engine_holds_a_profile_per_range_and_is_published_once(store, model, monkeypatch):
    monkeypatch.setattr(stages, "compare", fake_tensorrt.passing_compare)
    exporter = Exporter(model, store, torch.device("cpu"), "fp32")
    builder = make_builder(store, [SizeRange(64, 64, 128, 2), SizeRange.parse("64x1")])
    log = StageLog()
    engine = exporter.engine("unet", onnx_artifact(store, "unet"), builder, log)
    engine.verify()
    assert engine.key.profile == "64-128@64x2+231tok,64x1+231tok"
    assert (engine.key.kind, engine.key.gpu, engine.key.tensorrt) == ("tensorrt", "sm90", "11.4.0.106")
    assert engine.key.fingerprint == onnx_artifact(store, "unet").key.fingerprint
    assert engine.manifest["builder"]["optimization_level"] == 3
    assert engine.manifest["engine_bytes"] > 0
    dynamic, static = engine.manifest["profiles"]
    assert [dynamic["label"], static["label"]] == ["64-128@64x2+231tok", "64x1+231tok"]
    hidden = model.config.configs["text_encoder"]["hidden_size"]
    assert dynamic["inputs"]["encoder_hidden_states"] == {
        "min": [1, 77, hidden],
        "opt": [2, 77, hidden],
        "max": [4, 231, hidden],
    }, "prompts from one chunk (the optimum) to MAX_PROMPT_CHUNKS, with and without guidance"
    assert static["inputs"]["sample"]["min"] == static["inputs"]["sample"]["max"] == [2, 4, 8, 8]
    assert static["inputs"]["encoder_hidden_states"]["max"] == [2, 231, hidden]
    assert {"reference engine", "build engine", "validate engine"} <= set(log.seconds)
    again = StageLog()
    assert exporter.engine("unet", onnx_artifact(store, "unet"), builder, again).path == engine.path
    assert again.seconds == {}


def test_version_compatible_engines_carry_the_version_that_built_them(store, model, monkeypatch):
    monkeypatch.setattr(stages, "compare", fake_tensorrt.passing_compare)
    exporter = Exporter(model, store, torch.device("cpu"), "fp32")
    builder = make_builder(store, [SizeRange(64, 64, 128, 2)], version_compatible=True)
    engine = exporter.engine("vae_decoder", onnx_artifact(store, "vae_decoder"), builder, StageLog())
    assert engine.key.tensorrt == "11.4.0.106-vc", "only this release and later ones may load it"


def test_the_timing_cache_is_kept_per_gpu_model_not_only_per_compute_capability(store):
    assert timing_cache_name("sm89", "NVIDIA L4 22GB", "11.4.0.106") == "sm89-nvidia-l4-22gb-trt11.4.0.106.cache"
    assert timing_cache_name("sm89", "NVIDIA L40S 45GB", "11.4.0.106") != timing_cache_name(
        "sm89", "NVIDIA GeForce RTX 4090 24GB", "11.4.0.106"
    )
    options = BuildOptions(2**30, 3, False)
    pcie, sxm = (
        EngineBuilder.create(store, "sm90", [], options, 30, 1, trt=fake_tensorrt.fake_tensorrt(), gpu_model=name)
        for name in ("NVIDIA H100 PCIe 80GB", "NVIDIA H100 80GB HBM3 80GB")
    )
    assert pcie.timing_cache.path.name == "sm90-nvidia-h100-pcie-80gb-trt11.4.0.106.cache"
    assert pcie.timing_cache.path != sxm.timing_cache.path


def test_a_timing_cache_tensorrt_refuses_is_left_out_of_the_build(store, model, tmp_path, monkeypatch, caplog):
    trt = fake_tensorrt.fake_tensorrt()
    cache = TimingCache(tmp_path / "sm90.cache", 30, 1)
    cache.path.write_bytes(b'{"tactic-from-another-gpu": 7}')
    attached = []

    def set_timing_cache(self, cache, ignore_mismatch):  # as TensorRT does for another device's cache
        if cache._entries:
            return False
        attached.append(dict(cache._entries))
        self._cache = cache
        return True

    monkeypatch.setattr(fake_tensorrt.IBuilderConfig, "set_timing_cache", set_timing_cache)
    monkeypatch.setattr(fake_tensorrt.ITimingCache, "combine", lambda self, input_cache, ignore_mismatch: False)
    plan = tmp_path / "engine.plan"
    profile = profile_for(model.specs["unet"], SizeRange(64, 64, 128, 2))
    build_engine(trt, None, onnx_artifact(store, "unet").file(ONNX_FILE), [profile], OPTIONS, cache, plan)
    assert plan.read_bytes().startswith(b"FAKEPLAN")
    assert attached == [{}], "built on an empty cache of its own"
    assert "refused the saved timing cache" in caplog.text
    assert json.loads(cache.path.read_bytes()) == {"tactic-0": 1}, "this build's timings replace the foreign cache"


def test_no_timing_cache_back_from_tensorrt_leaves_the_plan_and_the_saved_cache(store, model, tmp_path, monkeypatch):
    trt = fake_tensorrt.fake_tensorrt()
    cache = TimingCache(tmp_path / "sm90.cache", 30, 1)
    cache.path.write_bytes(b'{"tactic-0": 1}')
    monkeypatch.setattr(fake_tensorrt.IBuilderConfig, "get_timing_cache", lambda self: None)
    plan = tmp_path / "engine.plan"
    profile = profile_for(model.specs["unet"], SizeRange(64, 64, 128, 2))
    build_engine(trt, None, onnx_artifact(store, "unet").file(ONNX_FILE), [profile], OPTIONS, cache, plan)
    assert plan.read_bytes().startswith(b"FAKEPLAN")
    assert cache.path.read_bytes() == b'{"tactic-0": 1}'


def test_the_plan_is_written_from_tensorrts_memory_without_a_copy(store, model, tmp_path, monkeypatch):
    """IHostMemory has the buffer protocol: a 64 MB plan reaches its file with no 64 MB copy in Python."""
    trt = fake_tensorrt.fake_tensorrt()
    big = bytearray(b"FAKEPLAN" + b"\0" * (64 * 2**20))  # stands in for TensorRT's IHostMemory
    monkeypatch.setattr(fake_tensorrt.Builder, "build_serialized_network", lambda self, network, config: big)
    plan = tmp_path / "engine.plan"
    profile = profile_for(model.specs["unet"], SizeRange(64, 64, 128, 2))
    tracemalloc.start()
    try:
        build_engine(
            trt,
            None,
            onnx_artifact(store, "unet").file(ONNX_FILE),
            [profile],
            OPTIONS,
            TimingCache(tmp_path / "c", 30, 1),
            plan,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert plan.stat().st_size == len(big)
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MB allocated while writing a 64 MB plan"


def test_an_engine_that_differs_from_torch_is_not_published(store, model):
    exporter = Exporter(model, store, torch.device("cpu"), "fp32")
    builder = make_builder(store, [SizeRange(64, 64, 128, 2)])
    with pytest.raises(ArtifactError, match="unet: tensorrt differs from torch: noise_pred at"):
        exporter.engine("unet", onnx_artifact(store, "unet"), builder, StageLog())
    assert store.find(kind="tensorrt") == []


def test_the_lean_runtime_cannot_build(store):
    import tensorrt_lean

    from engine.common.errors import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="full TensorRT"):
        EngineBuilder.create(store, "sm90", [], OPTIONS, 30, 1, trt=tensorrt_lean)
