"""A full-size SD 1.5 architecture (random weights) through `python -m export` and the worker.

Marked slow, so the default run leaves it out; run it with ``python -m pytest -m slow``
(about 10 minutes, 16 GB of disk and 9 GB of memory on 2 cores). It holds the export to
the figures the README quotes: every stage within 2.5 times the UNet's fp32 weights,
validation of each component within 60 s on the CPU, and onnxruntime images equal to
torch's at 512x512.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.serving.worker import Worker
from engine.store.store import Store
from export.trace import weight_bytes
from perf.models import build_sd15
from tests.conftest import run_export
from tests.export.test_export import COMPONENTS, images_of

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sd15")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        build_sd15(folder)
    return folder


@pytest.fixture(scope="module")
def sd15_exports(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, sd15: Path) -> Path:
    engine_dir = tmp_path_factory.mktemp("sd15-exports")
    for precision in ("fp32", "fp16"):
        done = run_export(engine_dir, cache_dir, "--model", str(sd15), "--precision", precision)
        assert done.returncode == 0, done.stderr[-3000:]
    return engine_dir


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_full_size_export_stays_within_its_memory_and_time_bounds(sd15, sd15_exports, cache_dir, precision):
    from engine.models.model import load_model

    unet_mb = weight_bytes(load_model(str(sd15), cache_dir), "unet") / 2**20
    artifacts = {a.key.component: a for a in Store(sd15_exports).find(kind="onnx", precision=precision)}
    assert sorted(artifacts) == sorted(COMPONENTS)
    for component, artifact in artifacts.items():
        manifest = artifact.manifest
        assert all(entry["passed"] for entry in manifest["parity"]), component
        assert max(manifest["stage_peak_rss_mb"].values()) <= 2.5 * unet_mb, (component, manifest["stage_peak_rss_mb"])
        assert manifest["stage_seconds"]["validate"] <= 60, (component, manifest["stage_seconds"])
    assert artifacts["unet"].manifest["graph"]["external_data"]


def test_full_size_images_on_onnxruntime_match_torch_at_512(sd15, sd15_exports, make_settings):
    request = {"prompt": "a red fox", "width": 512, "height": 512, "num_inference_steps": 3, "seed": 3}
    common = {"model": str(sd15), "engine_dir": sd15_exports}
    on_torch = Worker(make_settings(backend="torch", **common)).handle({"id": "t", "input": request})
    on_onnxruntime = Worker(make_settings(backend="onnxruntime", **common)).handle({"id": "o", "input": request})
    assert set(on_onnxruntime["metrics"]["backends"].values()) == {"onnxruntime"}
    for mine, reference in zip(images_of(on_onnxruntime), images_of(on_torch), strict=True):
        assert np.abs(mine - reference).max() <= 2
