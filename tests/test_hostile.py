"""Hostile input, sent as a client would, to one local API server: no request may stop the worker,
poison a backend, leak a secret or a server path, hold the worker, or return a broken image as success.

Every input of issue 23's list goes to the same server (the tiny model with its ONNX Runtime
artifacts, a LoRA folder and a ControlNet folder), one test each. A hostile HTTP server on the
loopback serves what URLs point at: a body dripping a byte every 0.2 s, a LoRA whose
safetensors header is broken, redirects that carry a ``?token=`` secret, image bombs, a phone
camera's MPO JPEG. The worker's environment holds a proxy password. After every input a plain
request must still give the very bytes the fresh worker gave for it at the start, with every
backend still in its chain, and neither the reply nor the server's log may hold a secret.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import load_file, save_file

from engine.models.model import load_model
from perf.lora_files import write_lora
from tests.conftest import free_port, runsync, serve_api, worker_env
from tests.parity import picture

TOKEN = "TOKEN-SECRET-17"
PROXY_PASSWORD = "PROXY-PASSWORD-93"
SECRETS = (TOKEN, PROXY_PASSWORD)
PLAIN = {"prompt": "a red fox in the snow", "seed": 11, "num_inference_steps": 2, "width": 64, "height": 64}
DRIP_BYTES = 200
"""At a byte every 0.2 s, 40 s: far longer than a dripping download may hold the worker."""
PATHOLOGICAL_PROMPT = "[(" * 2500 + "\\(" * 2500
FATAL_WORDS = ("refresh_worker", "will be replaced", "the GPU failed", "new worker")


# Files the hostile server and the requests carry


def png_bytes(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def text_bomb() -> bytes:
    """A 5 KB PNG whose zTXt chunk inflates to 5 MB."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "a" * 5_000_000, zip=True)
    return png_bytes(picture(64, 64), pnginfo=info)


def profile_bomb() -> bytes:
    """A 5 KB PNG whose iCCP colour profile inflates to 5 MB."""
    return png_bytes(picture(64, 64), icc_profile=b"\0" * 5_000_000)


def mpo_photo() -> bytes:
    """What many phone cameras write: a JPEG that Pillow reads as MPO (a second picture appended)."""
    buffer = io.BytesIO()
    picture(64, 64).save(buffer, format="MPO", save_all=True, append_images=[picture(64, 64, seed=1)])
    return buffer.getvalue()


def over_pixel_limit() -> bytes:
    """A 24 KB PNG of 20000x10000 pixels: past Pillow's decompression-bomb limit."""
    return png_bytes(Image.new("1", (20000, 10000)))


def mask(size: tuple[int, int], box: tuple[int, int, int, int] | None) -> str:
    image = Image.new("L", size, 0)
    if box is not None:
        image.paste(255, box)
    return b64(png_bytes(image))


def broken_safetensors_header() -> bytes:
    """A header that claims a terabyte, then junk: refused from its first 8 bytes."""
    return struct.pack("<Q", 2**40) + b"\xff" * (4 * 2**20)


# Malformed LoRAs: a valid file with one module broken, so the error can name it


@dataclass(frozen=True)
class BrokenLora:
    name: str
    module: str
    """The broken module's path in the UNet (``down_blocks.1.attentions.0...to_k``)."""


def first_module(tensors: dict[str, torch.Tensor], suffix: str) -> str:
    return sorted(key for key in tensors if key.endswith(suffix))[0].removesuffix(suffix)


