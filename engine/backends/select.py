"""Which backend runs each component, and the fallback when it cannot.

Each component gets a chain of runners in order of preference, ending in torch,
which takes any shape. A backend that could not be loaded at start-up is left out of
the chain with its reason; a request whose shapes a runner does not cover moves down
the chain, and the worker reports the reasons in its metrics.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from engine.backends.base import Runner
from engine.backends.torch import TorchRunner
from engine.models.spec import ComponentSpec, Shape

log = logging.getLogger(__name__)


class LazyTorchRunner(Runner):
    """A torch runner that loads its weights on first use, so a fallback costs nothing until needed."""

    backend = "torch"

    def __init__(self, spec: ComponentSpec, load: Callable[[], torch.nn.Module], precision: str, device: torch.device):
        super().__init__(spec, precision, device)
        self._load = load
        self._runner: TorchRunner | None = None
        self._lock = threading.Lock()

    def ensure_loaded(self) -> TorchRunner:
        with self._lock:
            if self._runner is None:
                log.info("loading torch weights for %s", self.spec.name)
                self._runner = TorchRunner(self.spec, self._load(), self.precision, self.device)
            return self._runner

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.ensure_loaded().run(inputs)


@dataclass
class RunnerChain:
    """One component's runners in order of preference; the last one takes any shape."""

    component: str
    runners: list[Runner]
    unavailable: dict[str, str] = field(default_factory=dict)
    """Backends that were wanted but not loaded, with the reason."""

    def choose(self, shapes: Mapping[str, Shape]) -> tuple[Runner, list[str]]:
        """The first runner that covers these shapes, and why each one before it did not."""
        reasons = [f"{backend}: {reason}" for backend, reason in self.unavailable.items()]
        for runner in self.runners:
            reason = runner.unsupported_reason(shapes)
            if reason is None:
                return runner, reasons
            reasons.append(f"{runner.backend}: {reason}")
        raise RuntimeError(f"{self.component}: no runner covers {dict(shapes)}: {'; '.join(reasons)}")
