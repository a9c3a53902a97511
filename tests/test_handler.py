"""The RunPod entry point as RunPod's SDK runs it: --test_input and the local API server."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from PIL import Image

from tests.conftest import ROOT, runsync, serve_api, worker_env


def run_test_input(payload: dict, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "handler.py", "--test_input", json.dumps(payload)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def job_result(stdout: str) -> dict:
    """In local test mode stdout is the response alone, as one JSON line (logs go to stderr)."""
    [line] = stdout.splitlines()
    return json.loads(line)


def decode_image(item: dict) -> Image.Image:
    assert not item["image"].startswith("data:")
    return Image.open(io.BytesIO(base64.b64decode(item["image"], validate=True)))


def assert_metrics(metrics: dict) -> None:
    for key in (
        "process_time",
        "num_samples",
        "image_size",
        "request_id",
        "backends",
        "stages_ms",
        "unet_step_ms",
        "cold_start",
        "peak_memory_mb",
    ):
        assert key in metrics, key
    for stage in ("text_encoder", "denoise", "vae_decode", "postprocess"):
        assert metrics["stages_ms"][stage] >= 0
    assert set(metrics["unet_step_ms"]) >= {"p50", "p95", "max"}
    assert metrics["backends"] == {"text_encoder": "torch", "unet": "torch", "vae_decoder": "torch"}


def test_test_input_generates_a_png_with_metrics(subprocess_env):
    payload = {"input": {"prompt": "a red fox", "width": 64, "height": 96, "num_inference_steps": 6, "seed": 7}}
    done = run_test_input(payload, subprocess_env)
    assert done.returncode == 0, done.stderr[-2000:]
    result = job_result(done.stdout)
    assert result["status"] == "success"
    [item] = result["output"]
    image = decode_image(item)
    assert (image.format, image.size) == ("PNG", (64, 96))
    assert (item["seed"], item["width"], item["height"], item["format"]) == (7, 64, 96, "png")
    assert_metrics(result["metrics"])
    assert result["metrics"]["image_size"] == "64x96"
    assert result["metrics"]["cold_start"] is True
    assert result["metrics"]["init_ms"]["total"] > 0


def test_test_input_with_a_bad_width_fails_naming_width(subprocess_env):
    payload = {"input": {"prompt": "a red fox", "width": 65, "height": 96}}
    done = run_test_input(payload, subprocess_env)
    assert done.returncode != 0
    assert job_result(done.stdout)["error"] == "width: must be a multiple of 8, got 65"


@pytest.fixture(scope="module")
def api_server(cache_dir, tmp_path_factory) -> Iterator[str]:
    """The SDK's local API server (``--rp_serve_api``) running the real handler."""
    engine_dir = tmp_path_factory.mktemp("api") / "engines"
    with serve_api(worker_env(cache_dir, engine_dir), engine_dir.parent / "server.log") as (url, _):
        yield url


def test_api_server_answers_runsync(api_server):
    response = runsync(
        api_server, {"prompt": "a red fox", "width": 64, "height": 96, "num_inference_steps": 6, "seed": 7}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "COMPLETED"
    output = body["output"]
    assert output["status"] == "success"
    assert decode_image(output["output"][0]).size == (64, 96)
    assert_metrics(output["metrics"])
    assert output["metrics"]["request_id"] == body["id"]


def test_api_server_keeps_answering_after_bad_requests(api_server):
    for bad in ({"prompt": "x", "width": 65}, {"width": 64}, {"prompt": "x", "scheduler": "nope"}):
        body = runsync(api_server, bad).json()
        assert body["status"] == "FAILED"
        assert ":" in body["error"] and "Traceback" not in body["error"]
    body = runsync(api_server, {"prompt": "still here", "num_inference_steps": 3, "seed": 1}).json()
    assert body["status"] == "COMPLETED"
    assert body["output"]["metrics"]["cold_start"] is False
