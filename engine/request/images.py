"""Input images for image-to-image, inpainting and ControlNets: base64 or an http(s) URL, checked before decoding.

URLs are fetched by ``engine.common.downloads`` (SSRF-safe, size capped). Every failure, the decoder's included, is a
RequestError naming the field (``image`` or ``mask``). A mask for ``padding_mask_crop`` is fitted to its image.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from engine.common.downloads import download, size_text
from engine.common.errors import RequestError

FORMATS = ("PNG", "JPEG", "WEBP", "MPO")
"""What Pillow calls the formats taken; MPO is a JPEG with more frames after it (many phones' photos),
read as its first frame, the JPEG."""

log = logging.getLogger(__name__)


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
    image = _opened(data, limits, field)
    width, height = image.size  # read from the header, before decoding any pixels
    if max(width, height) > limits.max_side:
        raise RequestError(f"{field}: {width}x{height} is larger than {limits.max_side} pixels per side")
    if min(width, height) < limits.min_side:
        raise RequestError(f"{field}: {width}x{height} is smaller than {limits.min_side} pixels per side")
    return _decoded(image, field)


def _opened(data: bytes, limits: ImageLimits, field: str) -> Image.Image:
    """The image with only its header read."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise RequestError(
            f"{field}: more than {2 * Image.MAX_IMAGE_PIXELS} pixels, past the image decoder's limit; "
            f"at most {limits.max_side} pixels per side"
        ) from None
    except UnidentifiedImageError:
        raise RequestError(f"{field}: not a PNG, JPEG or WebP image") from None
    except Exception as error:  # a header can be broken in as many ways as the pixels: see _decoded
        raise _undecodable(field, error) from None
    if image.format not in FORMATS:
        raise RequestError(f"{field}: {image.format} is not supported; send PNG, JPEG or WebP")
    return image


def _decoded(image: Image.Image, field: str) -> Image.Image:
    """The pixels, decoded in full here so that a damaged file fails as a request error.

    A decoder meets hostile bytes in many ways: OSError for truncated data, SyntaxError for a
    broken PNG chunk, ValueError for a text or color-profile chunk that inflates past Pillow's
    cap (a few KB that expand to megabytes), and others from metadata parsers. Every one of them
    is the file's fault, not the worker's.
    """
    try:
        # As diffusers' load_image: a phone photo's pixels are stored sideways, with the turn in EXIF.
        return ImageOps.exif_transpose(image).convert("RGB")
    except Exception as error:
        raise _undecodable(field, error) from None


def _undecodable(field: str, error: Exception) -> RequestError:
    log.info("%s: undecodable image (%s: %s)", field, type(error).__name__, error)
    return RequestError(f"{field}: the image is damaged or cannot be decoded (send PNG, JPEG or WebP)")


def mask_for_crop(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The mask at the image's ``size``, as ``padding_mask_crop`` needs it: the crop is found on the mask
    and cut from the image (and the result pasted back through the mask), so both share coordinates.
    Resized with Lanczos, as diffusers' mask processor resizes. An all-black mask has no region to crop
    around: it is refused before any work is done."""
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.LANCZOS)
    if mask.convert("L").getbbox() is None:
        raise RequestError("mask: the mask is empty (all black); padding_mask_crop needs a white region to crop around")
    return mask


def canny(image: Image.Image, low: float, high: float) -> Image.Image:
    """OpenCV's Canny edges of the image, white on black, as the RGB control image Canny ControlNets take."""
    import cv2

    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))
