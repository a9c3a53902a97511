"""URL downloads end in bounded time, whatever the server does, and their errors and logs keep URL secrets.

The servers here are real sockets on 127.0.0.1 that send a byte every 0.2 s: in the body, in the
status line, or inside a TLS record, so every phase of a download is held to the deadline.
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import io
import ipaddress
import logging
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import runpod.serverless.utils.rp_ssrf  # noqa: F401 - imported here, not inside the first timed download

from engine.common.download_limits import download_limits, limit_to_request
from engine.common.downloads import download, download_to
from engine.common.errors import RequestError
from engine.common.logs import JsonFormatter

DRIP_EVERY_S = 0.2
SERVER_GIVES_UP_S = 30.0
"""A drip server stops after this long, so a download that is never cut off fails its timing instead of hanging."""
MARGIN_S = 2.0

BODY = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 1000000\r\n\r\n"
STATUS = b"HTTP/1.1 200 OK\r\n"
"""The headers that follow never end."""
TLS_RECORD = b"\x16\x03\x03\x40\x00"
"""A TLS handshake record header announcing 16 KB, which the client waits for."""


@pytest.fixture
def allow_loopback(monkeypatch):
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "1")


@pytest.fixture
def tls(tmp_path, monkeypatch) -> ssl.SSLContext:
    """A server context with a self-signed certificate for 127.0.0.1, which the download client trusts."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert_file))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context


@pytest.fixture
def drip_server() -> Iterator[Callable[..., str]]:
    """Starts servers that answer any connection with ``prelude``, then a byte every 0.2 s (over TLS
    when given a context)."""
    servers: list[socketserver.ThreadingTCPServer] = []

    class Drip(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            started = time.monotonic()
            try:
                connection = self.request
                if self.server.tls is not None:  # type: ignore[attr-defined]
                    connection = self.server.tls.wrap_socket(connection, server_side=True)  # type: ignore[attr-defined]
                connection.recv(65536)
                connection.sendall(self.server.prelude)  # type: ignore[attr-defined]
                while time.monotonic() - started < SERVER_GIVES_UP_S:
                    connection.sendall(b"x")
                    time.sleep(DRIP_EVERY_S)
            except OSError:
                return

    def start(prelude: bytes, tls: ssl.SSLContext | None = None) -> str:
        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Drip)
        server.daemon_threads = True
        server.prelude = prelude  # type: ignore[attr-defined]
        server.tls = tls  # type: ignore[attr-defined]
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def timed_error(url: str) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(RequestError) as caught:
        download(url, 10_000_000, "image")
    return str(caught.value), time.monotonic() - started


@pytest.mark.parametrize(
    ("prelude", "scheme"),
    [(BODY, "http"), (STATUS, "http"), (TLS_RECORD, "https")],
    ids=["body", "headers", "tls-handshake"],
)
def test_a_server_sending_a_byte_at_a_time_is_cut_off_at_the_deadline(drip_server, allow_loopback, prelude, scheme):
    url = f"{scheme}://{drip_server(prelude)}/fox.png"
    with download_limits(timeout_s=1.5, min_bytes_per_s=0):
        message, took = timed_error(url)
    assert message == "image: the download took longer than 1.5 s (DOWNLOAD_TIMEOUT_S)"
    assert 1.4 < took < 1.5 + MARGIN_S


def test_a_tls_server_sending_its_headers_a_byte_at_a_time_is_cut_off_at_the_deadline(drip_server, tls, allow_loopback):
    """Every TLS record brings a byte, so no read ever times out: only shutting the socket down ends it."""
    url = f"https://{drip_server(STATUS, tls)}/fox.png"
    with download_limits(timeout_s=1.5, min_bytes_per_s=0):
        message, took = timed_error(url)
    assert message == "image: the download took longer than 1.5 s (DOWNLOAD_TIMEOUT_S)"
    assert 1.4 < took < 1.5 + MARGIN_S


def test_the_request_timeout_shortens_the_deadline(drip_server, allow_loopback):
    url = f"http://{drip_server(BODY)}/fox.png"
    with download_limits(timeout_s=60, min_bytes_per_s=0):
        limit_to_request(1.0)
        message, took = timed_error(url)
    assert message == "image: the download did not end within the request's timeout_s (1 s)"
    assert took < 1.0 + MARGIN_S


def test_a_server_below_the_minimum_rate_is_cut_off_after_the_grace_period(drip_server, allow_loopback):
    url = f"http://{drip_server(BODY)}/fox.png"
    with download_limits(timeout_s=60, min_bytes_per_s=1000, grace_s=1.0):
        message, took = timed_error(url)
    assert message == "image: the server sent less than 1 KB/s (DOWNLOAD_MIN_BYTES_PER_S)"
    assert 1.0 < took < 1.0 + MARGIN_S


def test_a_server_that_sends_its_headers_a_byte_at_a_time_is_held_to_the_minimum_rate(drip_server, allow_loopback):
    """The rate counts from the connection: a server that never gets past its headers is cut off
    after the grace period, not at the read timeout or the deadline."""
    url = f"http://{drip_server(STATUS)}/fox.png"
    with download_limits(timeout_s=60, min_bytes_per_s=1000, grace_s=1.0):
        message, took = timed_error(url)
    assert message == "image: the server sent less than 1 KB/s (DOWNLOAD_MIN_BYTES_PER_S)"
    assert 1.0 < took < 1.0 + MARGIN_S


