"""How long a download may take and how slowly its server may send, for the job at hand.

The worker sets the limits for each job in a context variable (``download_limits``), and
admission narrows them to the request's own deadline (``limit_to_request``), so code that
downloads passes only the URL and ``engine.common.downloads`` reads them here.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class DownloadLimits:
    """How long a download may take and how slowly its server may send."""

    timeout_s: float = 60.0
    min_bytes_per_s: float = 50_000.0
    grace_s: float = 5.0
    """How long a download may run below the minimum rate before it is held to it (counted from the
    connection, so a server that is silent before its headers is held to it too)."""
    started: float | None = None
    """``time.monotonic()`` when the job began."""
    request_deadline: float | None = None
    """``time.monotonic()`` when the request's ``timeout_s`` runs out."""
    request_timeout_s: float | None = None


DEFAULT_LIMITS = DownloadLimits()
"""Outside a job (a direct call): the settings' defaults, with no request deadline."""
_limits: contextvars.ContextVar[DownloadLimits | None] = contextvars.ContextVar("download_limits", default=None)


def current_limits() -> DownloadLimits:
    return _limits.get() or DEFAULT_LIMITS


@contextlib.contextmanager
def download_limits(timeout_s: float, min_bytes_per_s: float, grace_s: float = 5.0) -> Iterator[None]:
    """Within: downloads follow the deployment's limits (the worker wraps each job in it)."""
    token = _limits.set(DownloadLimits(timeout_s, min_bytes_per_s, grace_s, started=time.monotonic()))
    try:
        yield
    finally:
        _limits.reset(token)


def limit_to_request(timeout_s: float) -> None:
    """Within the current ``download_limits``: downloads also end by the request's deadline, ``timeout_s``
    after the job began. Outside one it does nothing, so no deadline outlives its job."""
    limits = _limits.get()
    if limits is not None and limits.started is not None:
        _limits.set(replace(limits, request_deadline=limits.started + timeout_s, request_timeout_s=timeout_s))
