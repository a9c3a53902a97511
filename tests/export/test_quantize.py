"""Quantized denoisers: `python -m export --quantize` as a user runs it, the store's keys, the CPU checks
against ModelOpt's fake-quantized module, and the worker serving (and falling back from) them."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from engine.backends.onnxruntime import OnnxRuntimeRunner
from engine.backends.torch import TorchRunner
from engine.common.errors import ArtifactError
from engine.devices import auto_quantization
from engine.models.model import load_model
from engine.serving.worker import Worker
from engine.spec import ComponentSpec
from engine.store.artifact import QUANTIZED_FIELDS, ArtifactKey
from engine.store.keys import quantized_onnx_key
from export.quantize import calibrate as calibration
from export.quantize import probe
from export.quantize.recipe import QuantFormat, Recipe
from export.quantize.stage import QUANTIZED_TOLERANCES
from export.quantize.twin import cpu_twin
from export.trace import load_module, references_for
from export.validate import check, compare, validation_dims
from perf.lora_files import write_lora
from tests.conftest import ROOT, run_export

CPU = torch.device("cpu")
PAYLOAD = {"prompt": "a red fox in the snow", "seed": 5, "num_inference_steps": 3, "width": 64, "height": 64}
CALIBRATION = ("--components", "unet", "--calib-steps", "2", "--calib-size", "64")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red fox in the snow\n# a comment\n\na lighthouse in a storm\n")
    return path


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, cache_dir: Path, prompts: Path) -> Path:
    """A store with the tiny UNet unquantized, in INT8 and in FP8, exported as a user would."""
    engine_dir = tmp_path_factory.mktemp("quantized")
    for quant in ("int8", "fp8"):
        done = run_export(engine_dir, cache_dir, *CALIBRATION, "--quantize", quant, "--calib-prompts", str(prompts))
        assert done.returncode == 0, done.stderr[-3000:]
    return engine_dir


def manifests(engine_dir: Path, pattern: str) -> list[dict]:
    return [json.loads((path / "manifest.json").read_text()) for path in (engine_dir / "artifacts").glob(pattern)]


def test_auto_picks_by_compute_capability():
    assert auto_quantization(None) is None
    assert auto_quantization((7, 5)) is None
    assert auto_quantization((8, 0)) == auto_quantization((8, 6)) == "int8"
    assert auto_quantization((8, 9)) == auto_quantization((9, 0)) == "fp8"
    assert auto_quantization((10, 0)) == auto_quantization((12, 0)) == "nvfp4"


def test_two_calibration_recipes_never_share_a_key(model):
    spec = model.specs["unet"]
    base = Recipe(QuantFormat.INT8, ("a fox",), steps=20, size=512)
    others = [
        replace(base, prompts=("a cat",)),
        replace(base, steps=10),
        replace(base, size=256),
        replace(base, modelopt="0.46.0"),
        replace(base, format=QuantFormat.FP8),
    ]
    keys = {quantized_onnx_key(spec, "f", "fp16", r.format.value, r.digest) for r in [base, *others]}
    assert len({key.dirname for key in keys}) == 6
    assert quantized_onnx_key(spec, "f", "fp16", "int8", base.digest).dirname.startswith("unet-onnx-int8-")


def test_unquantized_keys_keep_their_digests():
    key = ArtifactKey("onnx", "unet", "f", "fp16", "exporter")
    before = {name: value for name, value in asdict(key).items() if name not in QUANTIZED_FIELDS}
    import hashlib

    assert key.digest == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:20]
    assert replace(key, quantization="int8", recipe="r").digest != key.digest


def test_bad_calibration_settings_are_refused_by_name():
    with pytest.raises(Exception, match="--calib-size"):
        Recipe(QuantFormat.INT8, ("a",), steps=2, size=100)
    with pytest.raises(Exception, match="--calib-steps"):
        Recipe(QuantFormat.INT8, ("a",), steps=0, size=64)


def fp8_graph(path: Path) -> np.ndarray:
    """y = DQ(Q(x)) @ DQ(Q(w)) with TensorRT's FP8 ops, as ModelOpt writes them; returns w."""
    w = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    nodes = [
        helper.make_node("TRT_FP8QuantizeLinear", ["x", "sx"], ["qx"], domain="trt"),
        helper.make_node("TRT_FP8DequantizeLinear", ["qx", "sx"], ["dx"], domain="trt"),
        helper.make_node("TRT_FP8QuantizeLinear", ["w", "sw"], ["qw"], domain="trt"),
        helper.make_node("TRT_FP8DequantizeLinear", ["qw", "sw"], ["dw"], domain="trt"),
        helper.make_node("MatMul", ["dx", "dw"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fp8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array(0.01, np.float32), "sx"),
            numpy_helper.from_array(np.array(0.005, np.float32), "sw"),
        ],
        value_info=[helper.make_tensor_value_info("qx", TensorProto.UINT8, [2, 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19), helper.make_opsetid("trt", 1)])
    onnx.save_model(model, str(path))
    return w


def fake_fp8(values: np.ndarray, scale: float) -> np.ndarray:
    """E4M3 rounding to nearest even, saturating at 448, in NumPy (ml_dtypes)."""
    scaled = np.clip(values / scale, -448, 448)
    return scaled.astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale


def test_the_fp8_twin_runs_standard_float8_ops_on_onnxruntime(tmp_path):
    w = fp8_graph(tmp_path / "model.onnx")
    with pytest.raises(Exception, match="TRT_FP8QuantizeLinear"):
        ort.InferenceSession(str(tmp_path / "model.onnx"))
    twin = cpu_twin(tmp_path / "model.onnx", tmp_path / "twin.onnx")
    ops = {(node.domain, node.op_type) for node in onnx.load(str(twin)).graph.node}
    assert ("", "QuantizeLinear") in ops and not any(domain == "trt" for domain, _ in ops)
    x = np.random.default_rng(1).normal(scale=3.0, size=(2, 8)).astype(np.float32)
    x[0, 0] = 100.0  # past 448 x 0.01: saturates
    (got,) = ort.InferenceSession(str(twin)).run(None, {"x": x})
    want = fake_fp8(x, 0.01) @ fake_fp8(w, 0.005)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_int8_and_fp8_graphs_match_the_fake_quantized_module(quantized: Path):
    for quant, op_domain in (("int8", ""), ("fp8", "trt")):
        (manifest,) = manifests(quantized, f"unet-onnx-{quant}-*")
        assert manifest["key"]["quantization"] == quant and len(manifest["key"]["recipe"]) == 12
        record = manifest["quantization"]
        assert record["recipe"]["prompts"] == ["a red fox in the snow", "a lighthouse in a storm"]
        assert record["recipe"]["steps"] == 2 and record["recipe"]["size"] == 64 and record["quantizers"] > 0
        assert "fake-quantized torch module" in manifest["validation"]["compared"]
        pairs = manifest["validation"]["quantizer_check"]
        assert pairs["quantizers"] == 66 and pairs["tensors"] == 3 * 66 and pairs["values_apart"] <= 3, pairs
        assert all(r["mean_abs_error"] <= r["mean_allowed"] for r in manifest["parity"])
        assert all(result["passed"] for result in manifest["parity"]) and len(manifest["parity"]) == 3
        worst = max(result["max_abs_error"] for result in manifest["parity"])
        assert 0 < worst < 0.1, worst  # measured: 4.8e-2 (int8), 1.2e-2 (fp8) against outputs of about 1.4
        folder = next((quantized / "artifacts").glob(f"unet-onnx-{quant}-*"))
        graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
        assert any(node.domain == op_domain and "QuantizeLinear" in node.op_type for node in graph.node)
        assert (folder / "twin.onnx").exists() == (quant == "fp8")
    assert len(manifests(quantized, "unet-calibration-*")) == 2
    assert len(manifests(quantized, "unet-onnx-fp32-*")) == 1


def graph_rounding(weight: torch.Tensor, quantizer: torch.nn.Module) -> torch.Tensor:
    """ONNX's QuantizeLinear then DequantizeLinear with ModelOpt's exported scale (amax / 127): x / scale rounded
    half to even, saturated to int8, times the scale."""
    scale = quantizer.amax.float() / 127
    return torch.clamp(torch.round(weight / scale), -128, 127) * scale


def test_int8_weights_are_rounded_as_the_graph_rounds_them(quantized: Path, cache_dir: Path):
    model = load_model("tiny", cache_dir)
    folder = next((quantized / "artifacts").glob("unet-calibration-int8-*"))
    module = calibration.restore(load_module(model, "unet", CPU), folder / calibration.CALIBRATION_FILE)
    layers = [
        (child, child.weight.detach().clone())
        for child in module.modules()
        if getattr(child, "weight_quantizer", None) is not None and child.weight_quantizer.is_enabled
    ]
    with torch.no_grad():
        apart = sum(
            int((child.weight_quantizer(weight) != graph_rounding(weight, child.weight_quantizer)).sum())
            for child, weight in layers
        )
        assert apart > 0  # measured: 4 weights on a rounding tie, which torch rounds the other way
        calibration.round_weights_as_exported(module)
        for child, weight in layers:
            assert torch.equal(child.weight, graph_rounding(weight, child.weight_quantizer))
            torch.testing.assert_close(child.weight_quantizer(child.weight), child.weight, rtol=1e-6, atol=0.0)


TAMPERED = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.input_quantizer"


def exported_module(store: Path, cache_dir: Path, quant: str) -> tuple[ComponentSpec, list, dict]:
    """The tiny UNet as the export made it fake-quantized (calibration restored, INT8 weights rounded as the
    graph rounds them): its spec, its outputs at the validation shapes, and its input quantizers."""
    model = load_model("tiny", cache_dir)
    folder = next((store / "artifacts").glob(f"unet-calibration-{quant}-*"))
    module = calibration.restore(load_module(model, "unet", CPU), folder / calibration.CALIBRATION_FILE)
    calibration.round_weights_as_exported(module)
    references = references_for(model, "unet", module, validation_dims(model, CPU))
    return model.specs["unet"], references, probe.input_quantizers(module)


def tampered(store: Path, quant: str, how: str, folder: Path) -> Path:
    """The exported graph (FP8: its twin) with ``TAMPERED``'s Q/DQ pair changed: ``scale`` multiplies the scales
    of both nodes by 1.05, ``remove`` wires the pair's input through to what read its output."""
    artifact = next((store / "artifacts").glob(f"unet-onnx-{quant}-*"))
    model = onnx.load(str(artifact / ("model.onnx" if quant == "int8" else "twin.onnx")))
    graph = model.graph
    dequantize = probe.graph_quantizers(graph)[TAMPERED]
    (quantize,) = [node for node in graph.node if dequantize.input[0] in node.output]
    if how == "scale":
        initializers = {tensor.name: tensor for tensor in graph.initializer}
        for node in (quantize, dequantize):
            scale = numpy_helper.to_array(initializers[node.input[1]]) * np.float32(1.05)
            graph.initializer.append(numpy_helper.from_array(scale, f"{node.name}/tampered_scale"))
            node.input[1] = f"{node.name}/tampered_scale"
    else:
        for node in graph.node:
            for index, name in enumerate(node.input):
                if name == dequantize.output[0]:
                    node.input[index] = quantize.input[0]
        graph.node.remove(quantize)
        graph.node.remove(dequantize)
    path = folder / f"{quant}-{how}" / "model.onnx"
    path.parent.mkdir()
    onnx.save_model(model, str(path))
    return path


@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_one_quantizer_off_passes_the_output_bounds_and_fails_the_pairs_check(quantized, cache_dir, tmp_path, quant):
    """Why the graph's Q/DQ pairs are checked one by one: a quantizer 5% off or left out moves the outputs no
    more than single values rounded a step apart do, so the output bounds pass it; the pairs' check does not."""
    spec, references, quantizers = exported_module(quantized, cache_dir, quant)
    tolerance = QUANTIZED_TOLERANCES[quant]
    artifact = next((quantized / "artifacts").glob(f"unet-onnx-{quant}-*"))
    exported = artifact / ("model.onnx" if quant == "int8" else "twin.onnx")
    assert len(check(spec, "onnxruntime", compare(spec, references, runner(spec, exported), "fp32", tolerance))) == 3
    summary = probe.check_quantizers(spec, probe.compare_quantizers(spec, exported, "fp32", references, quantizers))
    assert summary["quantizers"] == 66 and summary["tensors"] == 3 * 66
    assert summary["values_apart"] <= 3, summary  # measured: none

    scaled = tampered(quantized, quant, "scale", tmp_path)
    results = compare(spec, references, runner(spec, scaled), "fp32", tolerance)
    assert all(r.max_abs_error <= r.allowed for r in results)  # the old bound alone passes it
    check(spec, "onnxruntime", results)  # and so do the outputs' max and mean bounds
    pairs = probe.compare_quantizers(spec, scaled, "fp32", references, quantizers)
    with pytest.raises(ArtifactError, match=f"do not quantize as the module's quantizers do.*{TAMPERED} at 1x72x56"):
        probe.check_quantizers(spec, pairs)
    assert {r.quantizer for r in pairs if not r.passed} == {TAMPERED}
    assert min(r.fraction for r in pairs if r.quantizer == TAMPERED) > 0.5

    removed = tampered(quantized, quant, "remove", tmp_path)
    results = compare(spec, references, runner(spec, removed), "fp32", tolerance)
    assert all(r.max_abs_error <= r.allowed for r in results)
    check(spec, "onnxruntime", results)
    with pytest.raises(ArtifactError, match=f"not the module's quantizers: no Q/DQ pair for {TAMPERED}$"):
        probe.compare_quantizers(spec, removed, "fp32", references, quantizers)


def runner(spec: ComponentSpec, graph: Path) -> OnnxRuntimeRunner:
    return OnnxRuntimeRunner(spec, graph, "fp32", CPU)


def test_a_rebuild_reuses_the_calibration(quantized: Path, cache_dir: Path, prompts: Path, tmp_path: Path):
    store = tmp_path / "engines"
    shutil.copytree(quantized, store)
    for folder in (store / "artifacts").glob("unet-onnx-int8-*"):
        shutil.rmtree(folder)
    done = run_export(store, cache_dir, *CALIBRATION, "--quantize", "int8", "--calib-prompts", str(prompts))
    assert done.returncode == 0, done.stderr[-3000:]
    (manifest,) = manifests(store, "unet-onnx-int8-*")
    (before,) = manifests(quantized, "unet-onnx-int8-*")
    assert manifest["quantization"]["calibrated_here"] is False
    assert "calibrate" not in manifest["stage_seconds"] and "restore calibration" in manifest["stage_seconds"]
    assert manifest["key"] == before["key"]
    assert [r["max_abs_error"] for r in manifest["parity"]] == [r["max_abs_error"] for r in before["parity"]]


def image(response: dict) -> np.ndarray:
    assert response["status"] == "success", response
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response["output"][0]["image"]))), dtype=np.int16)


