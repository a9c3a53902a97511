"""Hostile LoRA files and URLs: each refused up front with the file and key named, no backend
counting the request against itself, caches that keep to their caps, and downloads that stop
at a bad header instead of after the whole body.

The malformed files are real safetensors files written for the tiny model; the URLs are
served by a real HTTP server on 127.0.0.1 (private addresses allowed for the test).
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.backends.base import Runner
from engine.backends.chain import RunnerChain, weights_lock
from engine.backends.torch import SharedTorchRunner
from engine.common.errors import RequestError
from engine.lora import library as library_module
from engine.lora.factors import MAX_WEIGHT_CHANGE, read_lora
from engine.lora.files import LoraFiles, Refusals
from engine.lora.headers import MAX_TENSORS
from engine.lora.library import LoraLibrary, WeightPatch
from engine.models.model import load_model
from engine.request.entries import LoraEntry
from engine.serving.worker import Worker
from engine.settings import Settings
from perf.lora_files import write_lora
from tests.lora.conftest import PAYLOAD, image_of

MODULE = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
A, B = f"unet.{MODULE}.lora_A.weight", f"unet.{MODULE}.lora_B.weight"


def _scaled(tensors: dict[str, torch.Tensor]) -> None:
    tensors[A], tensors[B] = tensors[A] * 1e20, tensors[B] * 1e20


def _nan(tensors: dict[str, torch.Tensor]) -> None:
    tensors[A][0, 0] = float("nan")


def _inf(tensors: dict[str, torch.Tensor]) -> None:
    tensors[B][1, 1] = float("inf")


BROKEN: dict[str, tuple[Callable[[dict[str, torch.Tensor]], None], str]] = {
    "ranks": (lambda t: t.update({B: t[B][:, :3]}), "has lora_A of rank 4 and lora_B of rank 3; they must agree"),
    "rank-0": (lambda t: t.update({A: t[A][:0], B: t[B][:, :0]}), "has rank 0"),
    "vector": (lambda t: t.update({B: t[B][:, 0].contiguous()}), "a LoRA's are two matrices"),
    "no-up": (lambda t: t.pop(B), "has lora_A without lora_B"),
    "nan": (_nan, ".lora_A.weight holds NaN or infinite values"),
    "inf": (_inf, ".lora_B.weight holds NaN or infinite values"),
    "1e20": (_scaled, "can change a weight by up to 1."),
}


@pytest.fixture(scope="module")
def tiny(cache_dir):
    return load_model("tiny", cache_dir)


@pytest.fixture(scope="module")
def hostile_dir(tiny, sd_loras, tmp_path_factory) -> Path:
    """The test LoRAs, a realistic rank-16 kohya file, and one malformed file per way of breaking one."""
    folder = tmp_path_factory.mktemp("hostile-loras")
    (folder / "a.safetensors").write_bytes((sd_loras / "a.safetensors").read_bytes())
    (folder / "c.safetensors").write_bytes((sd_loras / "c.safetensors").read_bytes())
    # trained-size factors: a kohya file at rank 16, alpha 8
    write_lora(tiny, folder / "realistic.safetensors", "kohya", seed=7, rank=16, alpha=8, magnitude=0.05)
    for name, (breaks, _) in BROKEN.items():
        tensors = load_file(str(sd_loras / "a.safetensors"))
        breaks(tensors)
        save_file({key: value.contiguous() for key, value in tensors.items()}, str(folder / f"bad-{name}.safetensors"))
    for name, alpha in {"alpha-1e30": 1e30, "alpha-inf": float("inf"), "alpha-negative": -1.0}.items():
        write_lora(tiny, folder / f"bad-{name}.safetensors", "kohya", seed=8, rank=2, alpha=alpha, components=["unet"])
    return folder


def make_worker(cache_dir: Path, engine_dir: Path, lora_dir: Path, backend: str) -> Worker:
    """A worker whose chains end in the torch fallback, so a failing first backend would be counted."""
    return Worker(
        Settings(
            model="tiny",
            cache_dir=cache_dir,
            engine_dir=engine_dir,
            lora_dir=lora_dir,
            device="cpu",
            backend=backend,
        )
    )


@pytest.fixture(scope="module")
def torch_worker(cache_dir, hostile_dir, tmp_path_factory) -> Worker:
    return make_worker(cache_dir, tmp_path_factory.mktemp("engines"), hostile_dir, "torch")


def error_of(worker: Worker, loras: list[dict]) -> str:
    response = worker.handle({"input": {**PAYLOAD, "loras": loras}})
    assert response["status"] == "error", response
    assert "refresh_worker" not in response
    return response["error"]


@pytest.mark.parametrize("name", list(BROKEN))
def test_malformed_factors_are_a_request_error_naming_the_file_and_key(torch_worker, name):
    message = error_of(torch_worker, [{"name": "a"}, {"name": f"bad-{name}"}])
    assert message.startswith(f"loras[1].name: 'bad-{name}': unet.{MODULE}"), message
    assert BROKEN[name][1] in message, message


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("alpha-1e30", "can change a weight by up to"),
        ("alpha-inf", "has alpha inf; it must be a positive finite number"),
        ("alpha-negative", "has alpha -1.0; it must be a positive finite number"),
    ],
)
def test_absurd_kohya_alphas_are_refused(torch_worker, name, rule):
    message = error_of(torch_worker, [{"name": f"bad-{name}"}])
    assert message.startswith(f"loras[0].name: 'bad-{name}': unet."), message
    assert rule in message, message


def test_real_loras_pass_well_inside_the_bound(tiny, hostile_dir):
    library = LoraLibrary(LoraFiles(hostile_dir, 10**9), tiny)
    for name in ("a", "c", "realistic"):
        patch = library.select([LoraEntry(name=name, scale=1.0)]).patches["unet"]
        largest = max(low_rank.largest_change() for terms in patch.terms.values() for _, low_rank in terms)
        assert largest < MAX_WEIGHT_CHANGE / 10, f"{name}: {largest}"


def test_torch_serves_on_after_bad_loras_with_the_same_images(torch_worker):
    base = image_of(torch_worker.handle({"input": PAYLOAD}))
    for name in ("ranks", "rank-0", "nan", "1e20"):
        error_of(torch_worker, [{"name": f"bad-{name}"}])
    with_a = torch_worker.handle({"input": {**PAYLOAD, "loras": [{"name": "a"}]}})
    assert set(with_a["metrics"]["backends"].values()) == {"torch"}
    assert np.array_equal(image_of(torch_worker.handle({"input": PAYLOAD})), base)


def test_onnxruntime_is_not_taken_out_by_bad_loras(cache_dir, exported, hostile_dir):
    worker = make_worker(cache_dir, exported, hostile_dir, "onnxruntime")
    good = worker.handle({"input": {**PAYLOAD, "loras": [{"name": "a"}]}})
    runners = {component: list(chain.runners) for component, chain in worker.chains.items()}
    for _ in range(2):
        for name in ("ranks", "rank-0", "vector", "inf"):
            assert f"'bad-{name}'" in error_of(worker, [{"name": f"bad-{name}"}])
    again = worker.handle({"input": {**PAYLOAD, "loras": [{"name": "a"}]}})
    assert set(again["metrics"]["backends"].values()) == {"onnxruntime"}, again["metrics"]["fallbacks"]
    assert np.array_equal(image_of(again), image_of(good))
    assert {component: chain.runners for component, chain in worker.chains.items()} == runners, "none taken out"


class _RefusingRunner(Runner):
    """A runner whose patch fails for a reason of the request, as a check that came too late would."""

    backend = "refusing"

    def apply_patch(self, patch: WeightPatch | None) -> None:
        raise RequestError("loras[0].name: 'x': refused while patching")

    def prepare(self, inputs):
        return dict(inputs)

    def run(self, inputs):
        return {"out": torch.zeros(1)}


class _PlainRunner(_RefusingRunner):
    backend = "plain"

    def apply_patch(self, patch: WeightPatch | None) -> None:
        pass


def test_a_request_error_while_patching_never_counts_against_the_runner(tiny):
    spec = tiny.specs["unet"]
    refusing = _RefusingRunner(spec, "fp32", torch.device("cpu"))
    chain = RunnerChain("unet", [refusing, _PlainRunner(spec, "fp32", torch.device("cpu"))])
    patch = WeightPatch("set", {})
    for _ in range(chain.failure_limit + 2):
        with pytest.raises(RequestError, match="refused while patching"):
            chain.run({}, lambda _: None, patch)
    assert refusing in chain.runners and not chain.unavailable


class _SlowRunner(Runner):
    """Takes a while to set its weights and to run, and answers with the key of the weights it ran."""

    backend = "slow"

    def apply_patch(self, patch: WeightPatch | None) -> None:
        self.current = patch.key if patch is not None else None
        time.sleep(0.01)

    def prepare(self, inputs):
        return dict(inputs)

    def run(self, inputs):
        time.sleep(0.01)
        return {"key": self.current}


def test_concurrent_calls_each_run_their_own_lora_set(tiny):
    runner = _SlowRunner(tiny.specs["unet"], "fp32", torch.device("cpu"))
    chain = RunnerChain("unet", [runner])
    ran: list[tuple[str, str]] = []

    def calls(key: str) -> None:
        for _ in range(10):
            outputs, _ = chain.run({}, lambda _: None, WeightPatch(key, {}))
            ran.append((key, outputs["key"]))

    threads = [threading.Thread(target=calls, args=(key,)) for key in ("x", "y", "z")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ran) == 30 and all(wanted == got for wanted, got in ran), ran


def test_a_runner_on_another_runners_weights_shares_its_lock(tiny):
    owner = _SlowRunner(tiny.specs["unet"], "fp32", torch.device("cpu"))
    shared = SharedTorchRunner(tiny.specs["unet"], owner, lambda module: module)  # type: ignore[arg-type]
    other = _SlowRunner(tiny.specs["unet"], "fp32", torch.device("cpu"))
    assert weights_lock(shared) is weights_lock(owner)
    assert weights_lock(other) is not weights_lock(owner)


def counted_reads(monkeypatch) -> list[str]:
    """The labels of the files the library reads from now on."""
    reads: list[str] = []
    monkeypatch.setattr(library_module, "read_lora", lambda *args: reads.append(args[1]) or read_lora(*args))
    return reads


def test_a_refused_named_file_is_not_read_again(tiny, hostile_dir, monkeypatch):
    reads = counted_reads(monkeypatch)
    library = LoraLibrary(LoraFiles(hostile_dir, 10**9), tiny)
    for index in range(3):
        with pytest.raises(RequestError, match=rf"^loras\[{index}\].name: 'bad-nan': unet\..* holds NaN"):
            library.select([*[LoraEntry(name="a", scale=1.0)] * index, LoraEntry(name="bad-nan", scale=1.0)])
    assert reads == ["bad-nan", "a"], "each file is read once"
    (hostile_dir / "copy.safetensors").write_bytes((hostile_dir / "bad-nan.safetensors").read_bytes())
    with pytest.raises(RequestError, match=r"^loras\[0\].name: 'copy': unet\..* holds NaN"):
        library.select([LoraEntry(name="copy", scale=1.0)])
    assert reads == ["bad-nan", "a"], "the same content is not read again, and the error names this file"


def test_read_files_are_kept_within_the_byte_budget(tiny, hostile_dir, monkeypatch):
    one = library_module.weights_bytes(real_weights(tiny, hostile_dir, "c"))
    reads = counted_reads(monkeypatch)
    library = LoraLibrary(LoraFiles(hostile_dir, 10**9), tiny, cache_bytes=one + one // 2)
    for name in ("c", "c", "a", "a", "c"):
        library.select([LoraEntry(name=name, scale=1.0)])
    assert reads == ["c", "a", "c"], "a and c do not fit together: each pushes the other out"
    roomy = LoraLibrary(LoraFiles(hostile_dir, 10**9), tiny, cache_bytes=10**9)
    reads.clear()
    for name in ("c", "a", "c", "a"):
        roomy.select([LoraEntry(name=name, scale=1.0)])
    assert reads == ["c", "a"]


def real_weights(tiny, folder: Path, name: str):
    library = LoraLibrary(LoraFiles(folder, 10**9), tiny)
    file = library.files.by_name(name, "loras[0].name")
    return library._weights(file, "loras[0].name")


def test_a_named_file_with_a_huge_tensor_table_is_refused_before_it_is_parsed(tmp_path):
    header = json.dumps(
        {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(MAX_TENSORS + 1)}
    ).encode()
    (tmp_path / "many.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    files = LoraFiles(tmp_path, 10**9)
    started = time.perf_counter()
    with pytest.raises(RequestError, match=rf"^loras\[0\].name: 'many' is not a LoRA file \(it has {MAX_TENSORS + 1}"):
        files.by_name("many", "loras[0].name")
    assert time.perf_counter() - started < 1.0


# --- URLs


class Body(http.server.BaseHTTPRequestHandler):
    """Serves ``files`` by path; a body given as (head, size) is ``head`` then zeros up to ``size``,
    sent in 64 KB pieces, counting what the socket took before the client hung up."""

    files: ClassVar[dict[str, bytes | tuple[bytes, int]]] = {}
    sent: ClassVar[dict[str, int]] = {}
    requests_seen: ClassVar[list[str]] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        Body.requests_seen.append(self.path)
        body = Body.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        head, size = body if isinstance(body, tuple) else (body, len(body))
        # a small send buffer, so what the server counts as sent is what the client could have read
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        Body.sent[self.path] = 0
        piece = 1 << 16
        try:
            for start in range(0, size, piece):
                data = head[start : start + piece]
                data += bytes(min(piece, size - start) - len(data))
                self.wfile.write(data)
                Body.sent[self.path] += len(data)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Body)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def framed(header: str) -> bytes:
    """A safetensors header with its length prefix."""
    return struct.pack("<Q", len(header)) + header.encode()


BAD_HEADERS = {
    "/html.safetensors": (b"<!DOCTYPE html><html>", "not a safetensors file (a header of "),
    "/json.safetensors": (framed("not json at all!"), "not a safetensors file (its header is not JSON)"),
    "/dtype.safetensors": (
        framed('{"x": {"dtype": "BOOL", "shape": [1], "data_offsets": [0, 1]}}'),
        "not a LoRA file (tensor 'x' is BOOL",
    ),
    "/huge.safetensors": (
        framed('{"x": {"dtype": "F32", "shape": [1000000000], "data_offsets": [0, 4000000000]}}'),
        "larger than 100.0 MB (by its header)",
    ),
}


@pytest.mark.parametrize("path", list(BAD_HEADERS))
def test_a_bad_header_stops_the_download_at_once_and_is_remembered(server, tmp_path, monkeypatch, path):
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "1")
    head, rule = BAD_HEADERS[path]
    size = 50 * 10**6
    Body.files[path] = (head, size)
    Body.requests_seen.clear()
    files = LoraFiles(tmp_path, 100 * 10**6)
    for _ in range(2):
        with pytest.raises(RequestError) as raised:
            files.by_url(f"{server}{path}", "loras[0].url")
        assert str(raised.value).startswith(f"loras[0].url: the download is {rule}"), raised.value
    assert Body.requests_seen == [path], "the refused URL is not fetched again"
    time.sleep(0.2)  # the server notices the hang-up
    assert Body.sent[path] < size // 20, f"{Body.sent[path]} of {size} bytes sent"

    assert not list((tmp_path / "cache").glob(".partial-*"))


def lora_bytes(tiny, folder: Path, seed: int) -> bytes:
    path = write_lora(tiny, folder / f"seed-{seed}.safetensors", "peft", seed=seed, components=["unet"])
    return path.read_bytes()


def test_the_download_cache_keeps_to_its_cap_least_recently_used_first(tiny, server, tmp_path, monkeypatch):
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "1")
    bodies = {f"/lru-{seed}.safetensors": lora_bytes(tiny, tmp_path / "made", seed) for seed in range(4)}
    Body.files.update(bodies)
    size = len(next(iter(bodies.values())))
    files = LoraFiles(tmp_path / "loras", 10**9, cache_bytes=2 * size + size // 2)
    cache = tmp_path / "loras" / "cache"
    urls = [f"{server}{path}" for path in bodies]
    clock = time.time() - 100_000

    def use(url: str, in_use=()) -> Path:
        """Uses ``url``'s file, then dates that use ten seconds after the last (file system clocks are coarse)."""
        nonlocal clock
        path = files.by_url(url, "loras[0].url", in_use).path
        clock += 10
        os.utime(path, (clock, clock))
        return path

    first, second = use(urls[0]), use(urls[1])
    stale, fresh = cache / ".partial-crashed", cache / ".partial-downloading"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    use(urls[0])  # first is now the more recently used
    third = use(urls[2])
    kept = sorted(cache.glob("*.safetensors"))
    assert kept == sorted([first, third]) and not second.exists(), "the least recently used (second) goes"
    assert sum(path.stat().st_size for path in kept) <= files.cache_bytes
    assert not stale.exists() and fresh.exists(), "a download a crash left behind goes, not one under way"
    assert len(list(cache.glob("url-*"))) == 2, "the evicted file's URL entry goes with it"

    fourth = use(urls[3], in_use=[first])  # first is the least recently used, but in use by the request
    assert sorted(cache.glob("*.safetensors")) == sorted([first, fourth])
    Body.requests_seen.clear()
    use(urls[1])
    assert Body.requests_seen == ["/lru-1.safetensors"], "an evicted URL is downloaded again"


