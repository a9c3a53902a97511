"""Input images for image-to-image and inpainting: base64 or an http(s) URL, checked before anything is decoded.

URLs are fetched by ``engine.downloads`` (SSRF-safe, size capped). Every failure is a RequestError naming the
field (``image`` or ``mask``).
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from engine.downloads import download, size_text
from engine.errors import RequestError

FORMATS = ("PNG", "JPEG", "WEBP")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_side: int
    min_side: int


def _decode_base64(value: str, max_bytes: int, field: str) -> bytes:
    if value.startswith("data:"):
        value = value.partition(",")[2]
    if len(value) > (max_bytes + 2) // 3 * 4 + 4:
        raise RequestError(f"{field}: larger than {size_text(max_bytes)}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{field}: not valid base64 (or an http(s) URL)") from None


def load_image(value: str, limits: ImageLimits, field: str = "image") -> Image.Image:
    """An RGB image from base64 or a URL, within the byte and size limits; errors name ``field``."""
    if value.startswith(("http://", "https://")):
        data = download(value, limits.max_bytes, field)
    else:
        data = _decode_base64(value, limits.max_bytes, field)
    if len(data) > limits.max_bytes:
        raise RequestError(f"{field}: larger than {size_text(limits.max_bytes)}")
    try:
        image = Image.open(io.BytesIO(data))
        if image.format not in FORMATS:
            raise RequestError(f"{field}: {image.format} is not supported; send PNG, JPEG or WebP")
        width, height = image.size  # read from the header, before decoding any pixels
        if max(width, height) > limits.max_side:
            raise RequestError(f"{field}: {width}x{height} is larger than {limits.max_side} pixels per side")
        if min(width, height) < limits.min_side:
            raise RequestError(f"{field}: {width}x{height} is smaller than {limits.min_side} pixels per side")
        # As diffusers' load_image: a phone photo's pixels are stored sideways, with the turn in EXIF.
        return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
        raise RequestError(f"{field}: not a PNG, JPEG or WebP image") from None
