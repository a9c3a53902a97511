"""Which backend runs each component, and the fallback when it cannot.

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
import shlex
import threading
import time
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.backends.base import ComponentCall, Runner
from engine.backends.onnxruntime import load_onnxruntime_runner, onnxruntime_has_cuda
from engine.backends.tensorrt import TensorRTBackend, gpu_tag, load_tensorrt
from engine.backends.torch import TorchRunner
from engine.common.dtypes import PRECISION_DTYPES
from engine.common.errors import ArtifactError, BackendUnavailable, NonFiniteOutput, NotBuilt, RequestError
from engine.common.faults import is_out_of_memory, is_unrecoverable
from engine.lora.library import WeightPatch
from engine.models.model import Model
from engine.settings import Backend, Settings, TorchFallback
from engine.sizes import parse_ranges
from engine.spec import ComponentSpec
from engine.store.fingerprint import component_fingerprint
from engine.store.keys import onnx_key
from engine.store.profiles import component_profiles, profiles_label
from engine.store.store import Store
from engine.store.weightmap import WEIGHT_MAP_FILE, WeightMap

log = logging.getLogger(__name__)


class LazyTorchRunner(Runner):
    """A torch runner that loads its weights on first use, so a fallback costs nothing until needed."""

    backend = "torch"

    def __init__(self, spec: ComponentSpec, load: Callable[[], torch.nn.Module], precision: str, device: torch.device):
        super().__init__(spec, precision, device)
        self._load = load
        self._runner: TorchRunner | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        """Whether the weights are in memory already."""
        return self._runner is not None

    def ensure_loaded(self) -> TorchRunner:
        with self._lock:
            if self._runner is None:
                log.info("loading torch weights for %s", self.spec.name)
                self._runner = TorchRunner(self.spec, self._load(), self.precision, self.device)
            return self._runner

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.ensure_loaded().run(inputs)

    def apply_patch(self, patch: WeightPatch | None) -> None:
        if patch is None and self._runner is None:
            return  # not loaded yet: it will load the base weights
        self.ensure_loaded().apply_patch(patch)


class SharedTorchRunner(Runner):
    """A torch runner on another torch runner's module: the controlled UNet runs the UNet's own
    weights, so torch holds one copy, and one LoRA state, whose key it reads from that runner."""

    backend = "torch"

    def __init__(self, spec: ComponentSpec, owner: LazyTorchRunner, wrap: Callable[[torch.nn.Module], torch.nn.Module]):
        # not Runner.__init__: setting weights_key there would reset the owner's
        self.spec, self.precision, self.device = spec, owner.precision, owner.device
        self.owner = owner
        self._wrap = wrap
        self._module: torch.nn.Module | None = None

    @property
    def weights_key(self) -> str | None:  # type: ignore[override]
        return self.owner.weights_key

    @weights_key.setter
    def weights_key(self, key: str | None) -> None:
        self.owner.weights_key = key

    def apply_patch(self, patch: WeightPatch | None) -> None:
        self.owner.apply_patch(patch)

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._module is None:
            self._module = self._wrap(self.owner.ensure_loaded().module)
        with torch.inference_mode():
            outputs = self._module(*(inputs[name] for name in self.spec.input_names))
        return dict(zip(self.spec.output_names, outputs, strict=True))


def share_torch_weights(
    chain: RunnerChain, owner: RunnerChain, wrap: Callable[[torch.nn.Module], torch.nn.Module]
) -> None:
    """Replaces ``chain``'s torch runner by one on ``owner``'s torch module, wrapped, where both have one."""
    owners = [runner for runner in owner.runners if isinstance(runner, LazyTorchRunner)]
    for position, runner in enumerate(chain.runners):
        if isinstance(runner, LazyTorchRunner) and owners:
            chain.runners[position] = SharedTorchRunner(runner.spec, owners[0], wrap)


FP32_STANDBY_COMPONENTS = ("vae_decoder", "vae_encoder")
"""The components whose fp16 chains keep an fp32 torch runner aside for non-finite outputs (see above)."""
FAILURES_BEFORE_REMOVAL = 3
"""A runner that fails this many calls in a row is taken out of its chain."""
UNREADABLE = "its files in the engine store could not be read (the worker logged why)"
"""The reason a backend is unavailable when reading its artifact failed: the OS error names server paths."""
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
        found = [candidate for candidate in later if candidate.precision == "fp32"]
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
        _add(self._precisions, component, runner.precision)
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


def preferred_backends(backend: Backend, device: torch.device) -> list[Backend]:
    """Backends to try before torch, best first.

    On a GPU, ``auto`` tries TensorRT, then ONNX Runtime only where its CUDA provider is
    installed (ONNX Runtime on the CPU would be far slower than torch on the GPU).
    """
    if backend is Backend.TORCH:
        return []
    if backend is Backend.ONNXRUNTIME:
        return [Backend.ONNXRUNTIME]
    if device.type != "cuda":
        return [Backend.TENSORRT, Backend.ONNXRUNTIME] if backend is Backend.TENSORRT else [Backend.ONNXRUNTIME]
    return [Backend.TENSORRT, *([Backend.ONNXRUNTIME] if onnxruntime_has_cuda() else [])]


def graph_weight_map(store: Store, spec: ComponentSpec, fingerprint: str, precision: str) -> WeightMap | None:
    """The weight map of the ONNX export an engine was built from (its data file holds the base weights
    refits start from), or None where the export has none."""
    artifact = store.get(onnx_key(spec, fingerprint, precision))
    if artifact is None or WEIGHT_MAP_FILE not in artifact.files:
        return None
    try:
        artifact.check_sizes()
        return WeightMap.read(artifact.path)
    except (ArtifactError, OSError, ValueError) as error:
        log.warning("%s: no LoRA refits, the weight map is unusable: %s", spec.name, error)
        return None


def export_hint(model: str, public: bool = False) -> str:
    """The command that builds what is missing; ``public`` (for callers) names a local model folder
    by its setting, not by the server's path."""
    name = '"$MODEL"' if public and Path(model).exists() else shlex.quote(model)
    return f"run `python -m export --model {name}`"


