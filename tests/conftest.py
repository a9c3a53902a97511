"""Shared fixtures: one cache of built-in models per test session, and settings for them."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from engine.models.model import load_model
from engine.settings import Settings
from engine.store.store import Store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built-in models are written here once per session, never into the user's cache."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def engine_dir(tmp_path: Path) -> Path:
    return tmp_path / "engines"


@pytest.fixture
def make_settings(cache_dir: Path, engine_dir: Path) -> Callable[..., Settings]:
    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "cache_dir": cache_dir,
            "engine_dir": engine_dir,
            "device": "cpu",
            "ready_file": engine_dir.parent / "worker-ready",
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def subprocess_env(cache_dir: Path, engine_dir: Path) -> dict[str, str]:
    """Environment for running the project's commands as a user would, against the test caches."""
    return worker_env(cache_dir, engine_dir)


def worker_env(cache_dir: Path, engine_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        CACHE_DIR=str(cache_dir),
        ENGINE_DIR=str(engine_dir),
        DEVICE="cpu",
        PYTHONUNBUFFERED="1",
        READY_FILE=str(engine_dir.parent / "worker-ready"),
        **extra,
    )
    return env


def export_command(engine_dir: Path, cache_dir: Path, *extra: str) -> tuple[list[str], dict[str, str]]:
    """`python -m export` (for the tiny model unless ``extra`` names another) into a given store."""
    env = dict(os.environ, ENGINE_DIR=str(engine_dir), CACHE_DIR=str(cache_dir), DEVICE="cpu", PYTHONUNBUFFERED="1")
    model = [] if "--model" in extra else ["--model", "tiny"]
    return [sys.executable, "-m", "export", *model, *extra], env


def run_export(engine_dir: Path, cache_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command, env = export_command(engine_dir, cache_dir, *extra)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """An engine store with every tiny component exported, shared read-only by the session."""
    engine_dir = tmp_path_factory.mktemp("exported")
    done = run_export(engine_dir, cache_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return engine_dir


@pytest.fixture(scope="session")
def exported_sdxl(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """The same for tiny-sdxl."""
    engine_dir = tmp_path_factory.mktemp("exported-sdxl")
    done = run_export(engine_dir, cache_dir, "--model", "tiny-sdxl")
    assert done.returncode == 0, done.stderr[-3000:]
    return engine_dir


@pytest.fixture(scope="session")
def inpainting_model(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A held-out tiny SD inpainting model: a 9-channel UNet (latents, mask, masked-image latents)."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel

    from engine.models.builtin import builtin_model_folder

    folder = tmp_path_factory.mktemp("tiny-inpaint")
    base = StableDiffusionPipeline.from_pretrained(builtin_model_folder("tiny", cache_dir))
    with torch.random.fork_rng():
        torch.manual_seed(7)
        unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9, "attention_head_dim": 4})
    StableDiffusionInpaintPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=unet,
        scheduler=base.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve_api(env: dict[str, str], log: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """The SDK's local API server (``handler.py --rp_serve_api``) on a free loopback port."""
    port = free_port()
    command = [sys.executable, "handler.py", "--rp_serve_api", "--rp_api_port", str(port), "--rp_api_host", "127.0.0.1"]
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"API server exited: {log.read_text()[-3000:]}")
            try:
                requests.get(url + "/", timeout=2)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield url, process
    finally:
        process.terminate()
        process.wait(timeout=30)


def runsync(url: str, payload: object, timeout: float = 120) -> requests.Response:
    return requests.post(url + "/runsync", json={"input": payload}, timeout=timeout)


def use_settings_env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    """Puts settings into the environment, where the handler's start-up reads them."""
    for name, value in settings.model_dump(mode="json").items():
        if value is not None and not isinstance(value, dict):
            monkeypatch.setenv(name.upper(), str(value))


@pytest.fixture
def store(exported: Path, tmp_path: Path) -> Store:
    """A writable copy of the exported tiny store."""
    shutil.copytree(exported, tmp_path / "engines")
    return Store(tmp_path / "engines")


@pytest.fixture
def model(cache_dir: Path):
    return load_model("tiny", cache_dir)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 API on a loopback port, with the bucket ``images`` (keys test-key, test-secret)."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="test-key",
        aws_secret_access_key="test-secret",
        region_name="us-east-1",
    ).create_bucket(Bucket="images")
    yield endpoint
    server.stop()