def test_the_worker_serves_the_quantized_graph_and_falls_back_with_the_reason(quantized, make_settings, tmp_path):
    loras = tmp_path / "loras"
    write_lora(
        load_model("tiny", make_settings().cache_dir), loras / "a.safetensors", "peft", seed=1, components=["unet"]
    )
    settings = {"engine_dir": quantized, "backend": "onnxruntime", "lora_dir": loras}
    int8 = Worker(make_settings(quantize="int8", **settings))
    plain = Worker(make_settings(**settings))

    served = int8.handle({"input": PAYLOAD})
    assert served["metrics"]["precisions"]["unet"] == "int8 (fp32 elsewhere)"
    assert "unet" not in served["metrics"].get("fallbacks", {})
    assert not np.array_equal(image(served), image(plain.handle({"input": PAYLOAD})))

    with_lora = {**PAYLOAD, "loras": [{"name": "a"}]}
    fell_back = int8.handle({"input": with_lora})
    assert (
        "onnxruntime: cannot apply the LoRAs: the int8 graph takes no LoRAs"
        in fell_back["metrics"]["fallbacks"]["unet"]
    )
    assert fell_back["metrics"]["precisions"]["unet"] == "fp32"
    assert np.array_equal(image(fell_back), image(plain.handle({"input": with_lora})))
    assert int8.handle({"input": PAYLOAD})["metrics"]["precisions"]["unet"] == "int8 (fp32 elsewhere)"

    missing = Worker(make_settings(quantize="nvfp4", **settings)).handle({"input": PAYLOAD})
    assert "onnxruntime nvfp4: no nvfp4 ONNX export in the engine store" in missing["metrics"]["fallbacks"]["unet"]
    assert missing["metrics"]["precisions"]["unet"] == "fp32"

    fp8 = Worker(make_settings(quantize="fp8", **settings)).handle({"input": PAYLOAD})
    assert fp8["metrics"]["precisions"]["unet"] == "fp8 (fp32 elsewhere)"


