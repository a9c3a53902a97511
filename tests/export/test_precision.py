"""Half-precision graphs: the fp32 regions of fp16 and bf16 graphs, bf16 from bf16 checkpoints, and
bf16 graphs on onnxruntime's CPU provider (emulated) against torch in bf16."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from engine.backends.bf16 import emulated_bf16
from engine.backends.onnxruntime import OnnxRuntimeRunner
from engine.models.model import load_model
from engine.spec import Dims
from engine.store.keys import ONNX_FILE
from engine.store.store import Store
from engine.store.weightmap import WeightMap
from export.onnx import export_dims, export_onnx
from export.optimize import optimize
from export.trace import load_module, references_for
from export.validate import compare
from export.weights import fp32_bytes_to_bf16
from tests import parity
from tests.conftest import run_export
from tests.parity import cpu_worker, decoded

FP32, FP16, BF16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16


def half_graph(model_name: str, component: str, precision: str, cache_dir: Path, folder: Path) -> Path:
    """The component traced and converted as the export does, without the store."""
    model = load_model(model_name, cache_dir)
    module = load_module(model, component, torch.device("cpu"))
    raw = folder / "raw" / ONNX_FILE
    raw.parent.mkdir(parents=True)
    export_onnx(module, model.specs[component], export_dims(model), raw)
    target = folder / "optimized" / ONNX_FILE
    target.parent.mkdir()
    optimize(raw, target, model.specs[component], precision)
    return target


def value_types(graph_path: Path) -> tuple[onnx.ModelProto, dict[str, int]]:
    model = onnx.load(str(graph_path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model)
    values = (*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info)
    types = {value.name: value.type.tensor_type.elem_type for value in values}
    types.update((tensor.name, tensor.data_type) for tensor in model.graph.initializer)
    return model, types


def round_trips(model: onnx.ModelProto, half: int) -> list[str]:
    """Casts up to fp32 of a value that was just cast down from fp32."""
    producers = {output: node for node in model.graph.node for output in node.output}
    found = []
    for node in model.graph.node:
        down = producers.get(node.input[0]) if node.op_type == "Cast" else None
        if down is not None and down.op_type == "Cast" and down.attribute[0].i == half and node.attribute[0].i == FP32:
            source = producers.get(down.input[0])
            if source is not None and source.op_type != "Cast":
                found.append(f"{source.op_type} {source.name}")
    return found


@pytest.mark.parametrize(("model_name", "component"), [("tiny", "unet"), ("tiny-flux", "transformer")])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_angles_and_rms_norms_are_fp32_throughout(cache_dir, tmp_path, model_name, component, precision):
    """Sines and cosines take fp32 angles (timestep embeddings, Flux's rotary positions), RMS norms
    square, average and divide in fp32, bf16 graphs upsample in fp32, and no value is rounded to the
    half type between two fp32 nodes."""
    half = {"fp16": FP16, "bf16": BF16}[precision]
    model, types = value_types(half_graph(model_name, component, precision, cache_dir, tmp_path))
    producers = {output: node for node in model.graph.node for output in node.output}
    periodic = [node for node in model.graph.node if node.op_type in ("Sin", "Cos")]
    assert periodic
    for node in periodic:
        assert types[node.input[0]] == FP32, node.name
        angle = producers[node.input[0]]
        assert angle.op_type != "Cast" or angle.attribute[0].i != FP32, f"{node.name}: its angle was cast up"
    squares = [node for node in model.graph.node if node.op_type == "Pow"]
    if component == "transformer":
        assert squares, "Flux's query and key norms"
    for square in squares:
        assert types[square.output[0]] == FP32
    for node in (node for node in model.graph.node if node.op_type == "Resize"):
        assert types[node.input[0]] == (FP32 if precision == "bf16" else half), "TensorRT has no bf16 Resize"
    assert round_trips(model, half) == []
    names = [node.name for node in model.graph.node]
    assert all(names) and len(set(names)) == len(names), "nodes are told apart by name"
    assert {t.data_type for t in model.graph.initializer if t.data_type in (FP16, BF16)} == {half}


def test_fp16_flux_stays_close_to_torch_at_large_positions_and_timesteps(cache_dir, tmp_path):
    """At 1024 px the rotary positions reach 64 and timesteps 1000: with the angles in fp16 this graph
    was 2.9e-2 from torch (measured), 8.0e-3 with them in fp32."""
    graph = half_graph("tiny-flux", "transformer", "fp16", cache_dir, tmp_path)
    model = load_model("tiny-flux", cache_dir)
    module = load_module(model, "transformer", torch.device("cpu"))
    references = references_for(model, "transformer", module, [Dims(1, 1024, 1024)])
    runner = OnnxRuntimeRunner(model.specs["transformer"], graph, "fp16", torch.device("cpu"))
    (comparison,) = compare(model.specs["transformer"], references, runner, "fp16")
    assert comparison.max_abs_error < 1.5e-2, comparison


def test_bf16_weights_round_as_torch_does():
    values = np.array([1.0, 1 + 2**-9, 1 + 3 * 2**-9, -3.4e38, 1e-40, np.inf, -np.inf], dtype=np.float32)
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy()
    assert np.frombuffer(fp32_bytes_to_bf16(values.tobytes()), dtype=np.int16).tolist() == expected.tolist()
    assert np.isnan(np.frombuffer(fp32_bytes_to_bf16(np.float32([np.nan]).tobytes()), dtype=ml_dtypes.bfloat16))


def test_the_bf16_twin_rounds_every_stored_value_to_bf16():
    """A bf16 MatMul then Add: the twin computes each in fp32 and rounds each result to bf16, as torch
    does on bf16 tensors; the graph's own inputs, outputs and weights stay bf16."""
    weight = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    bias = np.linspace(-1, 1, 8, dtype=np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["h"]), onnx.helper.make_node("Add", ["h", "b"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", BF16, [4, 16])],
        [onnx.helper.make_tensor_value_info("y", BF16, [4, 8])],
        initializer=[
            onnx.numpy_helper.from_array(weight.astype(ml_dtypes.bfloat16), "w"),
            onnx.numpy_helper.from_array(bias.astype(ml_dtypes.bfloat16), "b"),
        ],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 19)])
    twin = emulated_bf16(model)
    assert [value.type.tensor_type.elem_type for value in (*twin.graph.input, *twin.graph.output)] == [BF16, BF16]
    session = ort.InferenceSession(twin.SerializeToString(), providers=["CPUExecutionProvider"])
    x, y = torch.randn(4, 16).to(torch.bfloat16), torch.empty(4, 8, dtype=torch.bfloat16)
    binding = session.io_binding()  # NumPy has no bf16 of its own: bind torch's memory, as the runner does
    binding.bind_input("x", "cpu", 0, BF16, list(x.shape), x.data_ptr())
    binding.bind_output("y", "cpu", 0, BF16, list(y.shape), y.data_ptr())
    session.run_with_iobinding(binding)
    w, b = (torch.from_numpy(v).to(torch.bfloat16) for v in (weight, bias))
    expected = ((x.float() @ w.float()).to(torch.bfloat16).float() + b.float()).to(torch.bfloat16)
    assert torch.equal(y, expected)


