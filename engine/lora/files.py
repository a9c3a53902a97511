"""Where a request's LoRA files come from: a name under ``LORA_DIR``, or a URL downloaded once.

Only safetensors files are read: pickle formats (``.ckpt``, ``.pt``, ``.bin``) can run code
when loaded. A download is written to a private file, checked, and renamed to its sha256
under ``LORA_DIR/cache``, so a crash leaves nothing half-written and the next request for
the same URL reads it from there.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from safetensors import safe_open

from engine.downloads import download_to
from engine.errors import RequestError

SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
CACHE = "cache"
HASH_CHUNK = 16 * 2**20
LISTED_NAMES = 10


@dataclass(frozen=True)
class LoraFile:
    label: str
    """The name or URL as the request gave it."""
    path: Path
    sha256: str


class _HashingWriter:
    """A file writer that hashes what goes through it."""

    def __init__(self, out: BinaryIO):
        self.out = out
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return self.out.write(data)


def is_safetensors(path: Path) -> bool:
    """The header parses as safetensors (read without touching the tensors)."""
    try:
        with safe_open(path, framework="pt") as handle:
            handle.keys()
    except Exception:  # safetensors raises several untyped errors for a bad header
        return False
    return True


class LoraFiles:
    """Resolves request entries to local safetensors files with their sha256."""

    def __init__(self, root: Path, max_bytes: int):
        self.root = root
        self.max_bytes = max_bytes
        self._digests: dict[tuple[Path, int, int], str] = {}
        self._lock = threading.Lock()

    def by_name(self, name: str, field: str) -> LoraFile:
        path = Path(name)
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise RequestError(f"{field}: {path.suffix} files are refused (pickle can run code); use .safetensors")
        if path.suffix.lower() != SUFFIX:
            path = path.with_name(path.name + SUFFIX)
        root = self.root.resolve()
        target = (root / path).resolve()
        if path.is_absolute() or not target.is_relative_to(root):
            raise RequestError(f"{field}: must name a file inside the LoRA folder, got {name!r}")
        if not target.is_file():
            raise RequestError(f"{field}: no LoRA {name!r} in {self.root}{self._available()}")
        if not is_safetensors(target):
            raise RequestError(f"{field}: {name!r} is not a safetensors file")
        return LoraFile(name, target, self._digest(target))

    def by_url(self, url: str, field: str) -> LoraFile:
        if not url.startswith(("https://", "http://")):
            raise RequestError(f"{field}: must be an http(s) URL")
        cache = self.root / CACHE
        index = cache / f"url-{hashlib.sha256(url.encode()).hexdigest()}"
        with contextlib.suppress(FileNotFoundError):
            sha256 = index.read_text().strip()
            cached = cache / f"{sha256}{SUFFIX}"
            if cached.is_file():
                return LoraFile(url, cached, sha256)
        cache.mkdir(parents=True, exist_ok=True)
        partial = cache / f".partial-{uuid.uuid4().hex}"
        try:
            with partial.open("wb") as out:
                writer = _HashingWriter(out)
                download_to(url, writer, self.max_bytes, field)  # type: ignore[arg-type]
                out.flush()
                os.fsync(out.fileno())
            if not is_safetensors(partial):
                raise RequestError(f"{field}: the download is not a safetensors file")
            sha256 = writer.hash.hexdigest()
            os.replace(partial, cache / f"{sha256}{SUFFIX}")
            _write_atomically(index, sha256)
        finally:
            partial.unlink(missing_ok=True)
        return LoraFile(url, cache / f"{sha256}{SUFFIX}", sha256)

    def _digest(self, path: Path) -> str:
        """sha256 of a named file, computed once per version of the file."""
        stat = path.stat()
        key = (path, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key not in self._digests:
                digest = hashlib.sha256()
                with path.open("rb") as handle:
                    while chunk := handle.read(HASH_CHUNK):
                        digest.update(chunk)
                self._digests[key] = digest.hexdigest()
            return self._digests[key]

    def _available(self) -> str:
        if not self.root.is_dir():
            return " (the folder does not exist)"
        names = sorted(
            str(path.relative_to(self.root).with_suffix(""))
            for path in self.root.rglob(f"*{SUFFIX}")
            if CACHE not in path.relative_to(self.root).parts
        )
        if not names:
            return " (it holds no .safetensors files)"
        more = f", and {len(names) - LISTED_NAMES} more" if len(names) > LISTED_NAMES else ""
        return f" (it has: {', '.join(names[:LISTED_NAMES])}{more})"


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f".partial-{uuid.uuid4().hex}")
    partial.write_text(text)
    os.replace(partial, path)