def write_broken_loras(model, folder: Path) -> dict[str, BrokenLora]:
    """One file per way a LoRA can be malformed, each breaking one module of an otherwise valid LoRA."""
    good = write_lora(model, folder / "source.safetensors", "peft", seed=4, rank=4, components=["unet"])
    tensors = load_file(str(good))
    good.unlink()
    module = first_module(tensors, ".lora_A.weight")
    a, b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
    out_features, in_features = tensors[b].shape[0], tensors[a].shape[1]
    nan = tensors[b].clone()
    nan[0, 0] = float("nan")
    variants = {
        "rank-mismatch": {b: tensors[b][:, :3].contiguous()},  # lora_B [out, 3] against lora_A [4, in]
        "rank-zero": {a: torch.zeros(0, in_features), b: torch.zeros(out_features, 0)},
        "nan": {b: nan},
        "huge-factors": {a: tensors[a] * 1e20, b: tensors[b] * 1e20},
        "one-dimensional": {a: tensors[a].flatten()},
    }
    broken = {}
    for name, changes in variants.items():
        save_file({**tensors, **changes}, str(folder / f"bad-{name}.safetensors"))
        broken[name] = BrokenLora(f"bad-{name}", module.removeprefix("unet."))
    kohya = write_lora(model, folder / "bad-alpha.safetensors", "kohya", seed=5, rank=4, components=["unet"])
    tensors = load_file(str(kohya))
    module = first_module(tensors, ".alpha")
    # every module's alpha: diffusers reads a kohya file's odd alphas out, keeping the common one
    save_file(
        {key: torch.tensor(1e30) if key.endswith(".alpha") else value for key, value in tensors.items()}, str(kohya)
    )
    broken["kohya-alpha-1e30"] = BrokenLora("bad-alpha", module.removeprefix("lora_unet_"))
    return broken


# The hostile HTTP server


class HostileHandler(BaseHTTPRequestHandler):
    """Serves ``server.files``, drips, redirects; counts every request by path."""

    server: HostileServer

    def do_GET(self) -> None:
        path = self.path.partition("?")[0]
        self.server.hits[path] += 1
        if path.startswith("/drip"):
            return self._drip()
        if path == "/redirect-no-host":
            return self._redirect(f"https:///x.png?token={TOKEN}")  # another scheme: not joined to this host
        if path == "/loop.safetensors":
            return self._redirect(self.path)
        data = self.server.files.get(path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _drip(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(DRIP_BYTES))
        self.end_headers()
        try:
            for _ in range(DRIP_BYTES):
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass  # the worker gave up: what it should do

    def log_message(self, *args: object) -> None:
        pass


class HostileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), HostileHandler)
        self.files = files
        self.hits: Counter[str] = Counter()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


# The worker under test


@dataclass
class Reply:
    body: dict
    seconds: float
    log: str
    """What the server logged while answering."""

    @property
    def text(self) -> str:
        return json.dumps(self.body)


@dataclass
class Target:
    url: str
    log_path: Path
    hostile: HostileServer
    broken_loras: dict[str, BrokenLora]
    hidden: tuple[str, ...]
    """Strings no reply may hold: server folders and secrets."""
    baseline: dict = field(default_factory=dict)

    def send(self, payload: dict, timeout: float = 120) -> Reply:
        offset = self.log_path.stat().st_size
        started = time.monotonic()
        body = runsync(self.url, payload, timeout=timeout).json()
        seconds = time.monotonic() - started
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return Reply(body, seconds, log.read().decode(errors="replace"))

    def plain(self) -> Reply:
        reply = self.send(PLAIN)
        assert reply.body["status"] == "COMPLETED", reply.body
        return reply


@pytest.fixture(scope="module")
def target(cache_dir, exported, tmp_path_factory) -> Iterator[Target]:
    from tests.test_controlnet import make_controlnet

    root = tmp_path_factory.mktemp("hostile")
    engine_dir, lora_dir, controlnet_dir = root / "engines", root / "loras", root / "controlnets"
    shutil.copytree(exported, engine_dir)  # ONNX Runtime runs first: a poisoned backend would show
    model = load_model("tiny", cache_dir)
    write_lora(model, lora_dir / "style.safetensors", "kohya", seed=3, rank=4, alpha=2)
    broken = write_broken_loras(model, lora_dir)
    make_controlnet(model.folder, controlnet_dir / "edges", seed=1)
    files = {
        "/text-bomb.png": text_bomb(),
        "/mpo.jpg": mpo_photo(),
        "/broken.safetensors": broken_safetensors_header(),
    }
    hostile = HostileServer(files)
    threading.Thread(target=hostile.serve_forever, daemon=True).start()
    proxy = f"http://hostile:{PROXY_PASSWORD}@127.0.0.1:{free_port()}"
    env = worker_env(
        cache_dir,
        engine_dir,
        LORA_DIR=str(lora_dir),
        CONTROLNET_DIR=str(controlnet_dir),
        MAX_LORAS="2",
        RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS="1",
        HTTP_PROXY=proxy,
        HTTPS_PROXY=proxy,
        NO_PROXY="127.0.0.1,localhost",
    )
    folders = (engine_dir, lora_dir, controlnet_dir, cache_dir, root, tmp_path_factory.getbasetemp())
    hidden = (*(str(folder) for folder in folders), *SECRETS)
    try:
        with serve_api(env, root / "server.log") as (url, _):
            found = Target(url, root / "server.log", hostile, broken, hidden)
            found.baseline = found.plain().body["output"]  # the fresh worker's answer
            yield found
    finally:
        hostile.shutdown()
        hostile.server_close()


