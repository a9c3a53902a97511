"""The rules every file or folder name a request gives must meet before it reaches the file system.

A name is looked up under a folder of the volume (LoRA files, ControlNet folders); a NUL
byte, a control character or a name of thousands of characters would fail deep inside
``pathlib`` or the OS with a raw error, so they are refused here with the field named.
"""

from __future__ import annotations

import unicodedata

from engine.common.errors import RequestError

MAX_NAME_BYTES = 255
"""UTF-8 bytes a name may have: one file name's limit on common file systems (subfolders included here)."""


def check_name(name: str, field: str) -> None:
    """A RequestError under ``field`` when ``name`` is empty, too long, holds a control character
    (NUL included) or a lone surrogate (which no file system path can encode), or is ``.`` or ``..``."""
    if not name:
        raise RequestError(f"{field}: must not be empty")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise RequestError(f"{field}: at most {MAX_NAME_BYTES} bytes (UTF-8), got {size}")
    categories = {unicodedata.category(character) for character in name}
    if "Cc" in categories:
        raise RequestError(f"{field}: must not contain control characters (such as NUL or a line break)")
    if "Cs" in categories:
        raise RequestError(f"{field}: must not contain lone surrogates (it is not valid Unicode text)")
    if name in (".", ".."):
        raise RequestError(f"{field}: must name a file or folder, got {name!r}")
