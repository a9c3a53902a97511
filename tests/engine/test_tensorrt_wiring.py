"""The worker's own TensorRT wiring, end to end on the CPU: which engine it loads for its settings,
the settings each engine gets, the backends' order, one stream and scratch for all engines,
and a warm-up that captures graphs and survives a failing capture.

Only what needs a GPU is replaced: TensorRT by tests/fake_tensorrt.py, CUDA streams and
graphs by tests/fake_cuda.py, and the GPU check and compute capability.
"""

from __future__ import annotations

import functools
import logging

import torch

from engine.backends import assemble
from engine.backends.tensorrt.loading import load_tensorrt
from engine.serving.worker import Worker
from engine.sizes import SizeRange, parse_ranges
from engine.store.profiles import component_profiles, profiles_label
from tests import fake_cuda, fake_tensorrt

CONFIGURED = "64x1"
OTHER = SizeRange(64, 64, 96, 2)


def test_the_worker_loads_its_configured_engines_on_one_stream_and_scratch(
    store, model, monkeypatch, make_settings, caplog
):
    fake_tensorrt.publish_fake_engines(
        store, model, ["unet", "vae_decoder"], [SizeRange.parse(CONFIGURED)], monkeypatch
    )
    fake_tensorrt.publish_fake_engines(store, model, ["unet"], [OTHER], monkeypatch)
    cuda = fake_cuda.install(monkeypatch)
    monkeypatch.setattr(assemble, "tensorrt_runs_on", lambda device: True)
    monkeypatch.setattr(assemble, "gpu_tag", lambda device: "sm90")
    monkeypatch.setattr(assemble, "load_tensorrt", functools.partial(load_tensorrt, trt=fake_tensorrt.fake_tensorrt()))
    settings = make_settings(
        backend="tensorrt", engine_dir=store.root, engine_profiles=CONFIGURED, max_prompt_chunks=1, cuda_graph_shapes=3
    )
    worker = Worker(settings)
    backend = worker.tensorrt

    assert set(backend.runners) == {"unet", "vae_decoder"}
    assert backend.unavailable.get("text_encoder") is not None
    ranges = parse_ranges(CONFIGURED, model.config.native_size, settings.max_images)
    for component, runner in backend.runners.items():
        [engine] = runner.engines  # the configured engine only, though the store has another UNet
        label = profiles_label(component_profiles(model.specs[component], ranges, 1))
        assert [profile.label for profile in engine.profiles] == [label]
        assert engine.max_shapes == 3 and engine.use_cuda_graphs
        assert engine.scratch is backend.scratch
        assert [r.backend for r in worker.chains[component].runners] == ["tensorrt", "onnxruntime", "torch"]
    assert [r.backend for r in worker.chains["text_encoder"].runners] == ["onnxruntime", "torch"]

    stream = cuda.new_stream()  # the loader makes a stream only on a CUDA device
    for runner in backend.runners.values():
        runner.stream = stream
    with monkeypatch.context() as failing, caplog.at_level(logging.WARNING):
        captures = iter([cuda.graph])  # the UNet's capture works, the VAE's (the next) fails

        def graph(graph, stream=None, **options):
            capture = next(captures, None)
            if capture is None:
                raise RuntimeError("operation failed due to a previous error during capture")
            return capture(graph, stream, **options)

        failing.setattr(torch.cuda, "graph", graph)
        worker.warmup()
    assert "vae_decoder" in caplog.text and "no CUDA graph at" in caplog.text
    unet, vae = backend.runners["unet"].engines[0], backend.runners["vae_decoder"].engines[0]
    assert [slot.graph is not None for slot in unet.slots.values()] == [True] and vae.graph_keys == set()

    response = worker.handle({"id": "a", "input": {"prompt": "a fox", "num_inference_steps": 2, "seed": 1}})
    assert response["status"] == "success", response
    assert response["metrics"]["backends"]["unet"] == "tensorrt"
    assert response["metrics"]["backends"]["vae_decoder"] == "tensorrt"
    [graph] = [slot.graph for slot in unet.slots.values() if slot.graph is not None]
    assert graph.replays >= 2, "each UNet step at the optimum replays the warm-up's graph"
    assert response["metrics"]["cuda_graph_replays"] == {"unet": graph.replays, "vae_decoder": 0}
    euler = {"prompt": "a fox", "num_inference_steps": 3, "seed": 1, "scheduler": "euler"}  # one call a step
    again = worker.handle({"id": "b", "input": euler})
    assert again["metrics"]["cuda_graph_replays"] == {"unet": 3, "vae_decoder": 0}, "this job's replays only"
    assert {h for what, h, _ in cuda.log if what in ("read", "capture")} == {stream.cuda_stream}
    for engine in (unet, vae):
        for slot in engine.slots.values():
            assert slot.context._memory == (backend.scratch.data_ptr(), backend.scratch.numel())
