"""The TensorRT runner's bookkeeping, engine loading and fallback, on the CPU.

TensorRT's full libraries and a GPU do not exist here, so engines come from
tests/fake_tensorrt.py (its names are checked against TensorRT 11 in
test_tensorrt_api.py); the runner, the store, the worker and its metrics are real.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.backends.chain import RunnerChain
from engine.backends.tensorrt.loading import load_tensorrt
from engine.backends.tensorrt.runner import TensorRTRunner
from engine.backends.torch import LazyTorchRunner
from engine.serving.worker import Worker
from engine.sizes import SizeRange
from engine.store.fingerprint import component_fingerprint
from engine.store.keys import ENGINE_FILE
from tests import fake_tensorrt

DYNAMIC = SizeRange(64, 64, 96, 2)
STATIC = SizeRange.parse("64x1")


def components(model, store, names):
    return {name: (model.specs[name], component_fingerprint(model, name, store.file_digest), "fp32") for name in names}


def load(store, model, names, version="11.4.0.106"):
    return load_tensorrt(
        store,
        components(model, store, names),
        torch.device("cpu"),
        "sm90",
        False,
        trt=fake_tensorrt.fake_tensorrt(version),
    )


def unet_inputs(model, batch=2, height=8, width=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, height, width, generator=generator),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(batch, 77, 32, generator=generator),
    }


def executions(engine) -> int:
    return sum(slot.context._executions for slot in engine.slots.values())


def test_each_shape_gets_its_own_context_configured_once(store, model, monkeypatch):
    """A, B, A, B: every shape keeps its context, buffers and addresses, so a graph captured on a
    context can never see it reconfigured for another shape."""
    fake_tensorrt.publish_fake_engines(store, model, ["unet"], [DYNAMIC], monkeypatch)
    backend = load(store, model, ["unet"])
    runner = backend.runners["unet"]
    [engine] = runner.engines
    assert backend.scratch is not None and backend.scratch.numel() >= engine.device_memory_size

    a, b = unet_inputs(model, seed=1), unet_inputs(model, batch=1, height=8, width=12, seed=3)
    for inputs in (a, b, a, b):
        assert torch.equal(runner(inputs)["noise_pred"], inputs["sample"] * 2)
    assert len(engine.slots) == 2
    for key, slot in engine.slots.items():
        assert slot.context._strategy.name == "USER_MANAGED"
        assert slot.context._memory == (backend.scratch.data_ptr(), backend.scratch.numel()), "one shared scratch"
        assert tuple(slot.context._shapes[name] for name in engine.spec.input_names) == key
        assert slot.context._executions == 2
    buffers = {key: slot.outputs["noise_pred"].data_ptr() for key, slot in engine.slots.items()}
    again = unet_inputs(model, seed=2)
    assert torch.equal(runner(again)["noise_pred"], again["sample"] * 2)
    assert {key: slot.outputs["noise_pred"].data_ptr() for key, slot in engine.slots.items()} == buffers

    returned = runner(a)["noise_pred"]
    runner(again)
    assert torch.equal(returned, a["sample"] * 2), "outputs are the caller's, not reused buffers"


def test_shapes_past_the_cap_drop_the_least_recently_used_context(store, model, monkeypatch):
    fake_tensorrt.publish_fake_engines(store, model, ["unet"], [DYNAMIC], monkeypatch)
    runner = load(store, model, ["unet"]).runners["unet"]
    [engine] = runner.engines
    engine.max_shapes = 2
    shapes = [(2, 8, 8), (1, 8, 12), (2, 8, 8), (1, 12, 8)]
    for batch, height, width in shapes:
        inputs = unet_inputs(model, batch=batch, height=height, width=width)
        assert torch.equal(runner(inputs)["noise_pred"], inputs["sample"] * 2)
    assert [key[0] for key in engine.slots] == [(2, 4, 8, 8), (1, 4, 12, 8)], "(1, 4, 8, 12) was the oldest"


def test_each_call_runs_the_covering_profile_tuned_closest_in_one_engine(store, model, monkeypatch):
    fake_tensorrt.publish_fake_engines(store, model, ["unet"], [DYNAMIC, STATIC], monkeypatch)
    backend = load(store, model, ["unet"])
    runner = backend.runners["unet"]
    [engine] = runner.engines
    assert [profile.label for profile in engine.profiles] == ["64-96@64x2+77tok", "64x1+77tok"]
    runner(unet_inputs(model, batch=2))
    runner(unet_inputs(model, batch=4))
    profiles = {key[0][0]: slot.context._profile for key, slot in engine.slots.items()}
    assert profiles == {2: 1, 4: 0}, "batch 2 at 64 px runs the static profile, batch 4 the dynamic one"
    assert backend.memory_bytes == engine.plan_bytes + backend.scratch.numel()
    reason = runner.unsupported_reason(
        {"sample": (2, 4, 16, 16), "timestep": (1,), "encoder_hidden_states": (2, 77, 32)}
    )
    assert "64-96@64x2+77tok: sample axis 2 is 16, the engine covers 8..12" in reason
    long_prompt = {"sample": (2, 4, 8, 8), "timestep": (1,), "encoder_hidden_states": (2, 154, 32)}
    assert "encoder_hidden_states axis 1 is 154, the engine covers 77..77" in runner.unsupported_reason(long_prompt)


def test_engines_that_cannot_be_used_are_skipped_with_a_reason(store, model, monkeypatch):
    published = fake_tensorrt.publish_fake_engines(store, model, ["unet", "vae_decoder"], [DYNAMIC], monkeypatch)
    unet = published["unet"]
    data = bytearray(unet.file(ENGINE_FILE).read_bytes())
    data[-2] ^= 0xFF
    unet.file(ENGINE_FILE).write_bytes(bytes(data))
    backend = load(store, model, ["unet", "vae_decoder", "text_encoder"])
    assert set(backend.runners) == {"vae_decoder"}
    assert "does not match its manifest" in backend.unavailable["unet"]
    assert "no engine for sm90 and TensorRT 11.4.0.106" in backend.unavailable["text_encoder"]


def test_engines_of_another_tensorrt_version_are_not_loaded(store, model, monkeypatch):
    fake_tensorrt.publish_fake_engines(store, model, ["unet"], [DYNAMIC], monkeypatch, version="10.16.1.11")
    backend = load(store, model, ["unet"])
    assert backend.runners == {}
    assert "no engine for sm90 and TensorRT 11.4.0.106" in backend.unavailable["unet"]
    assert backend.unusable.startswith(
        "the store has engines for sm90 (unet: TensorRT 10.16.1.11) but none loads with TensorRT 11.4.0.106"
    )


def test_engines_that_exist_but_do_not_load_fail_a_fitness_check(store, model, monkeypatch):
    from engine.serving.startup import Startup

    fake_tensorrt.publish_fake_engines(store, model, ["unet"], [DYNAMIC], monkeypatch)
    assert load(store, model, ["unet"]).unusable is None, "one engine loads: nothing to report"
    monkeypatch.setattr(fake_tensorrt.Runtime, "deserialize_cuda_engine", lambda self, serialized_engine: None)
    backend = load(store, model, ["unet", "vae_decoder"])
    assert "could not deserialize" in backend.unusable
    worker = SimpleNamespace(tensorrt=backend)  # the started worker's only part this check reads
    checks = {check.__name__: check for check in Startup(None, worker, None).fitness_checks()}
    with pytest.raises(RuntimeError, match=r"none loads with TensorRT 11\.4\.0\.106"):
        checks["engines_load"]()


def test_a_plan_tensorrt_cannot_deserialize_is_skipped(store, model, monkeypatch):
    unet = fake_tensorrt.publish_fake_engines(store, model, ["unet"], [DYNAMIC], monkeypatch)["unet"]
    monkeypatch.setattr(fake_tensorrt.Runtime, "deserialize_cuda_engine", lambda self, serialized_engine: None)
    backend = load(store, model, ["unet"])
    assert "could not deserialize" in backend.unavailable["unet"]
    assert unet.path.name in backend.unavailable["unet"]


def test_the_worker_falls_back_per_request_and_says_why(store, model, monkeypatch, make_settings):
    fake_tensorrt.publish_fake_engines(store, model, ["unet"], [STATIC], monkeypatch)
    worker = Worker(make_settings(backend="torch", engine_dir=store.root))
    engines = load(store, model, ["unet"]).runners["unet"]
    torch_unet = worker.chains["unet"].runners[-1]
    assert isinstance(engines, TensorRTRunner) and isinstance(torch_unet, LazyTorchRunner)
    worker.chains["unet"] = RunnerChain("unet", [engines, torch_unet])

    covered = worker.handle({"id": "a", "input": {"prompt": "a fox", "num_inference_steps": 2, "seed": 1}})
    assert covered["status"] == "success"
    assert covered["metrics"]["backends"]["unet"] == "tensorrt"
    assert "unet" not in covered["metrics"]["fallbacks"]

    missed = worker.handle({"id": "b", "input": {"prompt": "a fox", "width": 96, "num_inference_steps": 2}})
    assert missed["status"] == "success"
    assert missed["metrics"]["backends"]["unet"] == "torch"
    assert (
        "tensorrt: profile 64x1+77tok: sample axis 3 is 12, the engine covers 8..8"
        in missed["metrics"]["fallbacks"]["unet"]
    )

    long_prompt = {"prompt": "a fox " * 20, "num_inference_steps": 2, "seed": 1}  # 120 tokens: two chunks
    longer = worker.handle({"id": "c", "input": long_prompt})
    assert longer["status"] == "success"
    assert longer["metrics"]["prompt_chunks"] == 2
    assert longer["metrics"]["backends"]["unet"] == "torch"
    assert "encoder_hidden_states axis 1 is 154, the engine covers 77..77" in longer["metrics"]["fallbacks"]["unet"]


def test_without_a_gpu_tensorrt_is_unavailable_and_every_request_is_still_served(exported, make_settings):
    worker = Worker(make_settings(backend="tensorrt", engine_dir=exported))
    response = worker.handle({"id": "c", "input": {"prompt": "a fox", "num_inference_steps": 2}})
    assert response["status"] == "success"
    assert response["metrics"]["backends"] == dict.fromkeys(("text_encoder", "unet", "vae_decoder"), "onnxruntime")
    assert response["metrics"]["fallbacks"]["unet"] == "tensorrt: TensorRT needs a CUDA device"
