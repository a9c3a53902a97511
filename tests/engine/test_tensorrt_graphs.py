"""CUDA graphs, streams and the shared scratch of the TensorRT runner, on the CPU.

Engines come from tests/fake_tensorrt.py; streams and graphs from tests/fake_cuda.py, whose
graphs run again, on replay, the TensorRT launches captured on their stream.
"""

from __future__ import annotations

import logging

import pytest
import torch

from engine.backends.tensorrt.loading import load_tensorrt
from engine.common.errors import BackendUnavailable
from engine.sizes import SizeRange
from engine.store.fingerprint import component_fingerprint
from tests import fake_cuda, fake_tensorrt

DYNAMIC = SizeRange(64, 64, 96, 2)
STATIC = SizeRange.parse("64x1")
LARGER = SizeRange.parse("96x1")


def load(store, model, names, cuda):
    """Engines loaded with CUDA graphs on, given the fake CUDA's stream (the loader makes none on the CPU)."""
    backend = load_tensorrt(
        store,
        {n: (model.specs[n], component_fingerprint(model, n, store.file_digest), "fp32") for n in names},
        torch.device("cpu"),
        "sm90",
        True,
        trt=fake_tensorrt.fake_tensorrt(),
    )
    stream = cuda.new_stream()
    for runner in backend.runners.values():
        runner.stream = stream
    return backend


def inputs_at(engine, key, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(shape, generator=generator) for name, shape in zip(engine.spec.input_names, key, strict=True)
    }


def graphs(engine):
    return {key: slot.graph for key, slot in engine.slots.items() if slot.graph is not None}


def test_the_warm_up_captures_each_optimum_and_requests_replay_it(store, model, monkeypatch):
    fake_tensorrt.publish_fake_engines(store, model, ["unet"], [DYNAMIC, STATIC, LARGER], monkeypatch)
    cuda = fake_cuda.install(monkeypatch)
    backend = load(store, model, ["unet"], cuda)
    runner = backend.runners["unet"]
    [engine] = runner.engines
    assert backend.capture_graphs() == 2, "two optima: 64 px for the first two profiles, 96 px"
    assert set(graphs(engine)) == engine.graph_keys and len(engine.graph_keys) == 2
    for key, graph in graphs(engine).items():
        inputs = inputs_at(engine, key, seed=3)
        assert torch.equal(runner(inputs)["noise_pred"], inputs["sample"] * 2), "the replay computed this input"
        assert graph.replays == 1
    assert {handle for what, handle, _ in cuda.log if what in ("read", "capture")} == {runner.stream.cuda_stream}


def test_an_evicted_optimum_is_captured_again_when_next_used(store, model, monkeypatch):
    fake_tensorrt.publish_fake_engines(store, model, ["unet"], [DYNAMIC, LARGER], monkeypatch)
    cuda = fake_cuda.install(monkeypatch)
    runner = load(store, model, ["unet"], cuda).runners["unet"]
    [engine] = runner.engines
    engine.max_shapes = 2
    runner.capture_graphs()
    first, second = list(engine.slots)
    other = inputs_at(engine, ((2, 4, 8, 12), *first[1:]))
    runner(other)
    assert first not in engine.slots and second in engine.slots, "with every context holding a graph, the oldest"
    runner(other)
    runner(inputs_at(engine, second))
    assert len(engine.slots) == 2
    inputs = inputs_at(engine, first, seed=5)
    assert torch.equal(runner(inputs)["noise_pred"], inputs["sample"] * 2)
    assert first in graphs(engine), "captured again"
    assert graphs(engine)[first].replays == 1


class Fails:
    """Ways the steps around a capture fail on a GPU, each as the bindings or torch report it."""

    @staticmethod
    def context(monkeypatch):
        def out_of_memory(self, strategy):
            raise torch.OutOfMemoryError("CUDA out of memory")

        monkeypatch.setattr(fake_tensorrt.ICudaEngine, "create_execution_context", out_of_memory)

    @staticmethod
    def profile(monkeypatch):
        def refused(self, profile_index, stream_handle):
            raise RuntimeError("Error in set optimization profile async.")

        monkeypatch.setattr(fake_tensorrt.IExecutionContext, "set_optimization_profile_async", refused)

    @staticmethod
    def first_run(monkeypatch):
        monkeypatch.setattr(fake_tensorrt.IExecutionContext, "execute_async_v3", lambda self, stream_handle: False)

    @staticmethod
    def capture(monkeypatch):
        def broken(graph, stream=None, **_):
            raise RuntimeError("operation not permitted when stream is capturing")

        monkeypatch.setattr(torch.cuda, "graph", broken)


