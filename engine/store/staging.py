"""Builds in progress: private folders named by host and process, swept once their process is gone.

A build writes into its own staging folder and is published by renaming it, fsynced, into
place; a folder whose process died on this host, or older than a day by the storage's
clock, is removed by the next build.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

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


def fsync_dir(path: Path) -> None:
    """Makes a folder's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Makes every file and folder under ``root`` durable, before it is renamed into place."""
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            with path.open("rb+") as handle:
                os.fsync(handle.fileno())
        else:
            fsync_dir(path)
    fsync_dir(root)


@dataclass
class Staging:
    """A build in progress: write files into ``path``, add manifest fields to ``info``."""

    path: Path
    info: dict[str, Any] = field(default_factory=dict)
