"""Image-to-image inputs: base64 or URL, and a clear error for every kind of bad image."""

from __future__ import annotations

import base64
import http.server
import io
import random
import struct
import threading
import zlib
from collections.abc import Iterator

import pytest
from PIL import Image

from engine.common.errors import RequestError
from engine.request.checking import validate_request
from engine.request.images import ImageLimits, load_image, mask_for_crop
from engine.request.limits import Limits
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


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_chunk(kind: bytes, data: bytes, before: bytes = b"IDAT") -> bytes:
    """A valid 64x64 PNG with one more chunk, placed before the chunk ``before``."""
    png = encoded(Image.new("RGB", (64, 64), (200, 40, 40)))
    at = png.index(before) - 4
    return png[:at] + chunk(kind, data) + png[at:]


def png_sized(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels: a few bytes for the decoder to inflate."""
    png = bytearray(encoded(Image.new("RGB", (64, 64))))
    at = png.index(b"IHDR")
    png[at + 4 : at + 12] = struct.pack(">II", width, height)
    png[at + 17 : at + 21] = struct.pack(">I", zlib.crc32(bytes(png[at : at + 17])))
    return bytes(png)


INFLATING = zlib.compress(b"\0" * 5_000_000, 9)
"""About 5 KB that inflate to 5 MB, past Pillow's cap on a PNG text or color-profile chunk."""
DAMAGED = "image: the image is damaged or cannot be decoded (send PNG, JPEG or WebP)"


@pytest.mark.parametrize(
    "data",
    [
        png_with_chunk(b"zTXt", b"Comment\0\0" + INFLATING),  # read with the header
        png_with_chunk(b"zTXt", b"Comment\0\0" + INFLATING, before=b"IEND"),  # read after the pixels
        png_with_chunk(b"iCCP", b"icc\0\0" + INFLATING),
        png_with_chunk(b"iTXt", b"Comment\0\1\0\0\0" + INFLATING),
        encoded(picture(96, 72))[:-300],
        encoded(picture(96, 72), "JPEG")[:400],
        encoded(picture(96, 72), "WEBP")[:200],
    ],
    ids=["ztxt", "ztxt-after-pixels", "iccp", "itxt", "png-truncated", "jpeg-truncated", "webp-truncated"],
)
def test_every_decoder_failure_is_a_request_error_naming_the_field(data):
    assert error_of(b64(data)) == DAMAGED
    with pytest.raises(RequestError, match=r"^mask: the image is damaged"):
        load_image(b64(data), LIMITS, "mask")


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on malformed EXIF and MPO data
def test_damaged_files_of_every_format_decode_or_fail_as_request_errors():
    """Bytes changed, cut out or added at random: every outcome is an RGB image or a request error."""
    rng = random.Random(23)
    photos = [encoded(picture(72, 64), fmt) for fmt in ("PNG", "JPEG", "WEBP")]
    photos.append(encoded(picture(72, 64), "MPO", save_all=True, append_images=[picture(72, 64, seed=1)]))
    for _ in range(400):
        data = bytearray(rng.choice(photos))
        for _ in range(rng.randint(1, 6)):
            at = rng.randrange(len(data))
            data[at : at + rng.choice((0, 1, 1, 30))] = rng.randbytes(rng.choice((0, 1, 1, 8)))
        try:
            assert load_image(b64(bytes(data)), LIMITS).mode == "RGB"
        except RequestError as error:
            assert str(error).startswith("image: "), error


def test_a_phone_photo_stored_as_mpo_is_read_as_its_first_frame_the_jpeg():
    first, second = picture(96, 72), picture(96, 72, seed=5)
    mpo = encoded(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    ours = load_image(b64(mpo), LIMITS)
    assert ours.size == (96, 72)
    assert ours.tobytes() == load_image(b64(encoded(first, "JPEG")), LIMITS).tobytes()


def test_an_image_past_the_decoders_pixel_limit_names_the_size_rule():
    limit = 2 * Image.MAX_IMAGE_PIXELS
    assert error_of(b64(png_sized(20_000, 20_000))) == (
        f"image: more than {limit} pixels, past the image decoder's limit; at most 256 pixels per side"
    )
    assert error_of(b64(png_sized(4000, 300))) == "image: 4000x300 is larger than 256 pixels per side"


def test_a_mask_for_a_crop_takes_the_images_size_and_must_not_be_empty():
    mask = Image.new("RGB", (96, 80))
    mask.paste((255, 255, 255), (24, 20, 72, 60))
    fitted = mask_for_crop(mask, (64, 64))
    assert fitted.size == (64, 64)
    assert fitted.tobytes() == mask.resize((64, 64), Image.Resampling.LANCZOS).tobytes()
    assert mask_for_crop(fitted, (64, 64)) is fitted
    assert mask_for_crop(Image.new("L", (64, 64), 1), (64, 64)).size == (64, 64), "any white at all is a region"
    for empty in (Image.new("RGB", (64, 64)), Image.new("RGB", (96, 80)), Image.new("RGB", (64, 64), (1, 0, 0))):
        with pytest.raises(RequestError, match=r"^mask: the mask is empty \(all black\); padding_mask_crop needs"):
            mask_for_crop(empty, (64, 64))


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
