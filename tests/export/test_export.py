"""`python -m export` end to end on the CPU: real exports, real processes, real files."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.common.errors import ArtifactError
from engine.serving.worker import Worker
from engine.store.keys import ONNX_FILE
from engine.store.store import Store
from tests.conftest import ROOT, export_command, run_export

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
REQUEST = {
    "prompt": "a red fox",
    "negative_prompt": "fog",
    "width": 64,
    "height": 96,
    "num_inference_steps": 6,
    "seed": 5,
}


def published(engine_dir: Path) -> dict[str, list]:
    found: dict[str, list] = {}
    for artifact in Store(engine_dir).find(kind="onnx"):
        found.setdefault(artifact.key.component, []).append(artifact)
    return found


def images_of(response: dict) -> list[np.ndarray]:
    import base64
    import io

    from PIL import Image

    assert response["status"] == "success", response
    return [
        np.asarray(Image.open(io.BytesIO(base64.b64decode(item["image"]))), dtype=np.int16)
        for item in response["output"]
    ]


def test_export_publishes_every_component_with_parity(exported):
    artifacts = published(exported)
    assert sorted(artifacts) == sorted(COMPONENTS)
    for component, [artifact] in artifacts.items():
        artifact.verify()
        parity = artifact.manifest["parity"]
        assert {entry["shape"] for entry in parity} >= {"2x64x64, 2 prompt chunks", "1x64x96"}, component
        assert all(entry["passed"] for entry in parity)
        assert artifact.manifest["traced_size"] == "72x56"
        assert set(artifact.manifest["stage_seconds"]) >= {"export", "optimize", "validate"}


def test_onnxruntime_backend_matches_torch(exported, make_settings):
    torch_worker = Worker(make_settings(backend="torch", engine_dir=exported))
    ort_worker = Worker(make_settings(backend="onnxruntime", engine_dir=exported))
    expected = torch_worker.handle({"id": "t", "input": REQUEST})
    actual = ort_worker.handle({"id": "o", "input": REQUEST})
    assert actual["metrics"]["backends"] == dict.fromkeys(("text_encoder", "unet", "vae_decoder"), "onnxruntime")
    assert actual["metrics"]["fallbacks"] == {}
    for mine, reference in zip(images_of(actual), images_of(expected), strict=True):
        assert np.abs(mine - reference).max() <= 2


def test_auto_prefers_exported_graphs_and_reports_what_is_missing(exported, make_settings, tmp_path):
    partial = tmp_path / "engines"
    shutil.copytree(exported, partial)
    for artifact in Store(partial).find(component="unet"):
        shutil.rmtree(artifact.path)
    worker = Worker(make_settings(engine_dir=partial))
    metrics = worker.handle({"id": "a", "input": REQUEST})["metrics"]
    assert metrics["backends"] == {"text_encoder": "onnxruntime", "unet": "torch", "vae_decoder": "onnxruntime"}
    assert "no fp32 ONNX export" in metrics["fallbacks"]["unet"]


def test_a_flipped_byte_is_refused_by_the_worker_and_rebuilt_by_export(exported, make_settings, tmp_path, cache_dir):
    engine_dir = tmp_path / "engines"
    shutil.copytree(exported, engine_dir)
    [unet] = published(engine_dir)["unet"]
    data = bytearray(unet.file(ONNX_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    unet.file(ONNX_FILE).write_bytes(bytes(data))

    metrics = Worker(make_settings(backend="onnxruntime", engine_dir=engine_dir)).handle({"id": "f", "input": REQUEST})[
        "metrics"
    ]
    assert metrics["backends"]["unet"] == "torch"
    assert "does not match its manifest" in metrics["fallbacks"]["unet"]

    done = run_export(engine_dir, cache_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    [rebuilt] = published(engine_dir)["unet"]
    rebuilt.verify()
    assert len(list((engine_dir / "quarantine").iterdir())) == 1
    metrics = Worker(make_settings(backend="onnxruntime", engine_dir=engine_dir)).handle({"id": "g", "input": REQUEST})[
        "metrics"
    ]
    assert metrics["backends"]["unet"] == "onnxruntime"


def built_components(stdout: str) -> set[str]:
    """Components whose summary line shows export timings, i.e. that this process built."""
    return {line.split()[0] for line in stdout.splitlines() if line.startswith("  ") and "export " in line}


def test_three_concurrent_exports_build_each_artifact_once(tmp_path, cache_dir):
    engine_dir = tmp_path / "engines"
    command, env = export_command(engine_dir, cache_dir)
    processes = [
        subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    builders = [built_components(stdout) for stdout, _ in outputs]
    for component in COMPONENTS:
        assert sum(component in built for built in builders) == 1, builders
    artifacts = published(engine_dir)
    assert sorted(artifacts) == sorted(COMPONENTS)
    for [artifact] in artifacts.values():
        artifact.verify()


def test_an_export_killed_mid_build_leaves_nothing_served_and_the_next_run_completes(tmp_path, cache_dir):
    engine_dir = tmp_path / "engines"
    command, env = export_command(engine_dir, cache_dir)
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = engine_dir / "staging"
    deadline = time.monotonic() + 300
    while not (staging.is_dir() and any(path.is_file() for path in staging.rglob("*"))):
        assert process.poll() is None, "export finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()

    before = published(engine_dir)
    assert len(before) < len(COMPONENTS)
    for [artifact] in before.values():
        artifact.verify()
    assert any((engine_dir / "locks").iterdir()), "the killed build's lock is left behind"

    done = run_export(engine_dir, cache_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    after = published(engine_dir)
    assert sorted(after) == sorted(COMPONENTS)
    for [artifact] in after.values():
        artifact.verify()
    assert not any((engine_dir / "staging").iterdir())


def test_a_graph_that_fails_validation_is_not_published(tmp_path, cache_dir, monkeypatch):
    import export.validate
    from engine.models.model import load_model
    from export.stagelog import StageLog
    from export.stages import Exporter

    monkeypatch.setitem(export.validate.TOLERANCES, "fp32", export.validate.Tolerance(atol=0.0, rtol=0.0))
    store = Store(tmp_path / "engines")
    exporter = Exporter(load_model("tiny", cache_dir), store, torch.device("cpu"), "fp32")
    with pytest.raises(ArtifactError, match=r"vae_decoder: onnxruntime differs from torch: images at 1x72x56"):
        exporter.onnx("vae_decoder", StageLog())
    assert store.find() == []


def test_an_fp16_graph_keeps_sensitive_ops_and_the_timestep_in_fp32(tmp_path, cache_dir):
    import onnx

    done = run_export(tmp_path / "engines", cache_dir, "--precision", "fp16", "--components", "unet")
    assert done.returncode == 0, done.stderr[-3000:]
    [artifact] = Store(tmp_path / "engines").find(component="unet", precision="fp16")
    assert all(entry["passed"] for entry in artifact.manifest["parity"])
    graph = onnx.load(str(artifact.file(ONNX_FILE))).graph
    dtypes = {value.name: value.type.tensor_type.elem_type for value in graph.input}
    assert dtypes == {
        "sample": onnx.TensorProto.FLOAT16,
        "timestep": onnx.TensorProto.FLOAT,
        "encoder_hidden_states": onnx.TensorProto.FLOAT16,
    }
    types = {init.name: init.data_type for init in graph.initializer}
    layers = [node for node in graph.node if node.op_type in ("Conv", "MatMul", "Gemm")]
    weights = [types[name] for node in layers for name in node.input if name in types]
    assert weights and all(dtype == onnx.TensorProto.FLOAT16 for dtype in weights)
    producers = {output: node for node in graph.node for output in node.output}
    norms = [node for node in graph.node if node.op_type == "InstanceNormalization"]
    assert norms
    for node in norms:
        source = producers[node.input[0]]
        assert source.op_type == "Cast" and source.attribute[0].i == onnx.TensorProto.FLOAT


def test_the_cold_start_reports_what_it_read_from_the_store(exported, make_settings):
    worker = Worker(make_settings(backend="onnxruntime", engine_dir=exported))
    init = worker.handle({"id": "c", "input": REQUEST})["metrics"]["init_ms"]
    expected_mb = sum(f["size"] for a in Store(exported).find(kind="onnx") for f in a.files.values()) / 1e6
    assert init["store_read_mb"] >= round(expected_mb, 1) > 0
    assert init["store_read_mb_per_s"] > 0
