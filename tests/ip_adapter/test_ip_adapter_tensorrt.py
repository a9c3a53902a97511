"""The IP denoiser through the TensorRT wiring, against the fake bindings (tests/fake_tensorrt.py): the real
export stage builds its engine with the IP matrices marked refittable and a profile over the token axis,
the real loader loads it, and switching adapters refits it from the weight map's base values.

What this cannot show without a GPU: TensorRT's own build of the graph, the refit's speed, and its images;
the same checks on a GPU are ``make verify-gpu``'s.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.backends.assemble import graph_weight_map
from engine.backends.tensorrt.loading import load_tensorrt
from engine.lora.ip_adapters import IpAdapterFiles, adapter_patch
from engine.models.ip_adapter import IP_DENOISER, IP_PARAMETERS, IP_SCALE
from engine.models.model import load_model
from engine.sizes import SizeRange
from engine.spec import Dims
from engine.store.fingerprint import component_fingerprint
from engine.store.keys import onnx_key
from engine.store.profiles import MAX_IP_TOKENS, ShapeRange, profile_for
from engine.store.store import Store
from tests import fake_tensorrt


@pytest.fixture
def engine(cache_dir: Path, sd_adapters: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The IP denoiser's fake engine, loaded, and the adapters of ``sd_adapters`` as the worker reads them."""
    from export import stages
    from export.stagelog import StageLog
    from export.tensorrt import BuildOptions

    model = load_model("tiny", cache_dir)
    files = IpAdapterFiles(sd_adapters, model, 10**9)
    adapters = {name: files.resolve(f"models/{name}", "test") for name in ("plain", "plain-b", "plus")}
    store = Store(tmp_path / "engines")
    monkeypatch.setattr(stages, "compare", fake_tensorrt.passing_compare)
    exporter = stages.Exporter(model, store, torch.device("cpu"), "fp32")
    onnx = exporter.onnx(IP_DENOISER, StageLog())
    options = BuildOptions(2**30, 3, False, "linear")
    builder = stages.EngineBuilder.create(
        store, "sm90", [SizeRange(64, 64, 96, 2)], options, 30, 1, trt=fake_tensorrt.fake_tensorrt()
    )
    exporter.engine(IP_DENOISER, onnx, builder, StageLog())
    spec = model.specs[IP_DENOISER]
    fingerprint = component_fingerprint(model, IP_DENOISER, store.file_digest)
    backend = load_tensorrt(
        store,
        {IP_DENOISER: (spec, fingerprint, "fp32")},
        torch.device("cpu"),
        "sm90",
        False,
        trt=fake_tensorrt.fake_tensorrt(),
    )
    runner = backend.runners[IP_DENOISER]
    runner.weight_map = graph_weight_map(store, spec, fingerprint, "fp32")
    return runner, adapters


def ip_weights(runner) -> dict[str, np.ndarray]:
    """What the engine holds for each IP matrix, by parameter."""
    [loaded] = runner.engines
    held = loaded.engine._weights
    return {
        weight.parameter: held[weight.initializer]["values"].copy()
        for weight in runner.weight_map.weights
        if weight.parameter.startswith(IP_PARAMETERS) and "values" in held[weight.initializer]
    }


def test_the_ip_matrices_are_refittable_and_the_token_axis_is_covered(engine):
    runner, _ = engine
    mapped = [w for w in runner.weight_map.weights if w.parameter.startswith(IP_PARAMETERS)]
    assert len(mapped) == 2 * 4, "to_k_ip and to_v_ip of the tiny UNet's 4 cross-attention layers"
    [loaded] = runner.engines
    assert {w.initializer for w in mapped} <= set(loaded.engine._weights), "marked refittable"
    shapes = runner.spec.input_shapes(Dims(2, 64, 64, ip_tokens=64))  # four image prompts to a Plus adapter
    assert runner.unsupported_reason(shapes) is None
    full_face = runner.spec.input_shapes(Dims(2, 64, 64, ip_tokens=257))
    assert "ip_tokens axis 1 is 257" in runner.unsupported_reason(full_face)


def test_the_scales_are_one_per_layer_and_old_graphs_are_not_reused(engine):
    """``ip_scale`` holds a value per cross-attention layer, in every profile; a graph or engine of the one-number
    scale has another key, so the store never serves it."""
    runner, _ = engine
    [loaded] = runner.engines
    for profile in loaded.profiles:
        assert profile.shapes()[IP_SCALE] == ShapeRange((4,), (4,), (4,)), "the tiny UNet's 4 layers"
    shapes = runner.spec.input_shapes(Dims(1, 64, 64))
    assert runner.unsupported_reason(shapes) is None
    one_number = replace(runner.spec, inputs=(*runner.spec.inputs[:-1], replace(runner.spec.inputs[-1], shape=(1,))))
    assert runner.unsupported_reason({**shapes, IP_SCALE: (1,)}) is not None
    assert onnx_key(one_number, "f", "fp32") != onnx_key(runner.spec, "f", "fp32")


def test_switching_adapters_refits_from_the_base_values(engine):
    runner, adapters = engine
    base = {w.parameter: runner.weight_map.base_value(w) for w in runner.weight_map.weights}
    runner.apply_patch(adapter_patch([adapters["plain"]], None))
    first = ip_weights(runner)
    by_parameter = {w.parameter: w for w in runner.weight_map.weights}
    for name, value in adapters["plain"].weights.items():
        expected = value.float().numpy()
        expected = expected.T if by_parameter[name].transposed else expected
        np.testing.assert_allclose(first[name], expected, rtol=0, atol=1e-6)
    runner.apply_patch(adapter_patch([adapters["plain-b"]], None))
    assert not all(np.array_equal(first[name], value) for name, value in ip_weights(runner).items())
    runner.apply_patch(adapter_patch([adapters["plain"]], None))
    again = ip_weights(runner)
    assert all(np.array_equal(first[name], again[name]) for name in first), "A -> B -> A byte for byte"
    runner.apply_patch(None)
    restored = ip_weights(runner)
    assert len(restored) == 8 and all(np.array_equal(base[name], value) for name, value in restored.items())


def test_the_two_adapter_denoiser_covers_each_slot(cache_dir, sd_adapters):
    """``unet_ip2``'s profile: each slot's token axis from one plain image to four Plus images, each slot's
    scales one per layer."""
    model = load_model("tiny", cache_dir)
    IpAdapterFiles(sd_adapters, model, 10**9).resolve("models/plain", "test")
    spec = model.specs["unet_ip2"]
    assert spec.input_names[-4:] == ["ip_tokens", "ip_tokens_2", "ip_scale", "ip_scale_2"]
    shapes = profile_for(spec, SizeRange(64, 64, 96, 2)).shapes()
    for slot in ("ip_tokens", "ip_tokens_2"):
        assert (shapes[slot].minimum[1], shapes[slot].maximum[1]) == (4, MAX_IP_TOKENS)
    assert shapes["ip_scale_2"] == ShapeRange((4,), (4,), (4,))
