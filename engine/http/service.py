"""The worker behind the HTTP routes: its start-up state, and the one-at-a-time gate its jobs pass.

The worker is not re-entrant (one set of runners, one LoRA state, CUDA graphs per shape), so
jobs run one at a time on one thread, which also loads the worker: every CUDA and TensorRT
call of the process is made from it. The event loop never runs a job; it only waits for one.
A request that finds ``HTTP_MAX_WAITING`` others already waiting is refused at once with 429
and a ``Retry-After`` estimate: a load-balancing endpoint has no queue of its own, and a
client that retries elsewhere is served sooner than one kept waiting behind a long line.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from engine.common.metrics import ColdStart
from engine.serving.startup import Startup, start
from engine.serving.worker import Answer, Worker
from engine.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")


class Busy(Exception):
    """As many requests wait as ``HTTP_MAX_WAITING`` allows; ``retry_after`` is a guess in seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the worker is busy: {retry_after} s until it is likely free")
        self.retry_after = retry_after


class Gate:
    """One job at a time on one thread, at most ``max_waiting`` more waiting."""

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker")
        self.waiting = 0
        self.last_seconds = 1.0
        self._lock: asyncio.Lock | None = None

    @property
    def busy(self) -> bool:
        """A job runs or waits for the job thread."""
        return self._lock is not None and self._lock.locked()

    def submit(self, function: Callable[[], T]) -> Future[T]:
        """Runs on the job thread, outside the gate (the worker's start-up)."""
        return self.executor.submit(function)

    async def run(self, function: Callable[[], T]) -> T:
        if self._lock is None:
            self._lock = asyncio.Lock()
        if self._lock.locked() and self.waiting >= self.max_waiting:
            raise Busy(math.ceil(self.last_seconds * (self.waiting + 1)))
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1
        started = time.monotonic()
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, function)
        finally:
            self.last_seconds = max(time.monotonic() - started, 0.1)
            self._lock.release()


class Service:
    """Starting, ready or failed; once ready, answers jobs through the gate."""

    def __init__(self, settings: Settings, gate: Gate | None = None):
        self.settings = settings
        self.gate = gate or Gate(settings.http_max_waiting)
        self.startup: Startup | None = None
        self.failure: str | None = None
        """Why a worker that started can no longer serve (a GPU fault): /ping then says unhealthy."""

    def load(self, cold_start: ColdStart) -> Future[None]:
        """Starts the worker on the job thread; until it is done the service is starting."""

        def run() -> None:
            self.startup = start(cold_start)

        return self.gate.submit(run)

    @property
    def worker(self) -> Worker | None:
        return self.startup.worker if self.startup is not None and self.failure is None else None

    @property
    def state(self) -> str:
        """``starting``, ``ready`` or ``failed``."""
        if self.startup is None:
            return "starting"
        return "ready" if self.worker is not None else "failed"

    @property
    def reason(self) -> str:
        if self.failure is not None:
            return self.failure
        if self.startup is not None and self.startup.error is not None:
            return f"the worker failed to start: {self.startup.error}"
        return "the worker is starting"

    async def answer(self, job: dict[str, Any], upload: bool = False) -> Answer:
        worker = self.worker
        if worker is None:
            raise RuntimeError(self.reason)
        answer = await self.gate.run(lambda: worker.answer(job, upload=upload))
        if answer.response.get("refresh_worker"):
            self.failure = answer.response["error"]
            log.critical("this worker can no longer serve; /ping now reports it unhealthy")
        return answer