@pytest.fixture(scope="module")
def bf16_flux(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return parity.bf16_flux(cache_dir, tmp_path_factory.mktemp("bf16-flux"))


@pytest.fixture(scope="module")
def bf16_store(bf16_flux: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The export a GPU runs (fp16 asked for), on the CPU: bf16 where the checkpoint is bf16."""
    engine_dir = tmp_path_factory.mktemp("bf16-store")
    done = run_export(engine_dir, cache_dir, "--model", str(bf16_flux), "--precision", "fp16")
    assert done.returncode == 0, done.stderr[-3000:]
    return engine_dir


def test_components_take_their_checkpoints_precision(bf16_flux, cache_dir):
    """fp16 asked for: bf16 where the checkpoint is bf16, fp16 elsewhere, and T5 never fp16."""
    bf16_model = load_model(str(bf16_flux), cache_dir)
    fp32_model = load_model("tiny-flux", cache_dir)

    def precisions(model, asked: str) -> dict[str, str]:
        return {c: model.family.component_precision(c, asked, model.config) for c in model.specs}

    assert precisions(bf16_model, "fp16") == {
        "text_encoder": "fp16",
        "text_encoder_2": "bf16",
        "transformer": "bf16",
        "vae_decoder": "fp16",
        "vae_encoder": "fp16",
    }
    assert precisions(fp32_model, "fp16") == precisions(bf16_model, "fp16") | {
        "text_encoder_2": "fp32",
        "transformer": "fp16",
    }
    assert set(precisions(bf16_model, "fp32").values()) == {"fp32"}
    assert set(precisions(fp32_model, "bf16").values()) == {"bf16"}


def test_a_bf16_checkpoint_exports_bf16_graphs_validated_against_torch(bf16_store):
    artifacts = {artifact.key.component: artifact for artifact in Store(bf16_store).find(kind="onnx")}
    assert {name: artifact.key.precision for name, artifact in artifacts.items()} == {
        "text_encoder": "fp16",
        "text_encoder_2": "bf16",
        "transformer": "bf16",
        "vae_decoder": "fp16",
        "vae_encoder": "fp16",
    }
    for name in ("transformer", "text_encoder_2"):
        artifact = artifacts[name]
        graph = onnx.load(str(artifact.file(ONNX_FILE)), load_external_data=False).graph
        types = {tensor.name: tensor.data_type for tensor in graph.initializer}
        layers = [node for node in graph.node if node.op_type in ("MatMul", "Gemm", "Gather")]
        weight_types = Counter(types[name] for node in layers for name in node.input[:2] if name in types)
        assert weight_types[BF16] > 0 and weight_types[FP16] == weight_types[FP32] == 0, weight_types
        assert all(entry["passed"] for entry in artifact.manifest["parity"]), artifact.manifest["parity"]
        assert artifact.manifest["validation"]["backend"] == "onnxruntime"
        weight_map = WeightMap.read(artifact.path)
        assert weight_map.weights and {weight.dtype for weight in weight_map.weights} == {"bfloat16"}


def test_bf16_graphs_serve_like_torch_in_bf16(bf16_flux, bf16_store, cache_dir):
    """PRECISION=bf16 on the CPU: the bf16 transformer and T5 graphs (emulated) against torch's bf16 modules."""
    common = {"precision": "bf16"}
    on_torch = cpu_worker(str(bf16_flux), cache_dir, bf16_store, **common)
    on_onnxruntime = cpu_worker(str(bf16_flux), cache_dir, bf16_store, backend="onnxruntime", **common)
    payload = {"prompt": "a red fox in the snow", "width": 128, "height": 96, "num_inference_steps": 3, "seed": 5}
    expected = on_torch.handle({"id": "t", "input": payload})
    actual = on_onnxruntime.handle({"id": "o", "input": payload})
    backends = actual["metrics"]["backends"]
    assert backends["transformer"] == backends["text_encoder_2"] == "onnxruntime", actual["metrics"]["fallbacks"]
    assert actual["metrics"]["precision"] == "bf16"
    assert set(actual["metrics"]["precisions"].values()) == {"bf16"}
    for ours, theirs in zip(decoded(actual), decoded(expected), strict=True):
        difference = np.abs(ours.astype(int) - theirs.astype(int))
        assert difference.mean() < 2 and difference.max() <= 24, (difference.mean(), difference.max())
