"""Worker start-up: settings, the worker itself, warm-up, readiness, and the fitness checks.

Nothing here raises: a worker that cannot start answers every job with the reason,
and on RunPod its fitness checks fail so the platform replaces it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from engine.common.errors import ConfigError, WorkerError
from engine.common.logs import configure_logging
from engine.common.metrics import ColdStart
from engine.serving import fitness
from engine.serving.heap import settle_collector
from engine.serving.worker import Worker
from engine.settings import Settings, load_settings

log = logging.getLogger(__name__)


@dataclass
class Startup:
    settings: Settings | None
    worker: Worker | None
    error: str | None

    def fitness_checks(self) -> list[Callable[[], None]]:
        """Zero-argument checks, in the order RunPod should run them."""

        def worker_started() -> None:
            if self.worker is None:
                raise RuntimeError(f"the worker failed to start: {self.error}")

        def engines_load() -> None:
            if self.worker is not None and self.worker.tensorrt.unusable is not None:
                raise RuntimeError(self.worker.tensorrt.unusable)

        checks = [engines_load, worker_started]
        if self.settings is not None:
            for check in fitness.CHECKS:
                checks.insert(-2, _bound(check, self.settings))
        return checks


def _bound(check: Callable[[Settings], None], settings: Settings) -> Callable[[], None]:
    def run() -> None:
        check(settings)

    run.__name__ = check.__name__
    run.__doc__ = check.__doc__
    return run


def start(cold_start: ColdStart) -> Startup:
    """Loads the worker; whatever happened, the garbage collector is then settled (see heap.py)."""
    startup = _load(cold_start)
    settle_collector()
    cold_start.mark("settle_heap")
    if startup.worker is not None:
        log.info("cold start", extra={"fields": {"init_ms": cold_start.summary()}})
        write_ready_file(startup.worker.settings)
    return startup


def _load(cold_start: ColdStart) -> Startup:
    try:
        settings = load_settings()
    except ConfigError as error:
        configure_logging()
        log.critical("invalid configuration: %s", error)
        return Startup(None, None, f"invalid configuration: {error}")
    configure_logging(settings.log_level)
    try:
        worker = Worker(settings, cold_start)
        if settings.warmup:
            worker.warmup()
            cold_start.mark("warmup")
    except WorkerError as error:  # expected (a missing model, a bad setting): its message says what to fix
        log.critical("the worker failed to start: %s", error, exc_info=settings.log_level.upper() == "DEBUG")
        return Startup(settings, None, str(error))
    except Exception as error:  # its text may name server paths: it stays in the log
        log.critical("the worker failed to start", exc_info=error)
        return Startup(settings, None, f"{type(error).__name__} (the worker's log has the details)")
    return Startup(settings, worker, None)


def write_ready_file(settings: Settings) -> None:
    """The Docker HEALTHCHECK reads it: the worker started, and this pid serves."""
    try:
        settings.ready_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = settings.ready_file.with_name(settings.ready_file.name + ".tmp")
        temporary.write_text(str(os.getpid()))
        temporary.replace(settings.ready_file)
    except OSError as error:
        log.warning("could not write the ready file %s: %s", settings.ready_file, error)
