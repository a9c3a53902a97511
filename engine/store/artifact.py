"""A published artifact: its key, and its manifest's file list checked before any file is used.

A manifest names files by relative path, each with its size and sha256: sizes are checked
when the artifact is looked up, hashes when it is verified, and a file read for use is
hashed as it is read. ``READS`` counts what this process read from stores.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from engine.common.errors import ArtifactError

CHUNK = 16 * 2**20
QUANTIZED_FIELDS = ("quantization", "recipe")
"""Key fields left out of the digest when unset, so unquantized artifacts keep the keys they had."""


@dataclass(frozen=True)
class ArtifactKey:
    """Everything an artifact depends on; any change gives another key and another artifact."""

    kind: str
    component: str
    fingerprint: str
    precision: str
    exporter: str
    gpu: str | None = None
    tensorrt: str | None = None
    profile: str | None = None
    quantization: str | None = None
    """fp8, int8 or nvfp4 for a quantized graph or engine (None: unquantized)."""
    recipe: str | None = None
    """The hash of a quantized artifact's calibration recipe (prompts, steps, size, ModelOpt, config)."""

    @property
    def digest(self) -> str:
        fields = {name: value for name, value in asdict(self).items() if name not in QUANTIZED_FIELDS or value}
        canonical = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:20]

    @property
    def dirname(self) -> str:
        return f"{self.component}-{self.kind}-{self.quantization or self.precision}-{self.digest}"


@dataclass
class ReadStats:
    """Bytes this process read (and hashed) from engine stores, and the seconds it took: on RunPod the
    store is a network volume, and its throughput is much of a cold start."""

    bytes: int = 0
    seconds: float = 0.0

    def add(self, count: int, started: float) -> None:
        self.bytes += count
        self.seconds += time.perf_counter() - started


READS = ReadStats()


def sha256_of(path: Path) -> str:
    """A file's sha256, read in chunks; not counted in ``READS``."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """The hash of a file in the store, counted in ``READS``."""
    started = time.perf_counter()
    digest = sha256_of(path)
    READS.add(path.stat().st_size, started)
    return digest


def _file_in(folder: Path, name: object) -> Path:
    """Where a manifest's file name points, refused unless it is a plain relative path that stays in the
    artifact's folder: a hand-edited or damaged manifest on a shared volume must never make a worker read
    (or hash, or load as an engine) a file elsewhere."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise ArtifactError(f"{folder.name}: the manifest names a file {name!r} that is not a relative path")
    if PurePosixPath(name).is_absolute() or any(part in ("", ".", "..") for part in name.split("/")):
        raise ArtifactError(f"{folder.name}: the manifest names a file {name!r} outside the artifact")
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):  # a link inside the folder to somewhere else
        raise ArtifactError(f"{folder.name}: the manifest's file {name!r} leads outside the artifact")
    return path


def _entry_is_valid(entry: object) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("sha256"), str)
        and isinstance(entry.get("size"), int)
        and not isinstance(entry.get("size"), bool)
    )


@dataclass
class Artifact:
    """A published artifact: its folder and its manifest, whose file list is checked before any use."""

    path: Path
    manifest: dict[str, Any]

    def __post_init__(self) -> None:
        files = self.manifest.get("files") if isinstance(self.manifest, dict) else None
        if not isinstance(files, dict) or not all(_entry_is_valid(entry) for entry in files.values()):
            raise ArtifactError(f"{self.path.name}: the manifest has no valid file list")
        for name in files:
            _file_in(self.path, name)

    @property
    def key(self) -> ArtifactKey:
        return ArtifactKey(**self.manifest["key"])

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest["files"]

    def file(self, name: str) -> Path:
        return _file_in(self.path, name)

    def check_sizes(self) -> None:
        """The cheap check: every file is there with its recorded size."""
        for name, entry in self.files.items():
            path = self.file(name)
            if not path.is_file() or path.stat().st_size != entry["size"]:
                raise ArtifactError(f"{self.path.name}/{name} is missing or truncated")

    def verify(self) -> None:
        """The full check: every file's hash matches the manifest."""
        self.check_sizes()
        for name, entry in self.files.items():
            if sha256_file(self.file(name)) != entry["sha256"]:
                raise ArtifactError(f"{self.path.name}/{name} does not match its manifest's sha256")

    @contextlib.contextmanager
    def mapped_verified(self, name: str) -> Iterator[mmap.mmap]:
        """A file mapped read-only and hashed through the mapping in chunks, so what is checked is what is
        used, and no copy of it is made in this process's memory (an engine plan can be tens of GB)."""
        entry = self.files[name]
        started = time.perf_counter()
        with self.file(name).open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size != entry["size"] or size == 0:
                raise ArtifactError(f"{self.path.name}/{name} does not match its manifest")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                digest = hashlib.sha256()
                with memoryview(mapped) as view:
                    for start in range(0, size, CHUNK):
                        digest.update(view[start : start + CHUNK])
                READS.add(size, started)
                if digest.hexdigest() != entry["sha256"]:
                    raise ArtifactError(f"{self.path.name}/{name} does not match its manifest")
                yield mapped
