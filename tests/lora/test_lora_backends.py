"""The weight map and the refit path, component by component.

onnxruntime proves the map at fp16 and bf16 too: the half graph with its LoRA-patched
initializers must agree with the LoRA-patched torch module within the export's tolerance
for that precision (fp16 serving needs a GPU, so this is checked on the component, not the
image; bf16 runs as its twin on the CPU). TensorRT's
refit runs against tests/fake_tensorrt.py, which records the weights each refit sets:
they must be base + delta exactly where torch's patched parameters are, and the base
values exactly after the LoRAs are gone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.backends.assemble import graph_weight_map
from engine.backends.chain import RunnerChain
from engine.backends.onnxruntime import load_onnxruntime_runner
from engine.backends.tensorrt.loading import load_tensorrt
from engine.backends.torch import TorchRunner
from engine.lora.files import LoraFiles
from engine.lora.library import LoraLibrary
from engine.models.model import load_model
from engine.request.entries import LoraEntry
from engine.sizes import SizeRange
from engine.spec import Dims
from engine.store.fingerprint import component_fingerprint
from engine.store.store import Store
from export.tensorrt import refit_names
from export.validate import compare, reference_outputs
from tests import fake_tensorrt
from tests.conftest import run_export

DIMS = [Dims(2, 64, 64), Dims(1, 64, 96)]


@pytest.fixture(scope="module", params=["fp16", "bf16"])
def half_store(request, cache_dir, tmp_path_factory) -> tuple[Store, str]:
    engine_dir = tmp_path_factory.mktemp(request.param)
    done = run_export(engine_dir, cache_dir, "--precision", request.param, "--components", "unet", "text_encoder")
    assert done.returncode == 0, done.stderr[-3000:]
    return Store(engine_dir), request.param


def patches(cache_dir, folder: Path, entries: list[tuple[str, float]]):
    model = load_model("tiny", cache_dir)
    library = LoraLibrary(LoraFiles(folder, 10**9), model)
    return library.select([LoraEntry(name=name, scale=scale) for name, scale in entries]).patches


def torch_runner(model, component: str) -> TorchRunner:
    module = model.family.torch_module(component, model.folder, torch.float32)
    return TorchRunner(model.specs[component], module, "fp32", torch.device("cpu"))


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_onnxruntime_half_graph_with_patched_initializers_matches_patched_torch(
    cache_dir, sd_loras, half_store, component
):
    store, precision = half_store
    model = load_model("tiny", cache_dir)
    spec = model.specs[component]
    patch = patches(cache_dir, sd_loras, [("a", 1.0), ("styles/b", -0.8)])[component]
    reference = torch_runner(model, component)
    base_references = reference_outputs(spec, reference, DIMS)
    reference.apply_patch(patch)
    patched_references = reference_outputs(spec, reference, DIMS)

    fingerprint = component_fingerprint(model, component, store.file_digest)
    candidate = load_onnxruntime_runner(store, spec, fingerprint, precision, torch.device("cpu"))
    candidate.apply_patch(patch)
    results = compare(spec, patched_references, candidate, precision)
    for result in results:
        assert result.passed, f"{result.output} at {result.shape}: {result.max_abs_error:.3g} > {result.allowed:.3g}"
    moved = [
        (patched.outputs[name] - base.outputs[name]).abs().max().item()
        for patched, base in zip(patched_references, base_references, strict=True)
        for name in spec.output_names
    ]
    worst = max(result.max_abs_error for result in results)
    margin = {"fp16": 10, "bf16": 3}[precision]  # bf16 rounds 8 times as coarsely as fp16
    assert min(moved) > margin * worst, f"the LoRA must move the outputs {margin} times more than {precision} does"


def fake_unet(store, model, monkeypatch, refit: str = "linear"):
    """A fake UNet engine built by the real export stage, loaded by the real loader, with its weight map."""
    from export import stages
    from export.stagelog import StageLog
    from export.tensorrt import BuildOptions

    monkeypatch.setattr(stages, "compare", fake_tensorrt.passing_compare)
    exporter = stages.Exporter(model, store, torch.device("cpu"), "fp32")
    builder = stages.EngineBuilder.create(
        store,
        "sm90",
        [SizeRange(64, 64, 96, 2)],
        BuildOptions(2**30, 3, False, refit),
        30,
        1,
        trt=fake_tensorrt.fake_tensorrt(),
    )
    [onnx] = store.find(kind="onnx", component="unet")
    exporter.engine("unet", onnx, builder, StageLog())
    fingerprint = component_fingerprint(model, "unet", store.file_digest)
    backend = load_tensorrt(
        store,
        {"unet": (model.specs["unet"], fingerprint, "fp32")},
        torch.device("cpu"),
        "sm90",
        False,
        trt=fake_tensorrt.fake_tensorrt(),
    )
    runner = backend.runners["unet"]
    runner.weight_map = graph_weight_map(store, model.specs["unet"], fingerprint, "fp32")
    return runner


def refitted(runner) -> dict[str, np.ndarray]:
    [engine] = runner.engines
    return {name: weight["values"].copy() for name, weight in engine.engine._weights.items() if "values" in weight}


def test_build_marks_only_the_weights_loras_change(store, model, monkeypatch):
    runner = fake_unet(store, model, monkeypatch)
    [engine] = runner.engines
    marked = set(engine.engine._weights)
    mapped = runner.weight_map.weights
    assert marked == {w.initializer for w in mapped if len(w.shape) == 2}
    assert marked and all(len(w.shape) == 2 for w in mapped if w.initializer in marked)
    assert set(refit_names(runner.weight_map, "all")) == {w.initializer for w in mapped}
    assert refit_names(runner.weight_map, "none") == []


def test_refits_set_base_plus_delta_and_restore_the_base_exactly(store, model, cache_dir, sd_loras, monkeypatch):
    runner = fake_unet(store, model, monkeypatch)
    by_initializer = {w.initializer: w for w in runner.weight_map.weights}
    a = patches(cache_dir, sd_loras, [("a", 0.8), ("styles/b", 0.6)])["unet"]
    b = patches(cache_dir, sd_loras, [("c", -1.5)])["unet"]
    reference = torch_runner(model, "unet")
    reference.apply_patch(a)
    parameters = dict(reference.module.named_parameters())

    runner.apply_patch(a)
    first_a = refitted(runner)
    assert {by_initializer[name].parameter for name in first_a} == set(a.names)
    for name, values in first_a.items():
        weight = by_initializer[name]
        expected = parameters[weight.parameter].detach().numpy()
        assert np.array_equal(values, expected.T if weight.transposed else expected), name

    runner.apply_patch(b)
    runner.apply_patch(a)
    second_a = refitted(runner)
    assert all(np.array_equal(first_a[name], second_a[name]) for name in first_a), "A -> B -> A is A, byte for byte"

    runner.apply_patch(None)
    for name, values in refitted(runner).items():
        assert np.array_equal(values, runner.weight_map.base_value(by_initializer[name])), f"{name} is not its base"


def test_an_engine_built_without_refit_hands_lora_requests_to_the_next_backend(
    store, model, cache_dir, sd_loras, monkeypatch
):
    runner = fake_unet(store, model, monkeypatch, refit="none")
    torch_fallback = torch_runner(model, "unet")
    chain = RunnerChain("unet", [runner, torch_fallback])
    patch = patches(cache_dir, sd_loras, [("a", 1.0)])["unet"]
    inputs = model.specs["unet"].sample_inputs(Dims(2, 64, 64), "fp32", seed=0)
    reasons: list[str] = []
    _, ran = chain.run(inputs, reasons.append, patch)
    assert ran is torch_fallback
    assert any("tensorrt: cannot apply the LoRAs:" in reason and "built without refit" in reason for reason in reasons)
    _, ran = chain.run(inputs, reasons.append)
    assert ran is runner, "without LoRAs the engine serves again"


def test_an_unreadable_weight_map_is_a_value_error_naming_the_file(tmp_path):
    from engine.store.weightmap import WEIGHT_MAP_FILE, WeightMap

    (tmp_path / WEIGHT_MAP_FILE).write_text('{"format": 1, "data_file": "model.onnx.data", "weights": []}')
    with pytest.raises(ValueError, match=f"{WEIGHT_MAP_FILE} is unreadable: 'unpatchable'"):
        WeightMap.read(tmp_path)
    (tmp_path / WEIGHT_MAP_FILE).write_text('{"format": 0}')
    with pytest.raises(ValueError, match="format 0, this worker reads 1"):
        WeightMap.read(tmp_path)


@pytest.mark.parametrize(
    ("patterns", "module"),
    [
        ({"^down_blocks.0.attentions.0.proj_in": 8, "to_q": 2}, "down_blocks.0.attentions.0.proj_in"),
        ({"^down_blocks.0.attentions.0.proj_in": 8}, "up_blocks.0.down_blocks.0.attentions.0.proj_in"),
        ({"attn1.to_q": 4, "to_q": 2}, "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"),
        ({"self_attn": 4}, "encoder.layers.0.self_attn.q_proj"),
        ({}, "encoder.layers.0.self_attn.q_proj"),
    ],
)
def test_pattern_lookup_follows_peft(patterns, module):
    from peft.utils.other import get_pattern_key

    from engine.lora.factors import pattern_key

    assert pattern_key(patterns, module) == get_pattern_key(patterns.keys(), module)
