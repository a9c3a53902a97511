"""The engine store: artifacts under keys, with manifests, atomic publish and integrity checks.

Layout under one root (``ENGINE_DIR``)::

    artifacts/<component>-<kind>-<precision>-<digest>/   one published artifact, never modified
        manifest.json                                     key, file hashes, tools, parity, timings
        model.onnx | engine.plan ...
    locks/<digest>.lock                                   build locks (see engine.store.locking)
    staging/<host>-<pid>-<uuid>/                          builds in progress
    quarantine/                                           artifacts that failed their check
    digests/                                              memo of weight-file hashes

An artifact appears only by renaming a complete, fsynced staging folder, so a reader
sees all of it or none of it; a build killed half-way leaves only a staging folder
that is never read and is swept later.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import psutil

from engine.common.errors import ArtifactError
from engine.store.locking import BuildLock

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CHUNK = 16 * 2**20
HOST = socket.gethostname()
STAGING_MAX_AGE_S = 24 * 3600


def private_name() -> str:
    """A folder name no other process or host picks, that says which process owns it."""
    return f"{HOST}-{os.getpid()}-{uuid.uuid4().hex}"


def storage_now(root: Path) -> float:
    """The time by the clock that stamps files in ``root``: the mtime of a file created there now. On a
    network volume that is the server's clock, which need not agree with this host's."""
    probe = root / f".clock-{private_name()}"
    probe.touch()
    try:
        return probe.stat().st_mtime
    finally:
        probe.unlink(missing_ok=True)


def sweep_dead(root: Path) -> None:
    """Removes folders left by dead processes on this host, and any older than a day by the storage's own
    clock (a host whose clock runs a day ahead must not sweep another host's build in progress)."""
    if not root.is_dir():
        return
    now = storage_now(root)
    for path in root.iterdir():
        if path.name.startswith(".clock-"):
            continue
        host, _, rest = path.name.rpartition("-")[0].rpartition("-")
        pid = int(rest) if rest.isdigit() else None
        dead_here = host == HOST and pid is not None and not psutil.pid_exists(pid)
        with contextlib.suppress(FileNotFoundError):
            if dead_here or now - path.stat().st_mtime > STAGING_MAX_AGE_S:
                shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def scratch_folder(root: Path) -> Iterator[Path]:
    """A private folder under ``root`` for one build's intermediate files: removed afterwards,
    and swept by a later build if its process dies."""
    sweep_dead(root)
    path = root / private_name()
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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

    @property
    def digest(self) -> str:
        canonical = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:20]

    @property
    def dirname(self) -> str:
        return f"{self.component}-{self.kind}-{self.precision}-{self.digest}"


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: Path) -> str:
    """The hash of a file in the store, counted in ``READS``."""
    started = time.perf_counter()
    digest = _sha256(path)
    READS.add(path.stat().st_size, started)
    return digest


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            with path.open("rb+") as handle:
                os.fsync(handle.fileno())
        else:
            _fsync_dir(path)
    _fsync_dir(root)


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

    def read_verified(self, name: str) -> bytes:
        """A file's bytes, hashed while read once, so what is checked is what is used."""
        entry = self.files[name]
        started = time.perf_counter()
        data = self.file(name).read_bytes()
        READS.add(len(data), started)
        if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ArtifactError(f"{self.path.name}/{name} does not match its manifest")
        return data


@dataclass
class Staging:
    """A build in progress: write files into ``path``, add manifest fields to ``info``."""

    path: Path
    info: dict[str, Any] = field(default_factory=dict)