def build_chains(
    model: Model,
    settings: Settings,
    store: Store,
    device: torch.device,
    precision: str,
    components: Sequence[str] | None = None,
) -> tuple[dict[str, RunnerChain], TensorRTBackend]:
    """A runner chain per component (default: the family's), and the TensorRT engines behind them
    (which share memory)."""
    components = model.components if components is None else components
    wanted = {c: preferred_backends(settings.backend_for(c), device) for c in components}
    precisions = {c: model.family.component_precision(c, precision, model.config) for c in components}
    fingerprints: dict[str, str] = {}

    def fingerprint(component: str) -> str:
        if component not in fingerprints:
            fingerprints[component] = component_fingerprint(model, component, store.file_digest)
        return fingerprints[component]

    tensorrt_components = [c for c, backends in wanted.items() if Backend.TENSORRT in backends]
    ranges = parse_ranges(settings.engine_profiles, model.config.native_size, settings.max_images)
    tensorrt = TensorRTBackend({}, dict.fromkeys(tensorrt_components, "TensorRT needs a CUDA device"))
    if tensorrt_components and device.type == "cuda":
        try:
            tensorrt = load_tensorrt(
                store,
                {c: (model.specs[c], fingerprint(c), precisions[c]) for c in tensorrt_components},
                device,
                gpu_tag(device),
                settings.cuda_graphs,
                max_shapes=settings.cuda_graph_shapes,
                profile_labels={
                    c: profiles_label(component_profiles(model.specs[c], ranges, settings.max_prompt_chunks))
                    for c in tensorrt_components
                },
            )
        except Exception as error:  # whatever TensorRT raises, the worker starts on the other backends
            log.exception("TensorRT engines could not be loaded")
            reason = f"the engines could not be loaded ({type(error).__name__}; the worker logged why)"
            tensorrt = TensorRTBackend({}, dict.fromkeys(tensorrt_components, reason))

    for component, runner in tensorrt.runners.items():
        runner.weight_map = graph_weight_map(
            store, model.specs[component], fingerprint(component), precisions[component]
        )

    not_built: dict[str, list[str]] = {}
    chains = {}
    for component, backends in wanted.items():
        spec, runners, unavailable = model.specs[component], [], {}
        for backend in backends:
            try:
                if backend is Backend.TENSORRT:
                    if component in tensorrt.missing:
                        raise NotBuilt(tensorrt.unavailable[component])
                    if component not in tensorrt.runners:
                        raise BackendUnavailable(tensorrt.unavailable.get(component, "no engine"))
                    runners.append(tensorrt.runners[component])
                else:
                    runners.append(
                        load_onnxruntime_runner(
                            store, spec, fingerprint(component), precisions[component], device, settings.lora_sessions
                        )
                    )
            except NotBuilt as error:
                not_built.setdefault(backend.value, []).append(component)
                unavailable[backend.value] = f"{error} ({export_hint(settings.model, public=True)})"
            except (ArtifactError, BackendUnavailable, OSError) as error:
                log.warning("%s: %s unavailable: %s", component, backend.value, error)
                unavailable[backend.value] = str(error) if not isinstance(error, OSError) else UNREADABLE
        standby = None
        if not backends or settings.torch_fallback is not TorchFallback.OFF:
            load = functools.partial(model.torch_module, component, PRECISION_DTYPES[precisions[component]])
            runners.append(LazyTorchRunner(spec, load, precisions[component], device))
            if precisions[component] == "fp16" and component in FP32_STANDBY_COMPONENTS:
                fp32 = functools.partial(model.torch_module, component, torch.float32)
                standby = LazyTorchRunner(spec, fp32, "fp32", device)
        else:
            unavailable["torch"] = "TORCH_FALLBACK=off"
        chains[component] = RunnerChain(component, runners, unavailable, standby)
    for backend, components in not_built.items():
        log.info(
            "nothing built for %s yet (%s): %s; the next backend serves them (engine store: %s)",
            backend,
            ", ".join(components),
            export_hint(settings.model),
            store.root,
        )
    return chains, tensorrt
