"""A build lock that works across processes and hosts sharing a network filesystem.

The lock is a file created with O_CREAT|O_EXCL (atomic on local filesystems and on
NFSv3+) holding its owner's token, host and pid. The owner refreshes its mtime on a
heartbeat. A waiter declares the lock stale when it has seen neither its token nor its
mtime change for ``stale_after`` seconds of its own clock, so clock skew between hosts
does not matter; on the owner's own host a dead pid makes it stale at once.

Breaking a stale lock happens under a second, short-lived "breaker" lock, and only if
the lock still holds the token that was judged stale, so two waiters can never both
break it, nor break the fresh lock that one of them just took.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

HOST = socket.gethostname()


@dataclass(frozen=True)
class _Seen:
    """A lock file's identity as a waiter last observed it, with when it first saw it so."""

    token: str | None
    mtime_ns: int
    owner: dict
    since: float


def _read_owner(path: Path) -> tuple[dict, int] | None:
    """The owner record and mtime, or None when the lock is gone."""
    try:
        mtime_ns = path.stat().st_mtime_ns
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text) if text else {}
    except json.JSONDecodeError:
        owner = {}  # a writer died between create and write; its age decides
    return (owner if isinstance(owner, dict) else {}), mtime_ns


def _owner_is_dead(owner: dict) -> bool:
    return owner.get("host") == HOST and isinstance(owner.get("pid"), int) and not psutil.pid_exists(owner["pid"])


class LockTimeout(TimeoutError):
    pass


class BuildLock:
    """Exclusive lock over one artifact's build; use as a context manager."""

    def __init__(self, path: Path, stale_after: float = 120.0, heartbeat: float = 10.0, poll: float = 0.25):
        if heartbeat >= stale_after:
            raise ValueError("the heartbeat must be shorter than the stale timeout")
        self.path = path
        self.stale_after = stale_after
        self.heartbeat = heartbeat
        self.poll = poll
        self.token = uuid.uuid4().hex
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _try_create(self, path: Path, record: dict) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def acquire(self, timeout: float | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"token": self.token, "host": HOST, "pid": os.getpid(), "created": time.time()}
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: _Seen | None = None
        while not self._try_create(self.path, record):
            current = _read_owner(self.path)
            if current is None:
                continue  # released between our create and our read
            owner, mtime_ns = current
            token = owner.get("token")
            if seen is None or (seen.token, seen.mtime_ns) != (token, mtime_ns):
                seen = _Seen(token, mtime_ns, owner, time.monotonic())
            if _owner_is_dead(owner) or time.monotonic() - seen.since > self.stale_after:
                self._break(seen)
                seen = None
                continue
            if deadline is not None and time.monotonic() > deadline:
                raise LockTimeout(f"{self.path} is held by {owner or 'an unknown owner'}")
            time.sleep(self.poll)
        self._start_heartbeat()

    def _break(self, stale: _Seen) -> None:
        breaker = self.path.with_name(self.path.name + ".break")
        if not self._try_create(breaker, {"token": self.token, "host": HOST, "pid": os.getpid()}):
            self._clear_dead_breaker(breaker)
            return
        try:
            current = _read_owner(self.path)
            if current is not None and (current[0].get("token"), current[1]) == (stale.token, stale.mtime_ns):
                log.warning("taking over stale build lock %s from %s", self.path, stale.owner)
                self.path.unlink(missing_ok=True)
        finally:
            breaker.unlink(missing_ok=True)

    def _clear_dead_breaker(self, breaker: Path) -> None:
        """A breaker is held for milliseconds; one older than the stale timeout lost its owner."""
        with contextlib.suppress(FileNotFoundError):
            if time.time() - breaker.stat().st_mtime > self.stale_after:
                breaker.unlink()
        time.sleep(self.poll)

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat-{self.path.name}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            current = _read_owner(self.path)
            if current is None or current[0].get("token") != self.token:
                log.error("build lock %s was taken over; the build continues but may be duplicated", self.path)
                self.lost.set()
                return
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        current = _read_owner(self.path)
        if current is not None and current[0].get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> BuildLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