@pytest.mark.parametrize("failure", ["context", "profile", "first_run", "capture"])
def test_a_failure_around_a_warm_up_capture_discards_it_and_the_worker_goes_on(
    store, model, monkeypatch, caplog, failure
):
    fake_tensorrt.publish_fake_engines(store, model, ["unet"], [STATIC], monkeypatch)
    cuda = fake_cuda.install(monkeypatch)
    backend = load(store, model, ["unet"], cuda)
    [engine] = backend.runners["unet"].engines
    with monkeypatch.context() as failing:
        getattr(Fails, failure)(failing)
        with caplog.at_level(logging.WARNING):
            assert backend.capture_graphs() == 0
    assert "no CUDA graph at" in caplog.text
    assert engine.slots == {} and engine.graph_keys == set(), "the capture and its context are gone"
    [key] = [tuple(p.shapes()[n].optimum for n in engine.spec.input_names) for p in engine.profiles]
    inputs = inputs_at(engine, key)
    assert torch.equal(backend.runners["unet"](inputs)["noise_pred"], inputs["sample"] * 2), "it runs plainly"
    assert graphs(engine) == {}


def test_tensorrt_refusing_a_profile_or_an_address_is_backend_unavailable(store, model, monkeypatch):
    fake_tensorrt.publish_fake_engines(store, model, ["unet"], [STATIC], monkeypatch)
    cuda = fake_cuda.install(monkeypatch)
    runner = load(store, model, ["unet"], cuda).runners["unet"]
    [engine] = runner.engines
    [key] = [tuple(p.shapes()[n].optimum for n in engine.spec.input_names) for p in engine.profiles]
    with monkeypatch.context() as failing:
        Fails.profile(failing)
        with pytest.raises(BackendUnavailable, match="refused optimization profile 0: Error in set optimization"):
            runner(inputs_at(engine, key))
    monkeypatch.setattr(fake_tensorrt.IExecutionContext, "set_tensor_address", lambda self, name, memory: False)
    with pytest.raises(BackendUnavailable, match="refused the address of sample"):
        runner(inputs_at(engine, key))


def test_engines_loaded_later_share_the_stream_and_scratch_and_get_their_graphs(store, model, monkeypatch):
    fake_tensorrt.publish_fake_engines(store, model, ["unet", "vae_decoder"], [STATIC], monkeypatch)
    cuda = fake_cuda.install(monkeypatch)
    backend = load(store, model, ["unet"], cuda)
    backend.capture_graphs()
    later = load(store, model, ["vae_decoder"], cuda)
    memory = backend.memory_bytes
    backend.adopt(later)
    vae = backend.runners["vae_decoder"]
    [engine] = vae.engines
    assert vae.stream is backend.runners["unet"].stream
    assert engine.scratch is backend.scratch and engine.device_memory_size <= backend.scratch.numel()
    assert backend.memory_bytes == memory + engine.plan_bytes, "the scratch is counted once"
    assert len(graphs(engine)) == 1, "captured when adopted, as the warm-up captured the others"
    assert backend.graph_counts()["vae_decoder"] == (1, 0), "and counted with the others"
    for slot in engine.slots.values():
        assert slot.context._memory == (backend.scratch.data_ptr(), backend.scratch.numel())


def test_the_engines_count_the_graphs_they_keep_and_replay(store, model, monkeypatch):
    """Nothing before the warm-up; a kept capture once, however often the warm-up asks for it; a capture whose
    enqueue fails while capturing not at all; replays only at the captured shapes; and an evicted optimum's
    new capture when it is next used."""
    fake_tensorrt.publish_fake_engines(store, model, ["unet", "vae_decoder"], [DYNAMIC, LARGER], monkeypatch)
    cuda = fake_cuda.install(monkeypatch)
    backend = load(store, model, ["unet", "vae_decoder"], cuda)
    unet, vae = backend.runners["unet"], backend.runners["vae_decoder"]
    [engine] = unet.engines
    first, second = [tuple(p.shapes()[n].optimum for n in engine.spec.input_names) for p in engine.profiles]
    other = ((1, *first[0][1:]), *first[1:])
    unet(inputs_at(engine, first))
    assert backend.graph_counts() == {"unet": (0, 0), "vae_decoder": (0, 0)}, "no graph before the warm-up"

    execute = fake_tensorrt.IExecutionContext.execute_async_v3

    def fails_while_capturing(self, stream_handle):
        return execute(self, stream_handle) and cuda.capturing is None

    with monkeypatch.context() as failing:
        failing.setattr(fake_tensorrt.IExecutionContext, "execute_async_v3", fails_while_capturing)
        assert vae.capture_graphs() == 0
    assert backend.graph_counts()["vae_decoder"] == (0, 0), "a discarded capture is not counted"
    assert unet.capture_graphs() == 2 and unet.capture_graphs() == 2
    assert backend.graph_counts()["unet"] == (2, 0), "each kept capture once"

    engine.max_shapes = 2
    for key, counts in [(first, (2, 1)), (other, (2, 1)), (first, (2, 2))]:
        unet(inputs_at(engine, key))
        assert backend.graph_counts()["unet"] == counts, "the optimum replays, the other shape enqueues"
    assert second not in engine.slots, "with every context holding a graph, the oldest made way"
    unet(inputs_at(engine, second))
    assert backend.graph_counts() == {"unet": (3, 3), "vae_decoder": (0, 0)}, "captured again, then replayed"