# The hostile inputs


@dataclass(frozen=True)
class Hostile:
    payload: Callable[[Target], dict]
    fields: tuple[str, ...] | None
    """The error must name one of these fields; None: the answer is a correct image."""
    within_s: float = 15.0
    names: Callable[[Target], tuple[str, ...]] = lambda target: ()
    """What else the error must name (the broken module of a LoRA)."""
    not_saying: tuple[str, ...] = ()
    """What the error must not say (a misleading reason)."""
    times: int = 1
    """Sent this many times in a row: three failures in a row take a backend out of its chain."""


def request(**fields: object) -> Callable[[Target], dict]:
    return lambda target: {**PLAIN, **fields}


def at_hostile(path: str, **fields: object) -> Callable[[Target], dict]:
    """A request whose ``fields`` hold URLs on the hostile server: '{}' is its address."""

    def build(target: Target) -> dict:
        def fill(value: object) -> object:
            if isinstance(value, str):
                return value.replace("{}", target.hostile.url + path)
            if isinstance(value, list):
                return [fill(item) for item in value]
            if isinstance(value, dict):
                return {key: fill(item) for key, item in value.items()}
            return value

        return {**PLAIN, **{name: fill(value) for name, value in fields.items()}}

    return build


def broken_lora(kind: str, times: int = 1) -> Hostile:
    def payload(target: Target) -> dict:
        return {**PLAIN, "loras": [{"name": target.broken_loras[kind].name}]}

    def names(target: Target) -> tuple[str, ...]:
        return (target.broken_loras[kind].module,)

    return Hostile(payload, ("loras[0]",), names=names, times=times)


