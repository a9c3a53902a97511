"""A build lock that works across processes and hosts sharing a network filesystem.

The lock is a file created with O_CREAT|O_EXCL (atomic on local filesystems and on
NFSv3+) holding its owner's token, host, pid and a heartbeat count. The owner rewrites
the count on a heartbeat, through the file it created (so it can never write into a
lock another process took since). A waiter declares the lock stale when it has seen
neither its token, its count nor its mtime change for ``stale_after`` seconds of its own
monotonic clock. No time written by the shared storage or another host is ever
compared with this host's clock, so hosts whose clocks disagree neither break each
other's live locks nor wait forever on a dead one; on the owner's own host a dead pid
makes it stale at once.

Breaking a stale lock happens under a second, short-lived "breaker" lock, and only if
the lock is still exactly as it was judged stale, so two waiters can never both break
it, nor break the fresh lock that one of them just took. A breaker left by a process
that died while holding it is judged the same way: unchanged for ``stale_after`` as
this host observes it.
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
    """A lock file's identity as a waiter last observed it, with when (on its own clock) it first saw it so."""

    token: str | None
    mtime_ns: int
    owner: dict
    since: float

    @property
    def identity(self) -> tuple[object, ...]:
        """What a live owner changes: its heartbeat count, and the mtime its writes leave (never compared
        with a clock, only with itself)."""
        return _identity(self.owner, self.mtime_ns)


def _identity(owner: dict, mtime_ns: int) -> tuple[object, ...]:
    return owner.get("token"), owner.get("beat"), mtime_ns


def _read_owner(path: Path) -> tuple[dict, int] | None:
    """The owner record and mtime, or None when the lock is gone."""
    try:
        mtime_ns = path.stat().st_mtime_ns
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text) if text else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        owner = {}  # a writer died between create and write, or a heartbeat is being written
    return (owner if isinstance(owner, dict) else {}), mtime_ns


def _observe(path: Path, seen: _Seen | None) -> _Seen | None:
    """The lock file as now observed, keeping the time of the first sighting while nothing changed;
    None when it is gone."""
    current = _read_owner(path)
    if current is None:
        return None
    owner, mtime_ns = current
    if seen is not None and seen.identity == _identity(owner, mtime_ns):
        return seen
    return _Seen(owner.get("token"), mtime_ns, owner, time.monotonic())


def _owner_is_dead(owner: dict) -> bool:
    return owner.get("host") == HOST and isinstance(owner.get("pid"), int) and not psutil.pid_exists(owner["pid"])


def _write_record(fd: int, record: dict) -> None:
    """Writes the record from the start of an open lock file. A heartbeat's count only grows, so its
    record never gets shorter and needs no truncation; a reader catching it half-written sees a change,
    which only makes it wait longer."""
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)


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
        self._fd: int | None = None
        self._record: dict = {}
        self._breaker_seen: _Seen | None = None

    def _create(self, path: Path, record: dict) -> int | None:
        """An open descriptor of a new file holding ``record``, or None when the file exists."""
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            return None
        _write_record(fd, record)
        return fd

    def acquire(self, timeout: float | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._record = {"token": self.token, "host": HOST, "pid": os.getpid(), "created": time.time(), "beat": 0}
        deadline = None if timeout is None else time.monotonic() + timeout
        seen: _Seen | None = None
        while (fd := self._create(self.path, self._record)) is None:
            seen = _observe(self.path, seen)
            if seen is None:
                continue  # released between our create and our read
            if _owner_is_dead(seen.owner) or time.monotonic() - seen.since > self.stale_after:
                self._break(seen)
                seen = None
                continue
            if deadline is not None and time.monotonic() > deadline:
                raise LockTimeout(f"{self.path} is held by {seen.owner or 'an unknown owner'}")
            time.sleep(self.poll)
        self._fd = fd
        self._start_heartbeat()

    def _break(self, stale: _Seen) -> None:
        breaker = self.path.with_name(self.path.name + ".break")
        fd = self._create(breaker, {"token": self.token, "host": HOST, "pid": os.getpid()})
        if fd is None:
            self._clear_dead_breaker(breaker)
            return
        os.close(fd)
        self._breaker_seen = None
        try:
            current = _read_owner(self.path)
            if current is not None and _identity(*current) == stale.identity:
                log.warning("taking over stale build lock %s from %s", self.path, stale.owner)
                self.path.unlink(missing_ok=True)
        finally:
            breaker.unlink(missing_ok=True)

    def _clear_dead_breaker(self, breaker: Path) -> None:
        """A breaker is held for milliseconds; one this host has seen unchanged for the stale timeout (or
        whose owner on this host is dead) lost its owner."""
        seen = self._breaker_seen = _observe(breaker, self._breaker_seen)
        if seen is not None and (_owner_is_dead(seen.owner) or time.monotonic() - seen.since > self.stale_after):
            current = _read_owner(breaker)
            if current is not None and _identity(*current) == seen.identity:
                log.warning("removing build lock breaker %s left by %s", breaker, seen.owner)
                breaker.unlink(missing_ok=True)
            self._breaker_seen = None
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
            self._record["beat"] += 1
            assert self._fd is not None
            with contextlib.suppress(OSError):
                _write_record(self._fd, self._record)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        current = _read_owner(self.path)
        if current is not None and current[0].get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> BuildLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