@pytest.fixture
def file_server() -> Iterator[str]:
    """Serves /fox.png (2 KB), /chunked.png (1 MB in chunks, with no Content-Length), and redirects /away
    to a URL with no host and a token in its query."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # for chunked transfer encoding

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            if self.path.startswith("/chunked"):
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Connection", "close")
                self.end_headers()
                with contextlib.suppress(OSError):  # the client hangs up once past its cap
                    for _ in range(64):
                        self.wfile.write(b"4000\r\n" + b"p" * 0x4000 + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                return
            if self.path.startswith("/away"):
                self.send_response(302)
                self.send_header("Location", "https:///x.png?token=SECRET-TOKEN")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", "2000")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"p" * 2000)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_fast_download_within_the_limits_is_whole(file_server, allow_loopback):
    with download_limits(timeout_s=5, min_bytes_per_s=1_000_000, grace_s=1.0):
        assert download(f"{file_server}/fox.png", 10_000, "image") == b"p" * 2000


def test_a_chunked_download_with_no_length_is_cut_off_at_the_cap(file_server, allow_loopback):
    """No Content-Length to refuse it by: the cap must hold while the body streams."""
    out = io.BytesIO()
    with pytest.raises(RequestError) as caught, download_limits(timeout_s=5, min_bytes_per_s=1000, grace_s=1.0):
        download_to(f"{file_server}/chunked.png", out, 100_000, "image")
    assert str(caught.value) == "image: larger than 0.1 MB"
    assert out.tell() <= 100_000, "nothing past the cap is kept"
    with download_limits(timeout_s=5, min_bytes_per_s=1000, grace_s=1.0):
        assert download(f"{file_server}/chunked.png", 2_000_000, "image") == b"p" * (64 * 0x4000)


@pytest.fixture
def engine_log() -> Iterator[io.StringIO]:
    """The engine's log lines as the worker writes them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("engine")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(level)


def error_of(url: str) -> str:
    with pytest.raises(RequestError) as caught:
        download(url, 10_000, "image")
    return str(caught.value)


def test_a_proxy_password_reaches_neither_the_caller_nor_the_log(monkeypatch, engine_log):
    monkeypatch.setenv("HTTP_PROXY", "http://user:PROXY-PASS@127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    message = error_of("http://example.com/fox.png?token=SECRET-TOKEN")
    assert message == "image: URL not allowed: this worker does not download through a proxy"
    logged = engine_log.getvalue()
    assert "refusing to fetch http://example.com/fox.png through proxy http://127.0.0.1:9" in logged
    assert "PROXY-PASS" not in logged and "SECRET-TOKEN" not in logged


def test_a_redirect_to_a_url_with_no_host_is_named_without_echoing_it(file_server, allow_loopback, engine_log):
    assert (
        error_of(f"{file_server}/away?token=FIRST-TOKEN")
        == "image: URL not allowed: it redirects to a URL with no host"
    )
    logged = engine_log.getvalue()
    assert "URL has no host: https:///x.png" in logged
    assert "SECRET-TOKEN" not in logged and "FIRST-TOKEN" not in logged


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://a:CUDA driver/x.png", "image: not a valid URL"),
        ("https://a:illegal memory access/x.png", "image: not a valid URL"),
        ("http://a:99999/x.png", "image: not a valid URL"),
        ("http://[::1/x.png", "image: not a valid URL"),
        ("http://" + "a" * 64 + ".com/x.png", "image: not a valid URL"),
        ("http:///x.png?token=SECRET-TOKEN", "image: not a valid URL (it has no host)"),
        ("ftp://example.com/x.png", "image: must be an http(s) URL"),
    ],
)
def test_urls_that_do_not_parse_are_request_errors_that_quote_nothing(url, message):
    assert error_of(url) == message


def test_loopback_sockets_are_refused_without_the_private_address_switch(drip_server):
    assert error_of(f"http://{drip_server(BODY)}/fox.png") == "image: URL not allowed: its host is not a public address"


def test_nothing_listening_is_a_connection_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "1")
        assert error_of(f"http://127.0.0.1:{port}/x.png") == "image: could not connect to the server"


def test_the_worker_holds_its_downloads_to_the_setting_and_to_the_request_timeout(
    drip_server, allow_loopback, make_settings
):
    from engine.serving.worker import Worker

    worker = Worker(make_settings(backend="torch", download_timeout_s=1.5, download_min_bytes_per_s=0))
    url = f"http://{drip_server(BODY)}/fox.png"
    for timeout_s, message in [
        (None, "image: the download took longer than 1.5 s (DOWNLOAD_TIMEOUT_S)"),
        (1, "image: the download did not end within the request's timeout_s (1 s)"),
    ]:
        payload = {"prompt": "a fox", "num_inference_steps": 2, "image": url}
        started = time.monotonic()
        response = worker.handle({"id": "slow", "input": {**payload, "timeout_s": timeout_s}})
        took = time.monotonic() - started
        assert response == {"status": "error", "error": message, "request_id": "slow"}
        assert took < (timeout_s or 1.5) + MARGIN_S
    assert worker.handle({"id": "next", "input": {"prompt": "a fox", "num_inference_steps": 2}})["status"] == "success"


def test_a_certificate_the_worker_does_not_trust_is_named(drip_server, allow_loopback, tls, monkeypatch):
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    url = f"https://{drip_server(STATUS, tls)}/fox.png"
    assert error_of(url) == "image: the server's TLS connection failed (its certificate, or the handshake)"