PHOTO = b64(png_bytes(picture(64, 64)))
INPAINT = {"image": PHOTO, "prompt": "a red hat"}
HOSTILE = {
    # 1. error text that looks like a CUDA failure must not get the worker replaced
    "image-url-port-cuda-driver": Hostile(request(image="http://a:CUDA driver/x.png"), ("image",)),
    "mask-url-port-device-side-assert": Hostile(
        request(**INPAINT, mask="http://a:device-side assert triggered/m.png"), ("mask",)
    ),
    "lora-url-port-illegal-memory-access": Hostile(
        request(loras=[{"url": "https://a:illegal memory access/x.safetensors"}]), ("loras[0].url",)
    ),
    "controlnet-image-url-port-unspecified-launch-failure": Hostile(
        request(controlnets=[{"name": "edges", "image": "http://a:unspecified launch failure/c.png"}]),
        ("controlnets[0].image",),
    ),
    # 2. and 3. malformed LoRAs: checked whole, before any weight changes, on every backend
    **{f"lora-{kind}": broken_lora(kind) for kind in ("rank-mismatch", "rank-zero", "one-dimensional")},
    **{f"lora-{kind}": broken_lora(kind) for kind in ("nan", "huge-factors", "kohya-alpha-1e30")},
    # 4. downloads have a deadline
    "image-slow-drip": Hostile(at_hostile("/drip.png", image="{}", timeout_s=5), ("image", "timeout_s"), 20),
    "lora-slow-drip": Hostile(
        at_hostile("/drip.safetensors", loras=[{"url": "{}"}], timeout_s=5), ("loras[0].url", "timeout_s"), 20
    ),
    # 5. a file that is not safetensors is refused from its header
    "lora-url-broken-safetensors-header": Hostile(
        at_hostile("/broken.safetensors", loras=[{"url": "{}"}]), ("loras[0].url",)
    ),
    # 6. secrets: a proxy password in the environment, tokens in URLs and redirects
    "image-url-through-a-proxy-with-a-password": Hostile(request(image="http://10.255.255.1/x.png"), ("image",)),
    "image-url-with-a-token-not-found": Hostile(at_hostile(f"/missing.png?token={TOKEN}", image="{}"), ("image",)),
    "image-url-redirected-to-no-host-with-a-token": Hostile(
        at_hostile(f"/redirect-no-host?token={TOKEN}", image="{}"), ("image",)
    ),
    "lora-url-redirect-loop-with-a-token": Hostile(
        at_hostile(f"/loop.safetensors?token={TOKEN}", loras=[{"url": "{}"}]), ("loras[0].url",)
    ),
    "lora-unknown-name-lists-no-folder": Hostile(request(loras=[{"name": "nope"}]), ("loras[0].name",)),
    "controlnet-unknown-name-lists-no-folder": Hostile(
        request(controlnets=[{"name": "pose", "image": PHOTO}]), ("controlnets[0].name",)
    ),
    # 7. images
    "image-ztxt-bomb-by-url": Hostile(at_hostile("/text-bomb.png", image="{}"), ("image",)),
    "mask-ztxt-bomb": Hostile(request(**INPAINT, mask=b64(text_bomb())), ("mask",)),
    "image-iccp-bomb": Hostile(request(image=b64(profile_bomb())), ("image",)),
    "image-mpo-jpeg-by-url": Hostile(at_hostile("/mpo.jpg", image="{}", strength=0.5), None),
    "image-over-the-pixel-limit": Hostile(
        request(image=b64(over_pixel_limit())), ("image",), not_saying=("not a PNG, JPEG or WebP",)
    ),
    # 8. inpainting edge cases
    "mask-of-another-size-with-padding-mask-crop": Hostile(
        request(**INPAINT, mask=mask((96, 128), (8, 8, 40, 60)), padding_mask_crop=8), None
    ),
    "empty-mask-with-padding-mask-crop": Hostile(
        request(**INPAINT, mask=mask((64, 64), None), padding_mask_crop=8), ("mask", "padding_mask_crop")
    ),
    # 9. names and prompts
    "lora-name-dot": Hostile(request(loras=[{"name": "."}]), ("loras[0].name",)),
    "lora-name-with-nul": Hostile(request(loras=[{"name": "a\x00b"}]), ("loras[0].name",)),
    "pathological-prompt-four-times": Hostile(request(prompt=[PATHOLOGICAL_PROMPT] * 4), ("prompt",), 1.0),
    "prompt-with-a-lone-surrogate": Hostile(request(prompt=["a fox", "a \ud800 fox"]), ("prompt[1]",)),
    "lora-name-with-a-lone-surrogate": Hostile(request(loras=[{"name": "style\udc80"}]), ("loras[0].name",)),
    # 2. again, last: on a backend that counts a malformed LoRA as its own failure, the third takes it out
    "lora-rank-mismatch-three-times-in-a-row": broken_lora("rank-mismatch", times=3),
}
FOLDER_LISTINGS = {
    "lora-unknown-name-lists-no-folder": ("style", "bad-"),
    "controlnet-unknown-name-lists-no-folder": ("edges",),
}


def assert_discreet(reply: Reply, target: Target) -> None:
    """No server folder, secret, raw exception or sign of a replaced worker in the reply; no secret in the log.
    The local API server drops ``refresh_worker`` from what it returns, so the worker's own words for it are
    looked for, in the reply and in the log."""
    for hidden in target.hidden:
        assert hidden not in reply.text, f"the reply holds {hidden!r}: {reply.text[:2000]}"
    for secret in SECRETS:
        assert secret not in reply.log, f"the log holds {secret!r}"
    for word in ("Traceback", "internal error", *FATAL_WORDS):
        assert word not in reply.text, reply.text[:2000]
    assert "asking RunPod for a new worker" not in reply.log


def assert_image(reply: Reply) -> None:
    """A success whose image is the size asked and a picture, not a flat (black or NaN) field."""
    assert reply.body["status"] == "COMPLETED", reply.body
    [item] = reply.body["output"]["output"]
    image = Image.open(io.BytesIO(base64.b64decode(item["image"])))
    assert image.size == (64, 64)
    assert np.asarray(image.convert("RGB"), dtype=np.float32).std() > 1.0, "a flat image"


