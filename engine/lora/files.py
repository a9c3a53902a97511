"""Where a request's LoRA files come from: a name under ``LORA_DIR``, or a URL downloaded once.

Only safetensors files are read: pickle formats (``.ckpt``, ``.pt``, ``.bin``) can run code
when loaded. The header is checked (``engine.lora.headers``) before anything else reads the
file, and for a download as soon as its first bytes arrive, so a file that is not a LoRA
stops the download at once. A download is written to a private file, checked, and renamed
to its sha256 under ``LORA_DIR/cache``, so a crash leaves nothing half-written and the next
request for the same URL reads it from there. That cache is shared by every worker on the
volume and kept under its size cap by least recently used eviction (a use touches the
file). A URL refused for its content is remembered for a while, so a client retrying it
does not make the worker fetch it again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from engine.common.downloads import download_to, size_text
from engine.common.errors import RequestError
from engine.common.names import check_name
from engine.lora.headers import HeaderCheck, HeaderError, check_safetensors

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
CACHE = "cache"
PARTIAL = ".partial-"
URL_INDEX = "url-"
HASH_CHUNK = 16 * 2**20

REFUSAL_TTL_S = 600.0
MAX_REFUSALS = 256
STALE_PARTIAL_S = 3600.0
"""A private download file this much older than the newest file in the cache was left by a crash."""


@dataclass(frozen=True)
class LoraFile:
    label: str
    """The name or URL as the request gave it."""
    path: Path
    sha256: str
    from_url: bool = False


def shown(label: str) -> str:
    """How an error names a file: a name as given, a URL without credentials, query or fragment."""
    if not label.startswith(("https://", "http://")):
        return repr(label)
    parts = urlsplit(label)
    return repr(f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}")


class _CheckingWriter:
    """A file writer that hashes what goes through it and checks the header as soon as it arrives:
    the RequestError it raises stops the download."""

    def __init__(self, out: BinaryIO, check: HeaderCheck, refuse: Callable[[str], RequestError]):
        self.out = out
        self.check = check
        self.refuse = refuse
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        try:
            self.check.feed(data)
        except HeaderError as error:
            raise self.refuse(str(error)) from None
        self.hash.update(data)
        return self.out.write(data)


class Refusals:
    """Rules broken by what a key (a URL, a file's sha256) named, kept ``ttl_s`` seconds, at most ``size``."""

    def __init__(
        self, size: int = MAX_REFUSALS, ttl_s: float = REFUSAL_TTL_S, clock: Callable[[], float] = time.monotonic
    ):
        self.size = size
        self.ttl_s = ttl_s
        self.clock = clock
        self._rules: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            found = self._rules.get(key)
            if found is None or self.clock() - found[0] > self.ttl_s:
                self._rules.pop(key, None)
                return None
            return found[1]

    def add(self, key: str, rule: str) -> None:
        with self._lock:
            self._rules[key] = (self.clock(), rule)
            self._rules.move_to_end(key)
            while len(self._rules) > self.size:
                self._rules.popitem(last=False)


def named_file(root: Path, name: str, field: str, kind: str) -> Path:
    """The safetensors file ``name`` means under ``root`` (the suffix may be left out), refused under ``field``
    when it breaks the name rules, is a pickle, lies outside ``root`` or is not there; ``kind`` names what the
    folder holds (LoRA, IP-Adapter) in the refusal."""
    check_name(name, field)
    path = Path(name)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise RequestError(f"{field}: {path.suffix} files are refused (pickle can run code); use .safetensors")
    if path.suffix.lower() != SUFFIX:
        path = path.with_name(path.name + SUFFIX)
    resolved_root = root.resolve()
    target = (resolved_root / path).resolve()
    if path.is_absolute() or {".", ".."} & set(name.split("/")) or not target.is_relative_to(resolved_root):
        raise RequestError(f"{field}: must name a file inside the {kind} folder, got {name!r}")
    if not target.is_file():
        log.info("%s: no %s %r under %s", field, kind, name, root)
        raise RequestError(f"{field}: no {kind} named {name!r}")
    return target


class FileDigests:
    """sha256 of named files, each computed once per version of the file (its size and mtime)."""

    def __init__(self) -> None:
        self._digests: dict[tuple[Path, int, int], str] = {}
        self._lock = threading.Lock()

    def of(self, path: Path) -> str:
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


class LoraFiles:
    """Resolves request entries to local safetensors files with their sha256; URL downloads are kept
    under ``LORA_DIR/cache`` up to ``cache_bytes``."""

    def __init__(self, root: Path, max_bytes: int, cache_bytes: int = 4 * 10**9):
        self.root = root
        self.max_bytes = max_bytes
        self.cache_bytes = cache_bytes
        self.refused = Refusals()
        self._digests = FileDigests()
        self._lock = threading.Lock()

    def by_name(self, name: str, field: str) -> LoraFile:
        target = self.locate(name, field)
        return LoraFile(name, target, self._digests.of(target))

    def locate(self, name: str, field: str) -> Path:
        """The file a ``name`` entry means, checked without reading it whole (name rules, inside the
        folder, a safetensors header): admission runs this before any download."""
        target = named_file(self.root, name, field, "LoRA")
        try:
            check_safetensors(target)
        except HeaderError as error:
            raise RequestError(f"{field}: {name!r} is {error}") from None
        return target

    def by_url(self, url: str, field: str, in_use: Collection[Path] = ()) -> LoraFile:
        """The file at ``url``, from the cache or downloaded into it; ``in_use`` (the request's other
        files) is never evicted to make room."""
        if not url.startswith(("https://", "http://")):
            raise RequestError(f"{field}: must be an http(s) URL")
        rule = self.refused.get(url)
        if rule is not None:
            raise RequestError(f"{field}: {rule}")
        cache = self.root / CACHE
        index = cache / f"{URL_INDEX}{hashlib.sha256(url.encode()).hexdigest()}"
        with contextlib.suppress(FileNotFoundError):
            sha256 = index.read_text().strip()
            cached = cache / f"{sha256}{SUFFIX}"
            os.utime(cached)  # its last use, for eviction; FileNotFoundError once it is evicted
            os.utime(index)
            return LoraFile(url, cached, sha256, from_url=True)
        sha256 = self._download(url, field, cache)
        stored = cache / f"{sha256}{SUFFIX}"
        _write_atomically(index, sha256)
        self._evict({*in_use, stored})
        return LoraFile(url, stored, sha256, from_url=True)

    def refuse_url(self, url: str, rule: str) -> None:
        """Remembers that ``url``'s file broke ``rule`` (checked by the caller, e.g. against the model)."""
        self.refused.add(url, rule)

    def _download(self, url: str, field: str, cache: Path) -> str:
        """Downloads ``url`` into the cache, checked; its sha256. A file refused for its content is
        remembered, and stops the download as soon as its header shows it."""

        def refuse(rule: str) -> RequestError:
            rule = f"the download is {rule}"
            self.refused.add(url, rule)
            log.info("%s: refused %s: %s", field, shown(url), rule)
            return RequestError(f"{field}: {rule}")

        cache.mkdir(parents=True, exist_ok=True)
        partial = cache / f"{PARTIAL}{uuid.uuid4().hex}"
        try:
            with partial.open("wb") as out:
                writer = _CheckingWriter(out, HeaderCheck(self.max_bytes), refuse)
                download_to(url, writer, self.max_bytes, field)  # type: ignore[arg-type]
                out.flush()
                os.fsync(out.fileno())
            try:
                check_safetensors(partial, self.max_bytes)
            except HeaderError as error:
                raise refuse(str(error)) from None
            sha256 = writer.hash.hexdigest()
            os.replace(partial, cache / f"{sha256}{SUFFIX}")
        finally:
            partial.unlink(missing_ok=True)
        return sha256

    def _evict(self, keep: Collection[Path]) -> None:
        """Least recently used downloads out of the cache until it is within ``cache_bytes``, with the
        URL index entries that led to them; a private download file left by a crash goes too.

        Other workers share the folder: a file one of them is reading stays readable (POSIX keeps
        an open file until it is closed), and one it is about to read is downloaded again."""
        cache = self.root / CACHE
        files = []
        for path in cache.iterdir():
            with contextlib.suppress(FileNotFoundError):  # another worker removed it meanwhile
                files.append((path.stat(), path))
        newest = max((stat.st_mtime for stat, _ in files), default=0.0)
        stored = sorted((stat.st_mtime, stat.st_size, path) for stat, path in files if path.suffix == SUFFIX)
        total = sum(size for _, size, _ in stored)
        evicted = set()
        for _, size, path in stored:
            if total <= self.cache_bytes:
                break
            if path not in keep:
                path.unlink(missing_ok=True)
                evicted.add(path.name.removesuffix(SUFFIX))
                total -= size
        for stat, path in files:
            if path.name.startswith(PARTIAL) and newest - stat.st_mtime > STALE_PARTIAL_S:
                path.unlink(missing_ok=True)
            elif path.name.startswith(URL_INDEX) and evicted:
                with contextlib.suppress(FileNotFoundError):
                    if path.read_text().strip() in evicted:
                        path.unlink(missing_ok=True)
        if evicted:
            log.info("LoRA cache: %d least recently used files evicted, %s kept", len(evicted), size_text(total))


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(f"{PARTIAL}{uuid.uuid4().hex}")
    partial.write_text(text)
    os.replace(partial, path)
