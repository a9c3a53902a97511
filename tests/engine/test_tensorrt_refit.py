"""TensorRT refits against the fake bindings: the stream the values are made on, the weights TensorRT
reports missing, and the state a failed refit leaves.

The fake (tests/fake_tensorrt.py) fuses same-shaped neighbouring weights in pairs, reads the
weights when the refit runs, and can fail a refit after refitting some weights, as the
bindings may; tests/fake_cuda.py checks that each read is ordered after its write.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.backends.chain import RunnerChain
from engine.lora.factors import LowRank
from engine.lora.library import WeightPatch
from engine.spec import Dims
from engine.store.weightmap import WeightMap
from tests import fake_cuda, fake_tensorrt
from tests.lora.test_lora_backends import fake_unet, torch_runner


def patch_of(runner, initializers: list[str], key: str) -> WeightPatch:
    """A LoRA patch changing the parameters behind these initializers."""
    terms = {}
    for index, initializer in enumerate(initializers):
        weight = runner.weight_map.by_initializer[initializer]
        rows, columns = weight.shape[::-1] if weight.transposed else weight.shape
        generator = torch.Generator().manual_seed(index)
        low_rank = LowRank(torch.randn(2, columns, generator=generator), torch.randn(rows, 2, generator=generator), 0.5)
        terms[weight.parameter] = ((1.0, low_rank),)
    return WeightPatch(key, terms)


def fused_pairs(runner) -> list[tuple[str, str]]:
    [engine] = runner.engines
    pairs = [(a, b) for a, b in engine.engine._partners.items() if a < b]
    by_initializer = runner.weight_map.by_initializer
    pairs = [(a, b) for a, b in pairs if by_initializer[a].parameter != by_initializer[b].parameter]
    assert len(pairs) >= 3, "the fake fuses some of the tiny UNet's weights in pairs"
    return pairs


def held(runner) -> dict[str, np.ndarray]:
    [engine] = runner.engines
    return {name: weight["values"] for name, weight in engine.engine._weights.items() if "values" in weight}


def at_base(runner) -> bool:
    by_initializer = runner.weight_map.by_initializer
    return all(np.array_equal(v, runner.weight_map.base_value(by_initializer[n])) for n, v in held(runner).items())


def test_weights_fused_with_a_changed_one_are_supplied_at_their_base(store, model, monkeypatch):
    runner = fake_unet(store, model, monkeypatch)
    changed, partner = fused_pairs(runner)[0]
    runner.apply_patch(patch_of(runner, [changed], "a"))
    values = held(runner)
    by_initializer = runner.weight_map.by_initializer
    assert not np.array_equal(values[changed], runner.weight_map.base_value(by_initializer[changed]))
    assert np.array_equal(values[partner], runner.weight_map.base_value(by_initializer[partner])), "its partner"
    runner.apply_patch(None)
    assert at_base(runner)


def test_refit_values_are_made_on_the_refit_stream(store, model, monkeypatch):
    runner = fake_unet(store, model, monkeypatch)
    cuda = fake_cuda.install(monkeypatch)
    runner.stream = cuda.new_stream()
    made = WeightMap.patched_value

    def tracked(self, weight, delta, device):
        value = made(self, weight, delta, device)
        cuda.write(value.data_ptr(), weight.initializer)  # on whichever stream is current
        return value

    monkeypatch.setattr(WeightMap, "patched_value", tracked)
    (a, _), (b, _) = fused_pairs(runner)[:2]
    runner.apply_patch(patch_of(runner, [a], "a"))
    runner.apply_patch(patch_of(runner, [b], "b"))
    runner.apply_patch(None)
    reads = [entry for entry in cuda.log if entry[0] == "read"]
    assert {handle for _, handle, _ in reads} == {runner.stream.cuda_stream}, "every refit runs on the worker's stream"
    assert len(reads) >= 6
    assert cuda.unordered == []
    assert ("synchronize", runner.stream.cuda_stream, None) == cuda.log[-1], "the values outlive the refit"


def chain_and_inputs(runner, model):
    chain = RunnerChain("unet", [runner, torch_runner(model, "unet")])
    return chain, model.specs["unet"].sample_inputs(Dims(2, 64, 64), "fp32", seed=0)


def test_a_failed_refit_restores_the_base_and_refuses_only_that_patch(store, model, monkeypatch):
    runner = fake_unet(store, model, monkeypatch)
    [engine] = runner.engines
    chain, inputs = chain_and_inputs(runner, model)
    pairs = fused_pairs(runner)
    a = patch_of(runner, [pairs[0][0], pairs[1][0]], "a")
    b = patch_of(runner, [pairs[2][0]], "b")
    reasons: list[str] = []

    monkeypatch.setattr(fake_tensorrt.Refitter, "failures", 1)  # refits half of A's weights, then fails
    _, ran = chain.run(inputs, reasons.append, a)
    assert ran is not runner
    assert any("cannot apply the LoRAs" in reason and "refused the refit" in reason for reason in reasons)
    assert held(runner) and at_base(runner), "what the failed refit changed is back at its base"

    refits = engine.engine._refits
    _, ran = chain.run(inputs, reasons.append)
    assert ran is runner and engine.engine._refits == refits, "the base serves again, with no refit"
    _, ran = chain.run(inputs, reasons.append, a)
    assert ran is not runner and engine.engine._refits == refits, "the refused patch is not tried again"
    _, ran = chain.run(inputs, reasons.append, b)
    assert ran is runner and engine.engine._refits == refits + 1, "another patch still refits"
    assert not at_base(runner)


def test_an_engine_whose_base_cannot_be_restored_leaves_the_chain_alone(store, model, monkeypatch, caplog):
    runner = fake_unet(store, model, monkeypatch)
    [engine] = runner.engines
    chain, inputs = chain_and_inputs(runner, model)
    monkeypatch.setattr(fake_tensorrt.Refitter, "failures", 2)  # the refit and the restore both fail
    _, ran = chain.run(inputs, [].append, patch_of(runner, [fused_pairs(runner)[0][0]], "a"))
    assert ran is not runner
    assert "weights are unknown after a failed refit" in runner.broken
    refits = engine.engine._refits
    for patch in (None, patch_of(runner, [fused_pairs(runner)[1][0]], "b")):
        reasons: list[str] = []
        _, ran = chain.run(inputs, reasons.append, patch)
        assert ran is not runner and engine.engine._refits == refits
        assert any("weights are unknown" in reason for reason in reasons)


@pytest.mark.parametrize("location", ["HOST", "DEVICE"])
def test_the_fake_refitter_takes_weights_where_tensorrt_does(store, model, monkeypatch, location):
    runner = fake_unet(store, model, monkeypatch)
    [engine] = runner.engines
    name, partner = fused_pairs(runner)[0]
    trt = fake_tensorrt.fake_tensorrt()
    refitter = trt.Refitter(engine.engine, None)
    dims = engine.engine._weights[name]["dims"]
    value = np.full(dims, 0.25, dtype=np.float32)
    weights = trt.Weights(trt.DataType.FLOAT, value.ctypes.data, value.size)
    assert refitter.set_named_weights(name, weights, getattr(trt.TensorLocation, location))
    assert refitter.get_missing_weights() == [partner]
    assert not refitter.refit_cuda_engine_async(0), "TensorRT refuses while weights are missing"
    assert refitter.set_named_weights(partner, weights, trt.TensorLocation.HOST)
    value[...] = 0.5  # read when the refit runs, not when set
    assert refitter.refit_cuda_engine_async(0)
    assert (engine.engine._weights[name]["values"] == 0.5).all()
