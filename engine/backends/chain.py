"""A runner chain per component: the first runner covering a call's shapes runs it, the next takes over.

Each component gets a chain of runners in order of preference, ending in torch
(which takes any shape) unless ``TORCH_FALLBACK=off``. A backend that could not be
loaded at start-up is left out of the chain with its reason. Each call goes to the
first runner that covers its shapes; a runner that raises hands the call to the next
one, and one that keeps failing leaves the chain for the life of the process. Every
call is chosen on the shapes it really has, so what the metrics report is what ran.

A component whose outputs the pipeline finds non-finite (NaN or Inf) is run again, for the rest
of that request only, on the next runner of its chain that computes in fp32. The VAE's fp16
chains keep an fp32 torch VAE aside for this, loaded on first use (``fp32_standby``): the VAE is
the component known to overflow fp16 (SDXL's), and small in fp32 (0.3 GB). No other component
gets one: an fp32 copy of a denoiser (10 GB for SDXL's UNet) would stay on the GPU for the life of
the process, so a request whose denoiser overflows fp16 fails instead, saying so. bf16 gets none:
it has fp32's range, so what overflows in bf16 overflows in fp32 too. A non-finite
output is not counted as the runner failing: an overflow is what this request's input, seed,
LoRA or scale asks of a sound runner, and counting it would let a few such requests take a
healthy backend out of service for everyone. Each rerun is logged and named in
``metrics.fallbacks``, so a runner that produces NaN for every request shows there.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from engine.backends.base import ComponentCall, Runner
from engine.backends.torch import SharedTorchRunner
from engine.common.errors import BackendUnavailable, NonFiniteOutput, RequestError
from engine.common.faults import is_out_of_memory, is_unrecoverable
from engine.lora.library import WeightPatch

log = logging.getLogger(__name__)


FAILURES_BEFORE_REMOVAL = 3
"""A runner that fails this many calls in a row is taken out of its chain."""
UNKNOWN_WEIGHTS = "unknown"
"""The weights key of a runner whose patch failed half-way: the next call applies its patch again."""


_WEIGHTS_LOCKS: weakref.WeakKeyDictionary[Runner, threading.RLock] = weakref.WeakKeyDictionary()
_WEIGHTS_LOCKS_GUARD = threading.Lock()


def weights_lock(runner: Runner) -> threading.RLock:
    """The lock of the weights ``runner`` runs (a runner on another's module shares that one's): held
    from setting a call's LoRA set to the call's end, so concurrent requests with different sets each
    run their own even where the serverless SDK is set to run several jobs at once."""
    owner = runner.owner if isinstance(runner, SharedTorchRunner) else runner
    with _WEIGHTS_LOCKS_GUARD:
        lock = _WEIGHTS_LOCKS.get(owner)
        if lock is None:
            lock = _WEIGHTS_LOCKS[owner] = threading.RLock()
        return lock


class NotCovered(RequestError):
    """No runner left in a chain takes the call's shapes (only possible without the torch fallback)."""