class Store:
    def __init__(self, root: Path, lock_stale_s: float = 120.0, lock_heartbeat_s: float = 10.0):
        self.root = root
        self.lock_stale_s = lock_stale_s
        self.lock_heartbeat_s = lock_heartbeat_s
        self.artifacts = root / "artifacts"
        self.locks = root / "locks"
        self.staging = root / "staging"
        self.quarantine_dir = root / "quarantine"
        self.digests = root / "digests"

    # Reading

    def _load(self, path: Path) -> Artifact | None:
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (FileNotFoundError, NotADirectoryError):
            return None
        except json.JSONDecodeError as error:
            raise ArtifactError(f"{path.name}: unreadable manifest: {error}") from error
        return Artifact(path, manifest)

    def get(self, key: ArtifactKey) -> Artifact | None:
        """The published artifact for a key, size-checked; None when there is none."""
        artifact = self._load(self.artifacts / key.dirname)
        if artifact is not None:
            artifact.check_sizes()
        return artifact

    def find(self, **fields: Any) -> list[Artifact]:
        """Every published artifact whose key has these field values (e.g. all engines of a component)."""
        if not self.artifacts.is_dir():
            return []
        found = []
        for path in sorted(self.artifacts.iterdir()):
            with contextlib.suppress(ArtifactError):
                artifact = self._load(path)
                if artifact is not None and all(artifact.manifest["key"].get(k) == v for k, v in fields.items()):
                    found.append(artifact)
        return found

    # Building

    def lock(self, key: ArtifactKey) -> BuildLock:
        return BuildLock(self.locks / f"{key.digest}.lock", self.lock_stale_s, self.lock_heartbeat_s)

    def ensure(self, key: ArtifactKey, build: Callable[[Staging], None], verify: bool = True) -> Artifact:
        """The artifact for a key, built once across every process and host sharing the store.

        A published artifact that fails its check is moved to quarantine and built again.
        """
        existing = self._checked(key, verify)
        if existing is not None:
            return existing
        with self.lock(key):
            existing = self._checked(key, verify)
            if existing is not None:
                return existing
            staging = self.new_staging()
            started = time.perf_counter()
            try:
                build(staging)
                staging.info.setdefault("build_seconds", round(time.perf_counter() - started, 3))
                return self.publish(key, staging)
            finally:
                shutil.rmtree(staging.path, ignore_errors=True)

    def _checked(self, key: ArtifactKey, verify: bool) -> Artifact | None:
        try:
            artifact = self.get(key)
            if artifact is not None and verify:
                artifact.verify()
            return artifact
        except ArtifactError as error:
            log.warning("artifact failed its check, rebuilding: %s", error)
            self.quarantine(self.artifacts / key.dirname)
            return None

    def new_staging(self) -> Staging:
        sweep_dead(self.staging)
        path = self.staging / private_name()
        path.mkdir(parents=True)
        return Staging(path)

    def publish(self, key: ArtifactKey, staging: Staging) -> Artifact:
        """Hashes the staged files, writes the manifest, fsyncs and renames into place."""
        files = {
            str(path.relative_to(staging.path)): {"sha256": sha256_file(path), "size": path.stat().st_size}
            for path in sorted(staging.path.rglob("*"))
            if path.is_file()
        }
        manifest = {"key": asdict(key), "files": files, "created": time.time(), **staging.info}
        (staging.path / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        _fsync_tree(staging.path)
        final = self.artifacts / key.dirname
        self.artifacts.mkdir(parents=True, exist_ok=True)
        try:
            staging.path.rename(final)
        except OSError:
            if not (final / MANIFEST).is_file():
                raise
            log.info("%s was published by another process first", final.name)
        else:
            _fsync_dir(self.artifacts)
            log.info("published %s", final.name)
        artifact = self._load(final)
        assert artifact is not None
        return artifact

    def quarantine(self, path: Path) -> None:
        """Moves a bad artifact aside (atomically) so no reader picks it up again."""
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.rename(self.quarantine_dir / f"{path.name}-{uuid.uuid4().hex[:8]}")

    def sweep_staging(self) -> None:
        sweep_dead(self.staging)

    # Hash memo for model weights

    def file_digest(self, path: Path) -> str:
        """sha256 of a (weight) file, memoized by path, size and mtime so it is computed once per version."""
        stat = path.stat()
        identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        memo = self.digests / hashlib.sha256(identity.encode()).hexdigest()
        with contextlib.suppress(FileNotFoundError, OSError):
            cached = memo.read_text().strip()
            if len(cached) == 64:
                return cached
        digest = _sha256(path)  # a model's weights, not the store's: not counted in READS
        with contextlib.suppress(OSError):
            self.digests.mkdir(parents=True, exist_ok=True)
            temporary = memo.with_suffix(f".{uuid.uuid4().hex}")
            temporary.write_text(digest)
            temporary.rename(memo)
        return digest
