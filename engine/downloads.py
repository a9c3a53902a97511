"""Downloads a request names by URL, through runpod's SSRF-safe client.

Public addresses only (``RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS=1`` lifts that, for tests and
private networks), redirects re-checked, and the size capped while streaming, so a
request can never make the worker fetch an internal address or fill its memory or disk.
Every failure is a RequestError naming the request's field.
"""

from __future__ import annotations

import io
from typing import BinaryIO

from engine.errors import RequestError

TIMEOUT_S = 30
CHUNK = 1 << 16


def size_text(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 100_000 else f"{count / 1e3:.0f} KB"


def download_to(url: str, out: BinaryIO, max_bytes: int, field: str) -> int:
    """Streams ``url`` into ``out``; returns the bytes written."""
    import requests
    from runpod.serverless.utils.rp_ssrf import SSRFError, iter_content_capped, safe_get

    written = 0
    try:
        response = safe_get(url, timeout=TIMEOUT_S, max_bytes=max_bytes)
        with response:
            if response.status_code != 200:
                raise RequestError(f"{field}: download failed with HTTP {response.status_code}")
            for chunk in iter_content_capped(response, CHUNK, max_bytes):
                out.write(chunk)
                written += len(chunk)
    except SSRFError as error:
        if "size cap" in str(error):
            raise RequestError(f"{field}: larger than {size_text(max_bytes)}") from None
        raise RequestError(f"{field}: URL not allowed ({error})") from None
    except requests.RequestException as error:
        raise RequestError(f"{field}: download failed ({type(error).__name__})") from None
    return written


def download(url: str, max_bytes: int, field: str) -> bytes:
    buffer = io.BytesIO()
    download_to(url, buffer, max_bytes, field)
    return buffer.getvalue()
