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
that is never read and is swept later. An artifact and its checks are in
``engine.store.artifact``; staging folders, their sweep and fsync in ``engine.store.staging``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from engine.common.errors import ArtifactError
from engine.store.artifact import Artifact, ArtifactKey, sha256_file, sha256_of
from engine.store.locking import BuildLock
from engine.store.staging import Staging, fsync_dir, fsync_tree, private_name, sweep_dead

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


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
        fsync_tree(staging.path)
        final = self.artifacts / key.dirname
        self.artifacts.mkdir(parents=True, exist_ok=True)
        try:
            staging.path.rename(final)
        except OSError:
            if not (final / MANIFEST).is_file():
                raise
            log.info("%s was published by another process first", final.name)
        else:
            fsync_dir(self.artifacts)
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
        digest = sha256_of(path)  # a model's weights, not the store's: not counted in READS
        with contextlib.suppress(OSError):
            self.digests.mkdir(parents=True, exist_ok=True)
            temporary = memo.with_suffix(f".{uuid.uuid4().hex}")
            temporary.write_text(digest)
            temporary.rename(memo)
        return digest
