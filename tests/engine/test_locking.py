"""The build lock with real files and real processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest

from engine.store.locking import HOST, BuildLock, LockTimeout


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
    from engine.store.locking import _read_owner, _Seen

    owner, mtime_ns = _read_owner(path)
    stale = _Seen(owner["token"], mtime_ns, owner, time.monotonic() - 10)
    write_lock(path, host="another-host", pid=2, note="fresh owner")  # taken over since it was observed
    os.utime(path, ns=(mtime_ns + 10**9, mtime_ns + 10**9))
    lock._break(stale)
    assert json.loads(path.read_text())["note"] == "fresh owner"


FAR_PAST = 10**9  # 2001: a host or storage whose clock is years behind
FAR_FUTURE = 7 * 10**9  # 2191: one whose clock is far ahead


def _hold(lock_path: str, mtime: int, held: multiprocessing.Event, done: multiprocessing.Event) -> None:
    with BuildLock(Path(lock_path), stale_after=1.0, heartbeat=0.1) as lock:
        os.utime(lock_path, (mtime, mtime))  # as if written by a host whose clock is far off
        held.set()
        done.wait(30)
        assert not lock.lost.is_set()


@pytest.mark.parametrize("mtime", [FAR_PAST, FAR_FUTURE], ids=["mtime-in-the-past", "mtime-in-the-future"])
def test_a_live_holder_with_a_skewed_clock_keeps_the_lock(tmp_path, mtime):
    path = tmp_path / "f.lock"
    context = multiprocessing.get_context("spawn")
    held, done = context.Event(), context.Event()
    holder = context.Process(target=_hold, args=(str(path), mtime, held, done))
    holder.start()
    try:
        assert held.wait(30)
        token = json.loads(path.read_text())["token"]
        with pytest.raises(LockTimeout):
            BuildLock(path, stale_after=1.0, heartbeat=0.1, poll=0.05).acquire(timeout=2.5)
        assert json.loads(path.read_text())["token"] == token
    finally:
        done.set()
        holder.join(30)
    assert holder.exitcode == 0


def test_a_heartbeat_that_leaves_the_mtime_unchanged_still_keeps_the_lock(tmp_path):
    """Coarse or cached mtimes on a network volume, or a holder whose clock stands still: the
    heartbeat's count in the file is what shows the holder is alive."""
    path = tmp_path / "g.lock"
    stop = threading.Event()

    def remote_holder() -> None:
        beat = 0
        while not stop.wait(0.1):
            beat += 1
            refreshed = path.with_suffix(".new")
            refreshed.write_text(json.dumps({"token": "remote", "host": "another-host", "pid": 1, "beat": beat}))
            os.utime(refreshed, (FAR_PAST, FAR_PAST))
            os.replace(refreshed, path)  # readers never see another mtime

    write_lock(path, host="another-host", pid=1, beat=0)
    os.utime(path, (FAR_PAST, FAR_PAST))
    thread = threading.Thread(target=remote_holder)
    thread.start()
    try:
        with pytest.raises(LockTimeout):
            BuildLock(path, stale_after=1.0, heartbeat=0.1, poll=0.05).acquire(timeout=2.5)
    finally:
        stop.set()
        thread.join()
    assert json.loads(path.read_text())["token"] == "remote"


def acquire_within(lock: BuildLock, seconds: float) -> float:
    """Seconds the lock took to acquire; fails (rather than hangs) when it takes longer."""
    started = time.monotonic()
    thread = threading.Thread(target=lock.acquire, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"not acquired within {seconds} s"
    lock.release()
    return time.monotonic() - started


@pytest.mark.parametrize("mtime", [FAR_PAST, FAR_FUTURE], ids=["mtime-in-the-past", "mtime-in-the-future"])
def test_a_stopped_heartbeat_is_taken_over_after_the_stale_period_of_this_host(tmp_path, mtime):
    path = tmp_path / "h.lock"
    write_lock(path, host="another-host", pid=1, beat=7)
    os.utime(path, (mtime, mtime))
    elapsed = acquire_within(BuildLock(path, stale_after=1.0, heartbeat=0.2, poll=0.05), 15)
    assert 1.0 <= elapsed < 10
    assert not path.exists()


@pytest.mark.parametrize("mtime", [FAR_PAST, FAR_FUTURE], ids=["mtime-in-the-past", "mtime-in-the-future"])
def test_a_breaker_left_by_a_dead_host_is_cleared_after_the_stale_period_of_this_host(tmp_path, mtime):
    path = tmp_path / "i.lock"
    write_lock(path, host="another-host", pid=1)
    breaker = tmp_path / "i.lock.break"
    write_lock(breaker, host="another-host", pid=1)
    os.utime(breaker, (mtime, mtime))
    lock = BuildLock(path, stale_after=1.0, heartbeat=0.2, poll=0.05)
    lock._clear_dead_breaker(breaker)
    assert breaker.exists()  # seen once: not yet judged, whatever its mtime says
    elapsed = acquire_within(lock, 15)
    assert 1.0 <= elapsed < 10
    assert not breaker.exists()
