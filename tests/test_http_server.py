"""HTTP mode as RunPod runs it: ``python -m engine.serve`` on loopback ports, called by the official ``openai``
client and by raw HTTP, with /ping on its own PORT_HEALTH."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.conftest import ROOT, free_port, worker_env

openai = pytest.importorskip("openai", reason="the openai client is a dev dependency")

FAST = {"num_inference_steps": 2, "seed": 3}


@dataclass
class Server:
    url: str
    health_url: str
    port: int
    log: Path
    pings: list[int] = field(default_factory=list)


@pytest.fixture(scope="module")
def server(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("serve")
    port, health = free_port(), free_port()
    env = worker_env(
        cache_dir,
        root / "engines",
        PORT=str(port),
        PORT_HEALTH=str(health),
        HTTP_HOST="127.0.0.1",
        HTTP_MAX_WAITING="0",
        HTTP_MAX_BODY_BYTES="2000000",
        BACKEND="torch",
        WARMUP="0",
    )
    running = Server(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{health}", port, root / "serve.log")
    with running.log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "engine.serve"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 240
        while not running.pings or running.pings[-1] != 200:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become ready: {running.log.read_text()[-3000:]}")
            with contextlib.suppress(requests.ConnectionError):
                running.pings.append(requests.get(running.health_url + "/ping", timeout=5).status_code)
            time.sleep(0.05)
        yield running
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server: Server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def png(mode: str = "RGB", color: object = (90, 140, 200)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, (64, 64), color).save(out, format="PNG")
    return out.getvalue()


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_ping_goes_from_initializing_to_ready_on_both_ports(server):
    assert set(server.pings) == {204, 200} and server.pings[-1] == 200  # 204 while the worker loaded
    assert requests.get(server.url + "/ping", timeout=5).status_code == 200
    assert requests.post(server.health_url + "/generate", json={"input": {}}, timeout=5).status_code == 404


def test_the_openai_client_generates_images(client):
    result = client.images.generate(prompt="a red fox", n=2, size="64x64", response_format="b64_json", extra_body=FAST)
    assert len(result.data) == 2
    images = [decoded(item.b64_json) for item in result.data]
    assert [(image.format, image.size) for image in images] == [("PNG", (64, 64))] * 2
    assert result.model_extra["metrics"]["num_samples"] == 2


def test_the_openai_client_edits_an_image_with_a_mask(client):
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))
    out = io.BytesIO()
    mask.save(out, format="PNG")
    result = client.images.edit(
        image=("photo.png", png(), "image/png"),
        mask=("mask.png", out.getvalue(), "image/png"),
        prompt="a hat",
        size="64x64",
        extra_body=FAST,
    )
    assert decoded(result.data[0].b64_json).size == (64, 64)
    assert result.model_extra["metrics"]["mode"] == "inpaint"


def test_the_openai_client_raises_the_right_error_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as bad_size:
        client.images.generate(prompt="a fox", size="huge")
    assert bad_size.value.param == "size" and "WIDTHxHEIGHT" in bad_size.value.message
    with pytest.raises(openai.NotFoundError) as wrong_model:
        client.images.generate(prompt="a fox", model="dall-e-3")
    assert wrong_model.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as not_an_image:
        client.images.edit(image=("x.png", b"%PDF-1.7 not an image", "image/png"), prompt="a fox")
    assert not_an_image.value.param == "image"


def raw(port: int, request: bytes) -> bytes:
    """A request written byte by byte, as curl would send it, and the server's whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_raw_requests_malformed_or_oversize_get_clear_errors(server):
    answer = raw(
        server.port,
        b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 3000000\r\nConnection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 413") and b"HTTP_MAX_BODY_BYTES" in answer
    response = requests.post(server.url + "/v1/images/generations", data=b'{"prompt": ', timeout=30)
    assert response.status_code == 400 and response.json()["error"]["message"] == "body: not valid JSON"
    response = requests.post(server.url + "/generate", json={"input": {"prompt": "a", "width": 13}}, timeout=30)
    assert response.status_code == 400 and response.json()["error"].startswith("width: must be a multiple of 8")


def test_a_request_while_another_runs_gets_429_with_retry_after(server):
    slow: list[requests.Response] = []
    job = {"input": {"prompt": "a slow fox", "num_inference_steps": 150, "seed": 1}}
    running = threading.Thread(target=lambda: slow.append(requests.post(server.url + "/generate", json=job)))
    running.start()
    refused = None
    while running.is_alive() and refused is None:
        time.sleep(0.2)
        response = requests.post(server.url + "/generate", json={"input": {"prompt": "a", **FAST}}, timeout=120)
        if response.status_code == 429:
            refused = response
    running.join(120)
    assert refused is not None, "no request was refused while the slow one ran"
    assert int(refused.headers["Retry-After"]) >= 1 and refused.json()["status"] == "error"
    assert slow[0].status_code == 200


def test_a_bad_setting_ends_the_server_with_one_line_naming_it(cache_dir, tmp_path):
    env = worker_env(cache_dir, tmp_path / "engines", PORT="0", HTTP_MAX_WAITING="-1")
    done = subprocess.run(
        [sys.executable, "-m", "engine.serve"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: PORT: ") and "HTTP_MAX_WAITING: " in line