def test_a_url_whose_lora_fails_the_checks_is_neither_fetched_nor_read_again(
    tiny, hostile_dir, server, tmp_path, monkeypatch
):
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "1")
    Body.files["/nan.safetensors?token=secret"] = (hostile_dir / "bad-nan.safetensors").read_bytes()
    Body.requests_seen.clear()
    reads = counted_reads(monkeypatch)
    library = LoraLibrary(LoraFiles(tmp_path / "loras", 10**9), tiny)
    url = f"{server}/nan.safetensors?token=secret"
    for _ in range(2):
        with pytest.raises(RequestError) as raised:
            library.select([LoraEntry(url=url, scale=1.0)])
        message = str(raised.value)
        assert message.startswith(f"loras[0].url: '{server}/nan.safetensors': unet."), message
        assert "secret" not in message
        shutil.rmtree(tmp_path / "loras" / "cache", ignore_errors=True)  # even with its download gone
    assert Body.requests_seen == ["/nan.safetensors?token=secret"] and reads == [url]


def test_refusals_are_kept_for_their_time_and_up_to_their_number():
    now = [0.0]
    refusals = Refusals(size=2, ttl_s=60, clock=lambda: now[0])
    refusals.add("a", "rule a")
    refusals.add("b", "rule b")
    now[0] = 59
    assert (refusals.get("a"), refusals.get("b")) == ("rule a", "rule b")
    refusals.add("c", "rule c")
    assert refusals.get("a") is None, "the oldest goes past the limit"
    now[0] = 100
    assert refusals.get("b") is None and refusals.get("c") == "rule c"
    now[0] = 200
    assert refusals.get("c") is None