EXAMPLE_FILTER = (
    "time_emb_proj",
    "time_embedding",
    "conv_in",
    "conv_out",
    "conv_shortcut",
    "add_embedding",
    "pos_embed",
    "time_text_embed",
    "context_embedder",
    "norm_out",
    "x_embedder",
)
"""The layers Model Optimizer's diffusers example leaves unquantized (examples/diffusers/quantization/utils.py,
``filter_func_default``), written out here rather than read from the recipe."""


def enabled_quantizers(module: torch.nn.Module) -> set[str]:
    return {name for name, child in module.named_modules() if name.endswith("_quantizer") and child.is_enabled}


def assert_quantized_as_the_recipe_says(module: torch.nn.Module) -> None:
    """Enabled: the weight and input quantizers of every Linear and Conv layer the example's filter does not name.
    Everything else off, among them LayerNorm inputs, attention's matmuls and softmax, and every output."""
    layers = {
        name
        for name, child in module.named_modules()
        if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)) and not any(part in name for part in EXAMPLE_FILTER)
    }
    assert enabled_quantizers(module) == {
        f"{layer}.{kind}" for layer in layers for kind in ("weight_quantizer", "input_quantizer")
    }
    norms = [child for child in module.modules() if isinstance(child, torch.nn.LayerNorm)]
    assert norms and all(not norm.input_quantizer.is_enabled for norm in norms)
    softmax = [child.softmax_quantizer for child in module.modules() if hasattr(child, "softmax_quantizer")]
    assert softmax and not any(quantizer.is_enabled for quantizer in softmax)
    filtered = [name for name, _ in module.named_modules() if any(part in name for part in EXAMPLE_FILTER)]
    assert filtered


