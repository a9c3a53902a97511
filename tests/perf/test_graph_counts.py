"""The CUDA graph counters the GPU tests and verify-gpu read, on fake engines on the CPU: a replay is
counted for the engine whose graph it was, a plain enqueue is not, and a discarded capture is not kept."""

from __future__ import annotations

import torch

from engine.backends.tensorrt.engine import LoadedEngine
from perf.graph_counts import count_graphs
from tests import fake_tensorrt
from tests.engine.test_tensorrt_backend import DYNAMIC, load, unet_inputs


class StandInGraph(torch.cuda.CUDAGraph):
    """A CUDAGraph that the CPU build lets exist; its capture_end and replay are torch's, patched to no-ops."""

    def __new__(cls):
        return object.__new__(cls)

    def __init__(self) -> None:
        pass


def test_replays_and_kept_captures_are_counted_per_component(store, model, monkeypatch):
    fake_tensorrt.publish_fake_engines(store, model, ["unet"], [DYNAMIC], monkeypatch)
    runner = load(store, model, ["unet"]).runners["unet"]
    [engine] = runner.engines
    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_end", lambda graph: None)
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: None)
    captured, other = unet_inputs(model, seed=1), unet_inputs(model, batch=1, height=8, width=12, seed=2)

    def capture_optima(self: LoadedEngine, stream: object) -> int:
        """As the engine captures: one graph kept on the context for ``captured``'s shapes, one discarded."""
        key = tuple(tuple(captured[name].shape) for name in self.spec.input_names)
        kept, discarded = StandInGraph(), StandInGraph()
        kept.capture_end()
        discarded.capture_end()
        self._slot(key, None).graph = kept
        return 1

    monkeypatch.setattr(LoadedEngine, "capture_optima", capture_optima)
    with count_graphs() as counts:
        runner(captured)
        assert (counts.graph_captures("unet"), counts.graph_replays("unet")) == (0, 0)
        engine.capture_optima(None)
        assert counts.graph_captures("unet") == 1, "the discarded capture is not counted"
        executions = sum(slot.context._executions for slot in engine.slots.values())
        for inputs in (captured, other, captured):
            runner(inputs)
        assert counts.graph_replays("unet") == 2, "the captured shapes replay, the other enqueues"
        assert sum(slot.context._executions for slot in engine.slots.values()) == executions + 1
        assert counts.graph_replays("vae_decoder") == 0
    engine.slots.clear()
    assert counts.graph_captures("unet") == 1, "a graph that replayed stays counted after its context goes"
    assert LoadedEngine.execute.__name__ == "execute" and not hasattr(LoadedEngine.execute, "__wrapped__")
