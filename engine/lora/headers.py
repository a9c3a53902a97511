"""A safetensors file's header, checked before anything else reads the file: its length, tensor count,
dtypes, shapes and offsets, within caps a LoRA never comes near.

The checks run on a whole file (``check_safetensors``) or on a download's first bytes as they arrive
(``HeaderCheck``), so a file that is not a LoRA stops its download at once.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from safetensors import safe_open

from engine.common.downloads import size_text

LENGTH_BYTES = 8
MAX_HEADER_BYTES = 8 * 2**20
"""A header (the JSON table of tensors and metadata) larger than this is refused: an SDXL LoRA with
every text-encoder layer has a few hundred KB of it, kohya's training metadata adds at most a few
hundred more; the format allows 100 MB, which takes seconds to parse."""
MAX_TENSORS = 10_000
"""Tensors a LoRA file may hold: three per changed module (down, up, alpha) for every layer of an
SDXL UNet and both text encoders is under 4,000; 100,000 tiny tensors took 4.4 s to read."""
ITEM_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
}
"""The dtypes a LoRA's factors (floating point) and alphas (floating point or integer) come in."""


class HeaderError(ValueError):
    """The bytes are not a safetensors file a LoRA can be; the message is the rule broken."""


def parse_header(header: bytes, max_bytes: int | None) -> int:
    """Checks a safetensors header (the JSON after the length prefix); returns the bytes of tensor
    data it declares. ``max_bytes`` caps the whole file, where there is a cap."""
    try:
        table = json.loads(header)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise HeaderError("not a safetensors file (its header is not JSON)") from None
    if not isinstance(table, dict):
        raise HeaderError("not a safetensors file (its header is not a JSON object)")
    metadata = table.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderError("not a safetensors file (its __metadata__ is not a table of strings)")
    if len(table) > MAX_TENSORS:
        raise HeaderError(f"not a LoRA file (it has {len(table)} tensors, at most {MAX_TENSORS})")
    end = 0
    for key, entry in table.items():
        end = max(end, _tensor_end(key, entry))
    if max_bytes is not None and LENGTH_BYTES + len(header) + end > max_bytes:
        raise HeaderError(f"larger than {size_text(max_bytes)} (by its header)")
    return end


def _tensor_end(key: str, entry: Any) -> int:
    """Where one tensor's data ends, once its dtype, shape and offsets are checked."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise HeaderError(f"not a safetensors file (tensor {key!r} lacks its dtype, shape or data_offsets)")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in ITEM_BYTES:
        raise HeaderError(f"not a LoRA file (tensor {key!r} is {dtype}; a LoRA holds {', '.join(ITEM_BYTES)})")
    numbers = [*shape, *offsets] if isinstance(shape, list) and isinstance(offsets, list) else None
    if numbers is None or len(offsets) != 2 or not all(type(n) is int and n >= 0 for n in numbers):
        raise HeaderError(f"not a safetensors file (tensor {key!r} has no valid shape and data_offsets)")
    begin, end = offsets
    if end - begin != math.prod(shape) * ITEM_BYTES[dtype]:
        raise HeaderError(f"not a safetensors file (tensor {key!r}'s data_offsets do not fit its shape)")
    return end


class HeaderCheck:
    """Checks a safetensors header as the file's first bytes arrive, and keeps only those bytes."""

    def __init__(self, max_bytes: int | None):
        self.max_bytes = max_bytes
        self.done = False
        self._head = bytearray()

    def feed(self, data: bytes) -> None:
        """Raises HeaderError as soon as the bytes seen so far break a rule."""
        if self.done:
            return
        self._head += data[: max(0, LENGTH_BYTES + MAX_HEADER_BYTES - len(self._head))]
        if len(self._head) < LENGTH_BYTES:
            return
        (length,) = struct.unpack("<Q", self._head[:LENGTH_BYTES])
        if length < 2 or length > MAX_HEADER_BYTES:
            raise HeaderError(f"not a safetensors file (a header of {length} bytes; at most {MAX_HEADER_BYTES})")
        if len(self._head) >= LENGTH_BYTES + length:
            parse_header(bytes(self._head[LENGTH_BYTES : LENGTH_BYTES + length]), self.max_bytes)
            self.done = True
            self._head = bytearray()

    def finish(self) -> None:
        """Raises HeaderError when the file ended before its header did."""
        if not self.done:
            raise HeaderError("not a safetensors file (it ends inside its header)")


def check_safetensors(path: Path, max_bytes: int | None = None) -> None:
    """Raises HeaderError unless ``path`` is a safetensors file within the header caps whose tensors
    safetensors itself can open (it checks that the data matches the header)."""
    check = HeaderCheck(max_bytes)
    with path.open("rb") as handle:
        while not check.done and (data := handle.read(1 << 16)):
            check.feed(data)
    check.finish()
    try:
        with safe_open(path, framework="pt") as handle:
            handle.keys()
    except Exception:  # safetensors raises several untyped errors for a bad file
        raise HeaderError("not a safetensors file (its tensors do not match its header)") from None
