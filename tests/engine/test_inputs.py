"""Image-to-image inputs: base64 or URL, and a clear error for every kind of bad image."""

from __future__ import annotations

import base64
import http.server
import threading
from collections.abc import Iterator

import pytest
from PIL import Image

from engine.errors import RequestError
from engine.inputs import ImageLimits, load_image
from engine.request import Limits, validate_request
from tests.parity import picture, to_base64

LIMITS = ImageLimits(max_bytes=200_000, max_side=256, min_side=64)


def error_of(value: str, limits: ImageLimits = LIMITS) -> str:
    with pytest.raises(RequestError) as caught:
        load_image(value, limits)
    return str(caught.value)


def test_base64_and_data_uris_decode():
    image = picture(96, 72)
    assert load_image(to_base64(image), LIMITS).size == (96, 72)
    assert load_image("data:image/jpeg;base64," + to_base64(image, "JPEG"), LIMITS).size == (96, 72)
    assert load_image(to_base64(image, "WEBP"), LIMITS).mode == "RGB"


def test_exif_orientation_is_applied_as_diffusers_does():
    import io

    from diffusers.utils import load_image as diffusers_load_image

    stored = picture(96, 72)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned, show the pixels rotated 90 degrees clockwise
    buffer = io.BytesIO()
    stored.save(buffer, format="JPEG", exif=exif)
    ours = load_image(base64.b64encode(buffer.getvalue()).decode(), LIMITS)
    theirs = diffusers_load_image(Image.open(io.BytesIO(buffer.getvalue())))
    assert ours.size == theirs.size == (72, 96)
    assert ours.tobytes() == theirs.tobytes()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not base64 at all!", "image: not valid base64 (or an http(s) URL)"),
        (base64.b64encode(b"just some text").decode(), "image: not a PNG, JPEG or WebP image"),
        (to_base64(picture(96, 72), "GIF"), "image: GIF is not supported; send PNG, JPEG or WebP"),
        (to_base64(picture(300, 100)), "image: 300x100 is larger than 256 pixels per side"),
        (to_base64(picture(32, 96)), "image: 32x96 is smaller than 64 pixels per side"),
    ],
)
def test_bad_images_are_named(value, message):
    assert error_of(value) == message


def test_too_many_bytes():
    noisy = to_base64(picture(256, 256, seed=1).effect_spread(50), "PNG")
    assert error_of(noisy, ImageLimits(max_bytes=20_000, max_side=256, min_side=64)) == "image: larger than 20 KB"


@pytest.fixture
def http_server(tmp_path) -> Iterator[str]:
    (tmp_path / "fox.png").write_bytes(base64.b64decode(to_base64(picture(96, 72))))
    (tmp_path / "big.png").write_bytes(b"\0" * 300_000)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_urls_to_private_addresses_are_refused(http_server):
    assert error_of(f"{http_server}/fox.png").startswith("image: URL not allowed")


def test_urls_download_where_private_addresses_are_allowed(http_server, monkeypatch):
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "1")
    assert load_image(f"{http_server}/fox.png", LIMITS).size == (96, 72)
    assert error_of(f"{http_server}/missing.png") == "image: download failed with HTTP 404"
    assert error_of(f"{http_server}/big.png") == "image: larger than 0.2 MB"


REQUEST_LIMITS = Limits(64, 25, 7.5, 64, 1024, 1024 * 1024, 50, 4, 4, 60.0)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"prompt": "a", "strength": 0.5}, "strength: only applies with an image"),
        (
            {"prompt": "a", "image": "x", "strength": 0.01, "num_inference_steps": 10},
            "strength: with 10 steps it must be at least 0.1",
        ),
        ({"prompt": "a", "image": "x", "strength": 1.5}, "strength: Input should be less than or equal to 1"),
        ({"prompt": "a", "image": ""}, "image: String should have at least 1 character"),
        ({"prompt": "a", "image": 5}, "image: Input should be a valid string"),
    ],
)
def test_request_rules_for_image_to_image(payload, message):
    with pytest.raises(RequestError, match=message):
        validate_request(payload, REQUEST_LIMITS)
