"""The build lock with real files and real processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from engine.locking import HOST, BuildLock, LockTimeout


def _count_under_lock(lock_path: str, counter: str, rounds: int) -> None:
    for _ in range(rounds):
        with BuildLock(Path(lock_path), stale_after=30, heartbeat=1, poll=0.001):
            value = int(Path(counter).read_text())
            time.sleep(0.001)  # widen the window a lost update would need
            Path(counter).write_text(str(value + 1))


def test_processes_exclude_each_other(tmp_path):
    counter = tmp_path / "counter"
    counter.write_text("0")
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_count_under_lock, args=(str(tmp_path / "a.lock"), str(counter), 25)) for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    assert counter.read_text() == "100"
    assert not (tmp_path / "a.lock").exists()


def write_lock(path: Path, **owner: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"token": "other", **owner}))


def test_a_lock_without_heartbeat_is_taken_over(tmp_path):
    path = tmp_path / "b.lock"
    write_lock(path, host="another-host", pid=1)
    started = time.monotonic()
    with BuildLock(path, stale_after=1.0, heartbeat=0.2, poll=0.05) as lock:
        assert json.loads(path.read_text())["token"] == lock.token
    assert 1.0 <= time.monotonic() - started < 10


def test_a_live_heartbeat_keeps_the_lock(tmp_path):
    path = tmp_path / "c.lock"
    with BuildLock(path, stale_after=1.0, heartbeat=0.1):
        waiter = BuildLock(path, stale_after=1.0, heartbeat=0.1, poll=0.05)
        with pytest.raises(LockTimeout):
            waiter.acquire(timeout=2.5)


def test_a_dead_owner_on_this_host_is_taken_over_at_once(tmp_path):
    process = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    process.start()
    process.join()
    path = tmp_path / "d.lock"
    write_lock(path, host=HOST, pid=process.pid)
    started = time.monotonic()
    with BuildLock(path, stale_after=60, heartbeat=1, poll=0.05):
        pass
    assert time.monotonic() - started < 5


def test_a_lock_renewed_since_it_was_judged_stale_is_not_broken(tmp_path):
    path = tmp_path / "e.lock"
    write_lock(path, host="another-host", pid=1)
    lock = BuildLock(path, stale_after=1.0, heartbeat=0.2)
    from engine.locking import _read_owner, _Seen

    owner, mtime_ns = _read_owner(path)
    stale = _Seen(owner["token"], mtime_ns, owner, time.monotonic() - 10)
    write_lock(path, host="another-host", pid=2, note="fresh owner")  # taken over since it was observed
    os.utime(path, ns=(mtime_ns + 10**9, mtime_ns + 10**9))
    lock._break(stale)
    assert json.loads(path.read_text())["note"] == "fresh owner"