def assert_still_serving(target: Target) -> None:
    """The plain request's bytes are the fresh worker's, and every backend is still in its chain."""
    reply = target.plain()
    output = reply.body["output"]
    assert output["output"][0]["image"] == target.baseline["output"][0]["image"], "the plain image changed"
    assert output["metrics"]["backends"] == target.baseline["metrics"]["backends"]
    assert not any("taken out" in reason for reason in output["metrics"].get("fallbacks", {}).values()), output
    assert_discreet(reply, target)


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_input_is_answered_clearly_and_leaves_the_worker_as_it_was(target, name):
    hostile = HOSTILE[name]
    replies = [target.send(hostile.payload(target)) for _ in range(hostile.times)]  # all sent, then judged
    for reply in replies:
        check_answer(target, name, reply)
    assert_still_serving(target)


def check_answer(target: Target, name: str, reply: Reply) -> None:
    hostile = HOSTILE[name]
    assert reply.seconds < hostile.within_s, f"held the worker {reply.seconds:.1f} s"
    assert_discreet(reply, target)
    if hostile.fields is None:
        assert_image(reply)
    else:
        assert reply.body["status"] == "FAILED", reply.body
        error = reply.body["error"]
        assert ":" in error and error.split(":", 1)[0].startswith(hostile.fields), error
        for named in hostile.names(target):  # in the file's spelling or kohya's
            assert named.replace(".", "_") in error.replace(".", "_"), f"{named!r} not in {error!r}"
        for misleading in hostile.not_saying:
            assert misleading not in error, error
        for listed in FOLDER_LISTINGS.get(name, ()):
            assert listed not in error, f"the error lists the folder: {error}"
        assert "Traceback" not in reply.log, reply.log[-3000:]


def test_a_refused_lora_url_is_not_fetched_again(target):
    payload = at_hostile("/broken.safetensors", loras=[{"url": "{}"}])(target)
    before = target.hostile.hits["/broken.safetensors"]
    for _ in range(2):
        reply = target.send(payload)
        assert reply.body["status"] == "FAILED" and reply.body["error"].startswith("loras[0].url:"), reply.body
    assert target.hostile.hits["/broken.safetensors"] - before <= 1


def test_a_request_refused_before_its_downloads_fetches_nothing_and_names_every_problem(target):
    """The checks that need no download run first and report together; the image URLs are never fetched."""
    payload = at_hostile(
        "/never.png",
        prompt="a fox " * 60,
        scheduler="nope",
        image="{}",
        padding_mask_crop=8,
        controlnets=[{"name": "pose", "image": "{}"}],
    )(target)
    reply = target.send(payload)
    assert reply.body["status"] == "FAILED", reply.body
    error = reply.body["error"]
    for message in (
        "scheduler: must be one of",
        "padding_mask_crop: only applies with a mask",
        "controlnets[0].name: no ControlNet 'pose' in CONTROLNET_DIR",
        "prompt: 240 tokens make 4 chunks of 75",
    ):
        assert message in error, (message, error)
    assert target.hostile.hits["/never.png"] == 0
    assert_discreet(reply, target)


def test_every_image_that_cannot_be_read_is_named_in_one_error(target):
    payload = {
        **PLAIN,
        **INPAINT,
        "image": b64(profile_bomb()),
        "mask": "bm90IGFuIGltYWdl",
        "controlnets": [{"name": "edges", "image": PHOTO}, {"name": "edges", "image": "not base64!"}],
    }
    reply = target.send(payload)
    assert reply.body["status"] == "FAILED", reply.body
    problems = reply.body["error"].split("; ")
    assert [problem.split(":")[0] for problem in problems] == ["image", "mask", "controlnets[1].image"], problems
    assert "mask: not a PNG, JPEG or WebP image" in problems
    assert "controlnets[1].image: not valid base64 (or an http(s) URL)" in problems
    assert_still_serving(target)


def test_after_every_hostile_input_the_worker_serves_the_fresh_image(target):
    assert_still_serving(target)
    log = target.log_path.read_text(errors="replace")
    for secret in SECRETS:
        assert secret not in log
