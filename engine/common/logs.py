"""Structured JSON logs that carry the current request's id on every line, with URL secrets removed."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


URL = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?:[^\s@'\"<>]*@)?(?P<place>[^\s?#'\"<>]*)(?:[?#][^\s'\"<>]*)?"
)
"""A URL in free text: its scheme, user info (up to the last @: a password may hold a raw / or ?), host
and path, then query and fragment."""


PATH_QUERY = re.compile(r"(?P<place>(?:^|(?<=[\s'\"(]))/[^\s?#'\"<>]*)[?#][^\s'\"<>]*")
"""A path with a query or fragment on its own, as in an HTTP request line (urllib3 logs those at DEBUG)."""


def redact_urls(text: str) -> str:
    """``text`` with every URL cut to scheme://host/path, and every path to itself: user info (a proxy's
    password) and query strings (signed links' tokens) are where URLs carry secrets."""
    text = URL.sub(lambda match: match["scheme"] + match["place"], text)
    return PATH_QUERY.sub(lambda match: match["place"], text)


def _redacted(value: object) -> object:
    return redact_urls(value) if isinstance(value, str) else value


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, and extras; every URL in the
    message, the extras and the traceback cut to scheme://host/path (see ``redact_urls``)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": redact_urls(record.getMessage()),
        }
        current = request_id.get()
        if current is not None:
            entry["request_id"] = current
        fields = getattr(record, "fields", None)
        if fields:
            entry.update({key: _redacted(value) for key, value in fields.items()})
        if record.exc_info:
            entry["exception"] = redact_urls(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def _not_about_torchvision(record: logging.LogRecord) -> bool:
    """transformers notes on import that its image processors would like torchvision; no code path
    here uses an image processor, so the note is noise on every start."""
    return "requires torchvision" not in record.getMessage()


def configure_logging(level: str = "INFO") -> None:
    """JSON lines on stderr; the Hugging Face libraries' weight-loading progress bars only at DEBUG."""
    if level.upper() != "DEBUG":
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        diffusers_logging.disable_progress_bar()
    logging.getLogger("transformers.utils.import_utils").addFilter(_not_about_torchvision)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


@contextmanager
def request_context(job_id: str) -> Iterator[None]:
    token = request_id.set(job_id)
    try:
        yield
    finally:
        request_id.reset(token)