@dataclass
class RunnerChain:
    """One component's runners in order of preference."""

    component: str
    runners: list[Runner]
    unavailable: dict[str, str] = field(default_factory=dict)
    """Backends that were wanted but are not in the chain, with the reason."""
    fp32_standby: Runner | None = None
    """An fp32 runner outside the chain, only for reruns of non-finite outputs (see the module's docstring)."""
    failure_limit: int = FAILURES_BEFORE_REMOVAL
    _failures: dict[int, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(
        self,
        inputs: Mapping[str, torch.Tensor],
        report: Callable[[str], None],
        patch: WeightPatch | None = None,
        patched: Callable[[float], None] | None = None,
        candidates: Sequence[Runner] | None = None,
    ) -> tuple[dict[str, torch.Tensor], Runner]:
        """The outputs of the first runner that covers the inputs' shapes and succeeds, and that runner;
        the runners tried are ``candidates`` when given (a rerun's: see ``fp32_after``), else the chain's.

        The runner's weights are first set to ``patch`` (a LoRA set; None for the base weights)
        unless they already are, and the seconds that took go to ``patched``; a runner that
        cannot take the patch is passed over like one that cannot take the shapes. Why each
        better runner did not run goes to ``report``, in words fit for the caller (the log has the
        error itself). Out-of-memory and fatal CUDA errors are not retried on the next runner: the
        worker's fault handling takes them. A RequestError (a LoRA set no check before caught) is
        the request's: it is raised, and never counts against the runner.
        """
        shapes = {name: tuple(tensor.shape) for name, tensor in inputs.items()}
        skipped = [f"{backend}: {reason}" for backend, reason in self.unavailable.items()]
        runners = list(self.runners if candidates is None else candidates)
        for position, runner in enumerate(runners):
            reason = runner.unsupported_reason(shapes)
            if reason is not None:
                skipped.append(f"{runner.backend}: {reason}")
                continue
            try:
                with weights_lock(runner):
                    self._set_weights(runner, patch, patched)
                    outputs = runner(inputs)
            except RequestError:
                raise
            except Exception as error:
                if isinstance(error, BackendUnavailable) and runner.weights_key == UNKNOWN_WEIGHTS:
                    skipped.append(f"{runner.backend}: cannot apply the LoRAs: {error}")
                    continue
                if position == len(runners) - 1 or is_out_of_memory(error) or is_unrecoverable(error, runner.device):
                    raise
                skipped.append(f"{runner.backend}: failed while running (the worker logged why)")
                self._failed(runner, error)
                continue
            self._failures.pop(id(runner), None)
            for line in skipped:
                report(line)
            return outputs, runner
        raise NotCovered(f"{self.component}: no backend takes shapes {shapes}: {'; '.join(skipped)}")

    def fp32_after(self, runner: Runner) -> list[Runner]:
        """The runners that may rerun what ``runner`` computed: those after it in the chain that compute in
        fp32, then the fp32 standby (none after the standby itself)."""
        if runner is self.fp32_standby:
            return []
        runners = list(self.runners)
        later = runners[runners.index(runner) + 1 :] if runner in runners else []
        found = [c for c in later if c.precision == "fp32" and c.quantization is None]
        return found if self.fp32_standby is None else [*found, self.fp32_standby]

    @staticmethod
    def _set_weights(runner: Runner, patch: WeightPatch | None, patched: Callable[[float], None] | None) -> None:
        key = patch.key if patch is not None else None
        if runner.weights_key == key:
            return
        started = time.perf_counter()
        runner.weights_key = UNKNOWN_WEIGHTS
        runner.apply_patch(patch)
        runner.weights_key = key
        if patched is not None:
            patched(time.perf_counter() - started)

    def _failed(self, runner: Runner, error: Exception) -> None:
        with self._lock:
            count = self._failures[id(runner)] = self._failures.get(id(runner), 0) + 1
            log.warning(
                "%s: %s failed (%d in a row), the next backend runs it: %s",
                self.component,
                runner.backend,
                count,
                error,
            )
            if count >= self.failure_limit and runner in self.runners:
                self.runners.remove(runner)
                self.unavailable[runner.backend] = f"taken out after {count} failures in a row"
                log.error("%s: %s taken out of service for this process: %s", self.component, runner.backend, error)


class ChainCalls(Mapping[str, ComponentCall]):
    """One request's calls into the chains, as the pipeline's component runners: records which
    backend ran each component and why a preferred one did not, and moves a component whose outputs
    were non-finite to its chain's next fp32 runner for the rest of the request (``rerun_in_fp32``)."""

    def __init__(self, chains: Mapping[str, RunnerChain], patches: Mapping[str, WeightPatch] | None = None):
        self.chains = chains
        self.patches = patches or {}
        self.lora_seconds = 0.0
        """Time spent setting weights to the request's LoRA set (or back to the base)."""
        self._backends: dict[str, list[str]] = {}
        self._precisions: dict[str, list[str]] = {}
        self._fallbacks: dict[str, list[str]] = {}
        self._last: dict[str, Runner] = {}
        """The runner that made each component's latest outputs."""
        self._reruns: dict[str, list[Runner]] = {}
        """The runners a component moved to after non-finite outputs."""

    def __getitem__(self, component: str) -> ComponentCall:
        return functools.partial(self._call, component)

    def __iter__(self) -> Iterator[str]:
        return iter(self.chains)

    def __len__(self) -> int:
        return len(self.chains)

    def _call(self, component: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs, runner = self.chains[component].run(
            inputs,
            functools.partial(_add, self._fallbacks, component),
            self.patches.get(component),
            self._patched,
            self._reruns.get(component),
        )
        self._last[component] = runner
        _add(self._backends, component, runner.backend)
        _add(self._precisions, component, runner.precision_label)
        return outputs

    def _patched(self, seconds: float) -> None:
        self.lora_seconds += seconds

    def rerun_in_fp32(self, components: Collection[str]) -> None:
        """Sends the later calls of each of ``components`` that ran to the next runner of its chain that
        computes in fp32, saying why in the fallbacks; the pipeline then runs its stage again. Raises
        NonFiniteOutput, naming what ran last, when none of them has such a runner left."""
        ran = {component: self._last[component] for component in components if component in self._last}
        moved = {}
        for component, runner in ran.items():
            candidates = self.chains[component].fp32_after(runner)
            if candidates and candidates != self._reruns.get(component):  # never the same runners twice
                self._reruns[component] = moved[component] = candidates
        if not moved:
            last = ", ".join(f"{component} on {r.backend} {r.precision}" for component, r in ran.items())
            log.warning("non-finite outputs from %s, with no fp32 runner left to rerun them", last)
            raise NonFiniteOutput(
                f"the model produced NaN/Inf values ({last or ', '.join(components)}); try another seed, LoRA or scale"
            )
        for component, candidates in moved.items():
            runner, then = ran[component], candidates[0]
            reason = f"{runner.backend} {runner.precision}: produced NaN/Inf; reran on {then.backend} {then.precision}"
            log.warning("%s: %s", component, reason)
            _add(self._fallbacks, component, reason)

    @property
    def backends(self) -> dict[str, str]:
        """Component -> the backend that ran it (several, in order, if a failure moved it mid-request)."""
        return {component: ", ".join(names) for component, names in self._backends.items()}

    @property
    def precisions(self) -> dict[str, str]:
        """Component -> the precision it ran at (a bf16 checkpoint's components run bf16 under fp16)."""
        return {component: ", ".join(names) for component, names in self._precisions.items()}

    @property
    def fallbacks(self) -> dict[str, str]:
        return {component: "; ".join(reasons) for component, reasons in self._fallbacks.items()}


def _add(record: dict[str, list[str]], component: str, value: str) -> None:
    values = record.setdefault(component, [])
    if value not in values:
        values.append(value)
