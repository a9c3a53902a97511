"""Bad ``loras`` entries: a clear error naming the entry, nothing applied, the worker serving on.

Files come from LORA_DIR or from URLs served here over HTTP (private addresses allowed for
the test, as runpod's SSRF-safe client lets a deployment allow them).
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.models.model import load_model
from engine.serving.worker import Worker
from engine.settings import Settings
from perf.lora_files import write_lora
from tests.lora.conftest import PAYLOAD, image_of


@pytest.fixture(scope="module")
def lora_dir(sd_loras, cache_dir, tmp_path_factory) -> Path:
    """The SD LoRAs, plus files a user might drop in by mistake."""
    folder = tmp_path_factory.mktemp("mixed-loras")
    for path in sd_loras.rglob("*.safetensors"):
        target = folder / path.relative_to(sd_loras)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    (folder / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    (folder / "old.ckpt").write_bytes(b"pickle")
    sdxl = load_model("tiny-sdxl", cache_dir)
    write_lora(sdxl, folder / "for-sdxl.safetensors", "kohya", seed=4, components=["unet", *sdxl.family.text_encoders])
    write_lora(sdxl, folder / "sdxl-unet.safetensors", "peft", seed=5, components=["unet"])
    stray = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_z"
    save_file(
        {f"{stray}.lora_A.weight": torch.ones(2, 64), f"{stray}.lora_B.weight": torch.ones(64, 2)},
        str(folder / "stray.safetensors"),
    )
    save_file({"unet.padding": torch.zeros(100_000)}, str(folder / "big.safetensors"))
    return folder


class Files(http.server.SimpleHTTPRequestHandler):
    requests_seen: ClassVar[list[str]] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        Files.requests_seen.append(self.path)
        super().do_GET()


@pytest.fixture(scope="module")
def file_server(lora_dir) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *args: Files(*args, directory=str(lora_dir)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def worker(cache_dir, lora_dir, tmp_path_factory) -> Worker:
    return Worker(
        Settings(
            model="tiny",
            cache_dir=cache_dir,
            engine_dir=tmp_path_factory.mktemp("engines"),
            lora_dir=lora_dir,
            device="cpu",
            backend="torch",
            max_loras=2,
            max_lora_bytes=200_000,
        )
    )


def error_of(worker: Worker, loras: object) -> str:
    response = worker.handle({"input": {**PAYLOAD, "loras": loras}})
    assert response["status"] == "error", response
    return response["error"]


BAD_ENTRIES = [
    ([{"name": "missing"}], "loras[0].name: no LoRA named 'missing'"),
    ([{"name": "."}], "loras[0].name: must name a file or folder, got '.'"),
    ([{"name": "a\x00b"}], "loras[0].name: must not contain control characters"),
    ([{"name": "\ud800"}], "loras[0].name: holds an unpaired surrogate, which is not Unicode text"),
    ([{"name": "x" * 256}], "loras[0].name: at most 255 bytes (UTF-8), got 256"),
    ([{"name": "styles/../a"}], "loras[0].name: must name a file inside the LoRA folder"),
    ([{"name": "a"}, {"name": "../../etc/passwd"}], "loras[1].name: must name a file inside the LoRA folder"),
    ([{"name": "/etc/hosts"}], "loras[0].name: must name a file inside the LoRA folder"),
    ([{"name": "garbage"}], "loras[0].name: 'garbage' is not a safetensors file"),
    ([{"name": "old.ckpt"}], "loras[0].name: .ckpt files are refused (pickle can run code)"),
    ([{"name": "for-sdxl"}], "loras[0].name: 'for-sdxl': it has weights for text_encoder_2, which this model"),
    ([{"name": "sdxl-unet"}], "loras[0].name: 'sdxl-unet': it changes unet."),
    (
        [{"name": "stray"}],
        "loras[0].name: 'stray': it changes unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_z,",
    ),
    ([{"name": "a", "scale": 4.5}], "loras[0].scale: Input should be less than or equal to 4"),
    ([{"name": "a", "scale": "1"}], "loras[0].scale: Input should be a valid number"),
    ([{"name": "a"}, {"name": "c"}, {"name": "styles/b"}], "loras: at most 2 LoRAs per request, got 3"),
    ([{"name": "a", "url": "https://example.com/a.safetensors"}], "loras[0]: give either name or url"),
    ([{"scale": 1}], "loras[0]: give either name or url"),
    ([{"url": "ftp://example.com/a.safetensors"}], "loras[0].url: must be an http(s) URL"),
    ("a", "loras: Input should be a valid list"),
]


@pytest.mark.parametrize(("loras", "message"), BAD_ENTRIES, ids=[message[:40] for _, message in BAD_ENTRIES])
def test_bad_entries_are_refused_with_the_entry_named(worker, loras, message):
    assert message in error_of(worker, loras)


def test_nothing_is_applied_when_an_entry_is_bad_and_the_worker_serves_on(worker):
    base = image_of(worker.handle({"input": PAYLOAD}))
    with_a = image_of(worker.handle({"input": {**PAYLOAD, "loras": [{"name": "a"}]}}))
    assert "loras[1].name" in error_of(worker, [{"name": "c"}, {"name": "missing"}])
    assert np.array_equal(image_of(worker.handle({"input": {**PAYLOAD, "loras": [{"name": "a"}]}})), with_a)
    assert np.array_equal(image_of(worker.handle({"input": PAYLOAD})), base)


def test_every_bad_entry_is_named_in_one_error(worker):
    message = error_of(worker, [{"name": "missing"}, {"name": "old.ckpt"}])
    first, second = "loras[0].name: no LoRA named 'missing'", "loras[1].name: .ckpt files are refused"
    assert message.startswith(f"{first}; {second}")


def test_a_lora_name_is_checked_with_the_rest_of_the_request(worker):
    """A bad name and a bad width in one reply: names are found at admission, before anything is read."""
    response = worker.handle({"input": {**PAYLOAD, "width": 65, "loras": [{"name": "missing"}]}})
    assert response["status"] == "error"
    assert "width" in response["error"] and "loras[0].name: no LoRA named 'missing'" in response["error"]


def test_unknown_names_show_neither_the_folder_nor_its_files(worker, lora_dir):
    message = error_of(worker, [{"name": "missing"}])
    assert message == "loras[0].name: no LoRA named 'missing'"
    assert str(lora_dir) not in message and "stray" not in message


def test_urls_are_refused_for_private_addresses_by_default(worker, file_server):
    message = error_of(worker, [{"url": f"{file_server}/a.safetensors"}])
    assert message.startswith("loras[0].url: URL not allowed")


def test_urls_download_once_under_their_sha256(worker, file_server, lora_dir, monkeypatch):
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "1")
    by_name = worker.handle({"input": {**PAYLOAD, "loras": [{"name": "c", "scale": 0.7}]}})
    url = f"{file_server}/c.safetensors"
    Files.requests_seen.clear()
    first = worker.handle({"input": {**PAYLOAD, "loras": [{"url": url, "scale": 0.7}]}})
    second = worker.handle({"input": {**PAYLOAD, "loras": [{"url": url, "scale": 0.7}]}})
    assert Files.requests_seen == ["/c.safetensors"], "the second request reads the cached file"
    assert np.array_equal(image_of(first), image_of(by_name)) and np.array_equal(image_of(second), image_of(by_name))
    sha256 = first["metrics"]["loras"][0]["sha256"]
    assert sha256 == by_name["metrics"]["loras"][0]["sha256"]
    assert (lora_dir / "cache" / f"{sha256}.safetensors").is_file()
    assert not list((lora_dir / "cache").glob(".partial-*")), "no half-written download is left"


def test_a_signed_urls_token_stays_out_of_the_metrics(worker, file_server, monkeypatch):
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "1")
    url = f"{file_server}/c.safetensors"
    response = worker.handle({"input": {**PAYLOAD, "loras": [{"url": f"{url}?token=SECRET"}]}})
    assert response["status"] == "success"
    assert response["metrics"]["loras"][0]["name"] == url
    assert "SECRET" not in json.dumps(response)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/nothing.safetensors", "loras[0].url: download failed with HTTP 404"),
        ("/garbage.safetensors", "loras[0].url: the download is not a safetensors file (it ends inside its header)"),
        ("/big.safetensors", "loras[0].url: larger than 0.2 MB"),
    ],
)
def test_bad_downloads_are_refused_and_leave_nothing(worker, file_server, lora_dir, monkeypatch, path, message):
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "1")
    assert error_of(worker, [{"url": f"{file_server}{path}"}]) == message
    assert not list((lora_dir / "cache").glob(".partial-*"))
