"""OpenAI's images API (``/v1/images/generations``, ``/v1/images/edits``) mapped to the worker's request.

OpenAI's fields map onto the worker's: ``n`` is ``num_images``, ``size`` ``WxH`` is ``width`` and
``height`` (``auto``: the model's native size), ``output_compression`` is ``quality`` for jpeg and
webp. ``quality``, ``style``, ``background``, ``moderation`` and ``user`` are OpenAI model settings
with no meaning here: accepted and ignored. Any other field of the worker's request
(``negative_prompt``, ``seed``, ``num_inference_steps``, ``guidance_scale``, ``loras``...) passes
through as it is; a field neither API knows is refused by name.
"""

from __future__ import annotations

import base64
import io
import re
import time
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.http.errors import ApiError
from engine.request.rules import shown_key
from engine.request.schema import GenerateRequest
from engine.settings import Settings

IGNORED = frozenset({"quality", "style", "background", "moderation", "user"})
"""OpenAI fields accepted and ignored: they choose among OpenAI's own models' settings."""

MAPPED = frozenset({"prompt", "num_images", "width", "height", "output_format", "quality", "image", "mask"})
"""The worker's fields that OpenAI's fields set; a request cannot set them under the worker's names."""

PASS_THROUGH = frozenset(GenerateRequest.model_fields) - MAPPED

RENAMES = {"num_images": "n", "width": "size", "height": "size", "quality": "output_compression"}
"""The worker's field names in its error messages, as the OpenAI request names them."""

SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")
MASK_FORMATS = ("PNG", "WEBP")


class ImagesRequest(BaseModel):
    """The OpenAI fields of both routes; the worker's own fields come as extras."""

    model_config = ConfigDict(extra="allow")

    prompt: str
    model: str | None = None
    n: int = 1
    size: str = "auto"
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    stream: bool = False


def parse(body: dict[str, Any], settings: Settings) -> tuple[ImagesRequest, dict[str, Any]]:
    """The OpenAI request and the worker's payload for it; ApiError (400 or 404) names the field at fault."""
    try:
        request = ImagesRequest.model_validate(body)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        param = str(first["loc"][0]) if first["loc"] else None
        raise ApiError(400, f"{param or 'body'}: {first['msg']}", param, "invalid_value") from None
    extras = dict(request.model_extra or {})
    for name in sorted(extras):
        if name not in PASS_THROUGH and name not in IGNORED:
            raise ApiError(400, f"{shown_key(name)}: unknown field", shown_key(name), "unknown_parameter")
    check_model(request.model, settings.model)
    if request.stream:
        raise ApiError(400, "stream: streaming is not supported; send stream false", "stream", "unsupported_value")
    if request.response_format == "url" and not settings.bucket_configured:
        raise ApiError(
            400,
            "response_format: url needs a bucket (BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, "
            "BUCKET_SECRET_ACCESS_KEY); use b64_json",
            "response_format",
            "unsupported_value",
        )
    payload: dict[str, Any] = {name: value for name, value in extras.items() if name in PASS_THROUGH}
    payload.update(prompt=request.prompt, num_images=request.n, output_format=request.output_format)
    if request.size != "auto":
        found = SIZE.fullmatch(request.size)
        if found is None:
            raise ApiError(400, "size: must be 'auto' or WIDTHxHEIGHT, such as 512x512", "size", "invalid_value")
        payload["width"], payload["height"] = int(found.group(1)), int(found.group(2))
    if request.output_compression is not None and request.output_format != "png":
        payload["quality"] = max(request.output_compression, 1)
    return request, payload


def check_model(asked: str | None, served: str) -> None:
    """A request may name the served model (its MODEL, or that path's last part) or none."""
    if asked is None or asked in {served, served.rstrip("/").rpartition("/")[2]}:
        return
    raise ApiError(404, f"model: this endpoint serves {served!r}, not {asked!r}", "model", "model_not_found")


def images_response(response: dict[str, Any], request: ImagesRequest) -> dict[str, Any]:
    """OpenAI's response from the worker's: ``created``, ``data`` (``b64_json`` or ``url``, with the
    image's ``seed``), ``output_format``, ``size``, and the worker's ``metrics``."""
    data = []
    for item in response["output"]:
        if request.response_format == "url" and "url" not in item:
            raise ApiError(502, "the bucket upload failed; the worker's log has the reason", None, "upload_failed")
        if request.response_format == "b64_json" and "image" not in item:  # too large inline: in the bucket
            raise ApiError(400, "the images are too large for b64_json; ask for response_format url", "response_format")
        key = "url" if request.response_format == "url" else "b64_json"
        data.append({key: item["url" if key == "url" else "image"], "seed": item["seed"]})
    metrics = response["metrics"]
    return {
        "created": int(time.time()),
        "data": data,
        "output_format": request.output_format,
        "size": metrics["image_size"],
        "metrics": metrics,
    }


def repaint_mask(data: bytes, settings: Settings) -> str:
    """OpenAI's mask (transparent pixels are edited) as this worker's (white repaints), base64 PNG."""
    if len(data) > settings.max_input_image_bytes:
        raise ApiError(400, f"mask: larger than {settings.max_input_image_bytes} bytes", "mask", "invalid_value")
    try:
        mask = Image.open(io.BytesIO(data))
        if mask.format not in MASK_FORMATS:
            raise ApiError(400, "mask: must be a PNG or WebP image with an alpha channel", "mask", "invalid_value")
        if max(mask.size) > settings.max_image_side:
            raise ApiError(400, f"mask: sides must be at most {settings.max_image_side}", "mask", "invalid_value")
        if "A" not in mask.getbands() and "transparency" not in mask.info:
            raise ApiError(
                400, "mask: needs an alpha channel; its fully transparent pixels are edited", "mask", "invalid_value"
            )
        alpha = mask.convert("RGBA").getchannel("A")
    except ApiError:
        raise
    except Exception:  # the decoder meets hostile bytes in many ways (see engine.request.images)
        raise ApiError(400, "mask: not a PNG or WebP image, or damaged", "mask", "invalid_value") from None
    out = io.BytesIO()
    alpha.point(lambda value: 255 if value == 0 else 0).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode("ascii")
