"""Failure classes, each raised with context and reported once where it is handled."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


class WorkerError(Exception):
    """An expected failure whose message is fit to return to the caller as is."""


class ConfigError(WorkerError):
    """An environment variable has a value the worker cannot use; the message names the variable."""


class RequestError(WorkerError):
    """The request breaks a rule; the message names every field and rule broken."""


class ModelError(WorkerError):
    """The configured model cannot be found, loaded or is of an unsupported kind."""


class ArtifactError(WorkerError):
    """An exported artifact is missing, incomplete, or does not match its manifest."""


class NotBuilt(ArtifactError):
    """The store has no artifact for this component yet: the normal state before the first export."""


class BackendUnavailable(WorkerError):
    """A backend cannot run here or cannot run this artifact (library, device, version)."""


class DeadlineExceeded(WorkerError):
    """The request's time budget ran out between two denoising steps."""


class OutputTooLarge(WorkerError):
    """The response would exceed RunPod's payload limit, and no bucket is configured or the upload failed."""


class NonFiniteOutput(WorkerError):
    """A component produced NaN or Inf and no runner left in its chain computes it in finite values: the
    request's seed, LoRAs or scales push the model out of range. Nothing is wrong with the worker."""


class Problems:
    """The problems of one request, gathered from checks that each raise a RequestError."""

    def __init__(self, found: Iterable[str] = ()):
        self.found = list(found)

    def check(self, run: Callable[..., T], *args: Any) -> T | None:
        """What ``run`` returns, or None with its RequestError's message kept."""
        try:
            return run(*args)
        except RequestError as error:
            self.found.append(str(error))
            return None

    def raise_any(self) -> None:
        """One RequestError naming every problem found, each once, in the order found."""
        if self.found:
            raise RequestError("; ".join(dict.fromkeys(self.found)))
