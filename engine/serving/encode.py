"""Encoding generated images for the response."""

from __future__ import annotations

import base64
import io

from PIL import Image

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


def encode_image(image: Image.Image, output_format: str, quality: int = 90) -> bytes:
    """The image file's bytes; quality applies to jpeg and webp, png is lossless."""
    buffer = io.BytesIO()
    options = {"optimize": False} if output_format == "png" else {"quality": quality}
    image.convert("RGB").save(buffer, format=PIL_FORMATS[output_format], **options)
    return buffer.getvalue()


def to_base64(data: bytes) -> str:
    """Plain base64 without a data-URI prefix, as RunPod clients expect."""
    return base64.b64encode(data).decode("ascii")
