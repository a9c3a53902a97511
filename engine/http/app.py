"""The ASGI app of HTTP mode: RunPod's health route, the queue's job route, and OpenAI's images API.

- ``GET /ping``: RunPod's load balancer polls it on ``PORT_HEALTH`` and reads the status alone:
  200 healthy, 204 initializing, anything else unhealthy, and an unhealthy worker leaves the
  routing pool (docs.runpod.io/serverless/load-balancing/overview, "Health checks"). So: 204
  while the worker loads, 200 once it serves, 503 when it failed to start or a GPU fault ended it.
- ``POST /generate``: the body a queue request sends (``{"input": {...}}``), the response the
  queue returns (``{"status", "output", "metrics"}`` or ``{"status": "error", "error"}``), with
  an HTTP status by failure (400 the request, 5xx the worker).
- ``POST /v1/images/generations`` and ``/v1/images/edits``: see ``engine.http.openai``.
- ``GET /v1/models``: the one model served.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from engine.http import openai
from engine.http.errors import ApiError, field_of, status_for
from engine.http.limits import BodyLimit
from engine.http.service import Busy, Service
from engine.serving.worker import Answer

log = logging.getLogger(__name__)

STARTING_RETRY_AFTER_S = 10
MAX_FORM_PART_BYTES = 1_000_000
"""The largest text field of a multipart body (files are bounded by the body's limit)."""


def create_app(service: Service) -> Starlette:
    settings = service.settings

    async def ping(request: Request) -> Response:
        state = service.state
        if state == "ready":
            return JSONResponse({"status": "ready"})
        if state == "starting":
            return Response(status_code=204)
        return JSONResponse({"status": "failed", "error": service.reason}, status_code=503)

    async def generate(request: Request) -> Response:
        try:
            body = await _json_body(request)
            if "input" not in body:
                raise ApiError(400, "input: required: the job's input, as a queue request sends it", "input")
            answer = await _answer(service, body["input"])
        except ApiError as error:
            return JSONResponse({"status": "error", "error": error.message}, error.status, error.headers)
        return JSONResponse(answer.response, status_for(answer.error))

    async def generations(request: Request) -> Response:
        body = await _json_body(request)
        images, payload = openai.parse(body, settings)
        return await _images(service, images, payload)

    async def edits(request: Request) -> Response:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(400, "body: must be multipart/form-data with an image file and a prompt", None)
        _ready(service)
        async with request.form(max_files=2, max_fields=64, max_part_size=MAX_FORM_PART_BYTES) as form:
            images = [item for key in ("image", "image[]") for item in form.getlist(key)]
            if len(images) != 1 or not isinstance(images[0], UploadFile):
                raise ApiError(400, "image: one image file is required", "image", "invalid_value")
            masks = form.getlist("mask")
            if masks and (len(masks) > 1 or not isinstance(masks[0], UploadFile)):
                raise ApiError(400, "mask: at most one mask file", "mask", "invalid_value")
            fields = {key: _form_value(key, value) for key, value in form.multi_items() if isinstance(value, str)}
            edit, payload = openai.parse(fields, settings)
            payload["image"] = base64.b64encode(await images[0].read()).decode("ascii")
            if masks:
                payload["mask"] = openai.repaint_mask(await masks[0].read(), settings)
        return await _images(service, edit, payload)

    async def models(request: Request) -> Response:
        entry = {"id": settings.model, "object": "model", "created": 0, "owned_by": "trt-diffusion-worker"}
        return JSONResponse({"object": "list", "data": [entry]})

    async def api_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, ApiError)
        return JSONResponse(error.body(), error.status, error.headers)

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        return await api_error(request, ApiError(error.status_code, str(error.detail), None, None, error.headers))

    async def server_error(request: Request, error: Exception) -> Response:
        log.error("unexpected error in %s", request.url.path, exc_info=error)
        return JSONResponse(ApiError(500, "internal error: the worker logged the details").body(), 500)

    return Starlette(
        routes=[
            Route("/ping", ping, methods=["GET"]),
            Route("/generate", generate, methods=["POST"]),
            Route("/v1/images/generations", generations, methods=["POST"]),
            Route("/v1/images/edits", edits, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
        ],
        middleware=[Middleware(BodyLimit, max_bytes=settings.http_max_body_bytes)],
        exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error},
    )


def health_app(service: Service) -> Starlette:
    """``/ping`` alone, for a ``PORT_HEALTH`` other than ``PORT``."""
    app = create_app(service)
    app.router.routes = [route for route in app.router.routes if getattr(route, "path", None) == "/ping"]
    return app


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise ApiError(400, "body: not valid JSON", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "body: must be a JSON object", None, "invalid_json")
    return body


def _form_value(key: str, value: str) -> Any:
    """A multipart text field: the worker's own fields as JSON where they parse (``"seed": "7"`` is 7), the
    rest as text (OpenAI's ``n`` and ``output_compression`` are read as numbers by its schema)."""
    if key in openai.PASS_THROUGH:
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _ready(service: Service) -> None:
    if service.state == "starting":
        headers = {"Retry-After": str(STARTING_RETRY_AFTER_S)}
        raise ApiError(503, "the worker is starting; retry shortly", None, "worker_starting", headers)
    if service.state == "failed":
        raise ApiError(503, service.reason, None, "worker_failed")


async def _answer(service: Service, payload: Any, upload: bool = False) -> Answer:
    _ready(service)
    try:
        return await service.answer({"id": f"http-{secrets.token_hex(8)}", "input": payload}, upload)
    except Busy as busy:
        headers = {"Retry-After": str(busy.retry_after)}
        raise ApiError(429, f"{busy}; retry later", None, "rate_limit_exceeded", headers) from None


async def _images(service: Service, request: openai.ImagesRequest, payload: dict[str, Any]) -> Response:
    answer = await _answer(service, payload, upload=request.response_format == "url")
    if answer.error is not None:
        message = answer.response["error"]
        status = status_for(answer.error)
        if status >= 500:
            raise ApiError(status, message, None, None)
        param = field_of(message, openai.RENAMES)
        if param is not None and not message.startswith(f"{param}:"):  # the worker's name for an OpenAI field
            message = f"{param}: {message}"
        raise ApiError(status, message, param, "invalid_value")
    return JSONResponse(openai.images_response(answer.response, request))
