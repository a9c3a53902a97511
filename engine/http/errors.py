"""HTTP status codes for the worker's failures, and OpenAI's error shape.

OpenAI's API answers an error with ``{"error": {"message", "type", "param", "code"}}``; its
clients read ``message`` and raise by status (``BadRequestError`` for 400, ``RateLimitError``
for 429...). ``param`` names the field at fault, in the route's own names.
"""

from __future__ import annotations

import re
from typing import Any

from engine.common.errors import DeadlineExceeded, NonFiniteOutput, OutputTooLarge, RequestError
from engine.common.faults import is_out_of_memory

FIELD = re.compile(r"([a-z_]+)(?:\[\d+\])?[.:\[]")
"""The field a worker's error message starts with: ``num_images: ...``, ``loras[0].name: ...``."""


class ApiError(Exception):
    """An error answered in OpenAI's shape with its status and headers."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 429:
            kind = "rate_limit_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def status_for(error: Exception | None) -> int:
    """The status of a job's answer: 200, the caller's fault (4xx), or the worker's (5xx)."""
    if error is None:
        return 200
    if isinstance(error, (RequestError, OutputTooLarge)):
        return 400
    if isinstance(error, NonFiniteOutput):
        return 422
    if isinstance(error, DeadlineExceeded):
        return 504
    if is_out_of_memory(error):
        return 503
    return 500


def field_of(message: str, renames: dict[str, str]) -> str | None:
    """The first field a worker's message names, renamed to the route's name for it."""
    found = FIELD.match(message)
    if found is None:
        return None
    return renames.get(found.group(1), found.group(1))