def test_the_quantized_unet_leaves_unquantized_what_the_recipe_says(quantized: Path, cache_dir: Path):
    model = load_model("tiny", cache_dir)
    for quant in ("int8", "fp8"):
        folder = next((quantized / "artifacts").glob(f"unet-calibration-{quant}-*"))
        module = calibration.restore(
            load_module(model, "unet", torch.device("cpu")), folder / calibration.CALIBRATION_FILE
        )
        assert_quantized_as_the_recipe_says(module)


def test_a_quantized_transformer_leaves_unquantized_what_the_recipe_says(cache_dir: Path):
    model = load_model("tiny-flux", cache_dir)
    spec = model.specs["transformer"]
    module = load_module(model, "transformer", torch.device("cpu"))
    inputs = spec.sample_inputs(validation_dims(model, torch.device("cpu"))[0], "fp32", seed=0)
    recipe = Recipe(QuantFormat.FP8, ("a",), steps=1, size=64)
    calibration.calibrate(module, recipe, lambda m: TorchRunner(spec, m, "fp32", torch.device("cpu"))(inputs))
    assert_quantized_as_the_recipe_says(module)


def test_the_serving_path_never_imports_model_optimizer():
    code = "import engine.serving.startup, engine.backends.assemble, engine.backends.quantized, handler"
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = {line.rpartition("|")[2].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "engine.backends.quantized" in loaded
    assert sorted(module for module in loaded if module.split(".")[0] == "modelopt") == []
