"""Downloads a request names by URL, through runpod's SSRF-safe client.

Public addresses only (``RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS=1`` lifts that, for tests and
private networks), redirects re-checked, and the size capped while streaming, so a
request can never make the worker fetch an internal address or fill its memory or disk.

Time is bounded too: the worker serves one job at a time, so a server that answers slowly
must not hold it. A download ends by a total deadline (``DOWNLOAD_TIMEOUT_S``, and never after
the request's own ``timeout_s``) and fails once, after a grace period, the server sends less
than ``DOWNLOAD_MIN_BYTES_PER_S``. Every read blocks for at most a few seconds of silence,
and a server sending a byte at a time is cut off too: a watcher thread shuts down the
download's sockets when a rule breaks. The worker sets the limits for the request in a
context variable (see ``engine.common.download_limits``), so callers pass only the URL.

Every failure is a RequestError naming the request's field, with a fixed text per kind of
failure: the URL's user info and query string, the proxy's address and the server's words go
to the log (with URL secrets removed: see ``engine.common.logs``), never to the caller.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from engine.common.download_limits import DownloadLimits, current_limits
from engine.common.errors import RequestError

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
"""The longest one read may wait for data, within the deadline."""
CHUNK = 1 << 16
WATCH_EVERY_S = 0.1


def size_text(count: float) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 100_000 else f"{count / 1e3:.0f} KB"


def check_url(url: str, field: str) -> None:
    """Refuses what is not an http(s) URL with a host, before the client sees it: a parse error's own
    text would quote the request."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parses the port, raising ValueError when it is not a number in range
        if parts.hostname:
            parts.hostname.encode("idna")
    except ValueError:  # UnicodeError (a host name IDNA cannot encode) is a ValueError too
        raise RequestError(f"{field}: not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise RequestError(f"{field}: must be an http(s) URL")
    if not parts.hostname:
        raise RequestError(f"{field}: not a valid URL (it has no host)")


class _Watch:
    """One download's clock: the sockets it opens, shut down when the deadline passes or the server sends
    too slowly, which ends any read blocked on them."""

    def __init__(self, limits: DownloadLimits, field: str):
        now = time.monotonic()
        self.limits = limits
        self.field = field
        self.deadline = now + limits.timeout_s
        self.deadline_rule = f"the download took longer than {limits.timeout_s:g} s (DOWNLOAD_TIMEOUT_S)"
        if limits.request_deadline is not None and limits.request_deadline < self.deadline:
            self.deadline = limits.request_deadline
            self.deadline_rule = (
                f"the download did not end within the request's timeout_s ({limits.request_timeout_s:g} s)"
            )
        self.started = now
        self.received = 0
        self.broken: str | None = None
        self._sockets: list[tuple[socket.socket, int, Any]] = []
        self._lock = threading.Lock()
        self._done = threading.Event()

    def timeouts(self) -> tuple[float, float]:
        """Connect and read timeouts: neither may wait past the deadline."""
        left = max(self.deadline - time.monotonic(), 0.001)
        return min(CONNECT_TIMEOUT_S, left), min(READ_TIMEOUT_S, left)

    def opened(self, sock: socket.socket, address: Any) -> None:
        with self._lock:
            if self.broken is not None:  # a later address, or a redirect, after the time ran out
                raise ConnectionAbortedError(self.broken)
            self._sockets.append((sock, sock.fileno(), address))

    def failure(self) -> RequestError | None:
        """The rule the download broke, if it broke one; a read timeout set to end at the deadline
        counts as passing it, though it may come a moment before the watch notices."""
        if self.broken is None and time.monotonic() >= self.deadline - WATCH_EVERY_S:
            self.broken = self.deadline_rule
        return RequestError(f"{self.field}: {self.broken}") if self.broken is not None else None

    def _broken_rule(self) -> str | None:
        now = time.monotonic()
        if now >= self.deadline:
            return self.deadline_rule
        sending_s = now - self.started
        if sending_s >= self.limits.grace_s and self.received / sending_s < self.limits.min_bytes_per_s:
            rate = size_text(self.limits.min_bytes_per_s)
            return f"the server sent less than {rate}/s (DOWNLOAD_MIN_BYTES_PER_S)"
        return None

    def run(self) -> None:
        while not self._done.wait(WATCH_EVERY_S):
            rule = self._broken_rule()
            if rule is not None:
                self._break(rule)
                return

    def _break(self, rule: str) -> None:
        with self._lock:
            self.broken = rule
            log.warning("%s: download stopped: %s", self.field, rule)
            for sock, fileno, address in self._sockets:
                _shut_down(sock, fileno, address)

    def stop(self) -> None:
        self._done.set()


def _shut_down(sock: socket.socket, fileno: int, address: Any) -> None:
    """Ends a socket's connection, which wakes a read blocked on it. A TLS socket took over the file
    descriptor of the socket that connected, so that one is shut down through the descriptor, if it
    still leads to the same peer."""
    with contextlib.suppress(OSError):
        if sock.fileno() != -1:
            sock.shutdown(socket.SHUT_RDWR)
            return
        with socket.socket(fileno=os.dup(fileno)) as twin:
            if twin.getpeername()[:2] == tuple(address[:2]):
                twin.shutdown(socket.SHUT_RDWR)


_watch: contextvars.ContextVar[_Watch | None] = contextvars.ContextVar("download_watch", default=None)
_hook_lock = threading.Lock()
_hook_installed = False


def _on_audit(event: str, args: tuple[Any, ...]) -> None:
    """Python's audit event for ``socket.connect`` hands over every socket the download's thread opens,
    whatever the client does inside."""
    if event == "socket.connect":
        watch = _watch.get()
        if watch is not None:
            watch.opened(*args)


def _install_hook() -> None:
    global _hook_installed
    with _hook_lock:
        if not _hook_installed:
            sys.addaudithook(_on_audit)
            _hook_installed = True


@contextlib.contextmanager
def _watching(field: str) -> Iterator[_Watch]:
    _install_hook()
    watch = _Watch(current_limits(), field)
    token = _watch.set(watch)
    watcher = threading.Thread(target=watch.run, name="download-watch", daemon=True)
    watcher.start()
    try:
        yield watch
    finally:
        watch.stop()
        _watch.reset(token)
        watcher.join()


def _copy(response: Any, out: BinaryIO, max_bytes: int, watch: _Watch) -> int:
    """Writes the body to ``out`` as it arrives; each read returns what one socket read gave, so the
    received count the watch judges the rate by is current."""
    written = 0
    while watch.broken is None and (chunk := response.raw.read1(CHUNK, decode_content=True)):
        written += len(chunk)
        if written > max_bytes:
            raise RequestError(f"{watch.field}: larger than {size_text(max_bytes)}")
        out.write(chunk)
        watch.received = written
    return written


SSRF_RULES = (
    ("could not resolve host", "URL not allowed: its host does not resolve"),
    ("no addresses resolved", "URL not allowed: its host does not resolve"),
    ("no candidate addresses", "URL not allowed: its host does not resolve"),
    ("host ", "URL not allowed: its host is not a public address"),
    ("refusing to fetch", "URL not allowed: this worker does not download through a proxy"),
    ("blocked URL scheme", "URL not allowed: it redirects to a URL that is not http(s)"),
    ("URL has no host", "URL not allowed: it redirects to a URL with no host"),
    ("redirect without Location", "download failed: a redirect without a Location"),
    ("exceeded maximum redirects", "download failed: too many redirects"),
)
"""The SSRF client's refusals, by the fixed words its messages start with, in the caller's words: its
messages quote the URL and the proxy, user info and query included."""


def _refusal(error: Exception, field: str, max_bytes: int) -> RequestError:
    """The caller's message for a failed download; the log gets the error itself."""
    import requests
    import urllib3
    from runpod.serverless.utils.rp_ssrf import SSRFError

    log.warning("%s: download failed: %s: %s", field, type(error).__name__, error)
    text = str(error)
    if isinstance(error, SSRFError):
        if text.startswith("download exceeds size cap"):
            return RequestError(f"{field}: larger than {size_text(max_bytes)}")
        rule = next((rule for start, rule in SSRF_RULES if text.startswith(start)), "URL not allowed")
        return RequestError(f"{field}: {rule}")
    if isinstance(error, requests.ConnectTimeout):
        return RequestError(f"{field}: could not connect to the server within {CONNECT_TIMEOUT_S:g} s")
    if isinstance(error, (requests.Timeout, urllib3.exceptions.ReadTimeoutError)):
        return RequestError(f"{field}: the server sent nothing for {READ_TIMEOUT_S:g} s")
    if isinstance(error, requests.exceptions.SSLError):
        return RequestError(f"{field}: the server's TLS connection failed (its certificate, or the handshake)")
    if isinstance(error, requests.ConnectionError):
        return RequestError(f"{field}: could not connect to the server")
    if isinstance(error, requests.RequestException):
        return RequestError(f"{field}: download failed")
    if isinstance(error, ValueError):  # the first URL was checked: this is a redirect's
        return RequestError(f"{field}: the server redirected to an invalid URL")
    return RequestError(f"{field}: the download broke off")


def download_to(url: str, out: BinaryIO, max_bytes: int, field: str) -> int:
    """Streams ``url`` into ``out`` within the current download limits; returns the bytes written."""
    import requests
    import urllib3
    from runpod.serverless.utils.rp_ssrf import safe_get

    check_url(url, field)
    with _watching(field) as watch:
        try:
            response = safe_get(url, timeout=watch.timeouts(), max_bytes=max_bytes)  # type: ignore[arg-type]
            with response:
                if response.status_code != 200:
                    raise RequestError(f"{field}: download failed with HTTP {response.status_code}")
                written = _copy(response, out, max_bytes, watch)
        except (ValueError, requests.RequestException, urllib3.exceptions.HTTPError) as error:
            # SSRFError is a ValueError; a read the watch cut short fails in whatever way it happened to
            raise watch.failure() or _refusal(error, field, max_bytes) from None
        failure = watch.failure()  # a cut that looked like the end of the body
        if failure is not None:
            raise failure
    return written


def download(url: str, max_bytes: int, field: str) -> bytes:
    buffer = io.BytesIO()
    download_to(url, buffer, max_bytes, field)
    return buffer.getvalue()
