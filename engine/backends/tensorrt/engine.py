"""TensorRT backend: engines from the store, run with execute_async_v3 on a dedicated stream.

Every engine of the worker runs on one CUDA stream, one after another, so their
execution contexts share one scratch buffer (``USER_MANAGED`` device memory sized by
the largest ``device_memory_size_v2``). Each input shape gets its own execution context
and buffers, made once and kept (``CUDA_GRAPH_SHAPES`` per engine, least recently used
out), so a context is never reconfigured under a captured graph. With CUDA graphs, the
warm-up captures each profile's optimum shapes and requests at those shapes replay them;
other shapes run plainly. A component can have several engines (one per configured
range); each call runs the covering engine tuned closest to the request.
``import tensorrt`` happens here only, so CPU paths never need it.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from engine.backends.base import Runner
from engine.common.dtypes import BY_TENSORRT, BY_TORCH
from engine.common.errors import BackendUnavailable, WorkerError
from engine.common.faults import DeviceExecutionError
from engine.spec import ComponentSpec, Shape
from engine.store.keys import ENGINE_FILE, exporter_id
from engine.store.profiles import Profile, choose
from engine.store.store import Artifact, Store
from engine.store.weightmap import WeightMap

if TYPE_CHECKING:
    from engine.lora.library import WeightPatch

log = logging.getLogger(__name__)


def tensorrt_module() -> ModuleType:
    """The full TensorRT bindings, or the lean runtime (which runs version-compatible engines)."""
    try:
        import tensorrt

        return tensorrt
    except ImportError:
        pass
    try:
        import tensorrt_lean

        return tensorrt_lean
    except ImportError as error:
        raise BackendUnavailable("TensorRT is not installed (pip install '.[gpu]')") from error


def version_tags(trt: ModuleType) -> tuple[str, str]:
    """The exact version an engine must match, and the tag of version-compatible engines it can run."""
    version = trt.__version__
    return version, f"{version.split('.')[0]}.x-vc"


def gpu_tag(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


def make_logger(trt: ModuleType) -> Any:
    """TensorRT's messages into this process's logging, at matching levels."""
    severity = trt.ILogger.Severity
    levels = {
        severity.INTERNAL_ERROR: logging.CRITICAL,
        severity.ERROR: logging.ERROR,
        severity.WARNING: logging.WARNING,
        severity.INFO: logging.DEBUG,
        severity.VERBOSE: logging.DEBUG,
    }

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, level: Any, message: str) -> None:
            log.log(levels.get(level, logging.INFO), "tensorrt: %s", message)

    return Logger()


@dataclass
class _ShapeSlot:
    """One execution context, configured once for one set of input shapes, with its buffers and,
    once captured, its CUDA graph. A graph freezes its context's shapes and addresses, so a
    context is never reconfigured: another shape gets another context (they share the scratch)."""

    context: Any
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    graph: torch.cuda.CUDAGraph | None = None


@dataclass
class LoadedEngine:
    """One deserialized engine, with a context and buffers per input shape (least recently used out)."""

    trt: ModuleType
    engine: Any
    profiles: tuple[Profile, ...]
    """The engine's optimization profiles, in the order it was built with them."""
    spec: ComponentSpec
    device: torch.device
    use_cuda_graphs: bool
    name: str = ""
    max_shapes: int = 4
    plan_bytes: int = 0
    scratch: torch.Tensor | None = None
    slots: OrderedDict[tuple[Shape, ...], _ShapeSlot] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        expected = set(self.spec.input_names) | set(self.spec.output_names)
        if names != expected:
            raise BackendUnavailable(f"engine tensors {sorted(names)} do not match the spec's {sorted(expected)}")

    @property
    def device_memory_size(self) -> int:
        return int(self.engine.device_memory_size_v2)

    def bind_scratch(self, scratch: torch.Tensor) -> None:
        """The device memory every context of every engine uses; they run one at a time on one stream."""
        self.scratch = scratch
        for slot in self.slots.values():
            slot.context.set_device_memory(scratch.data_ptr(), scratch.numel())

    def _dtype(self, name: str) -> torch.dtype:
        return BY_TENSORRT[self.engine.get_tensor_dtype(name).name].torch

    def _new_slot(self, key: tuple[Shape, ...], stream: torch.cuda.Stream | None) -> _ShapeSlot:
        if self.scratch is None:
            raise BackendUnavailable(f"{self.name}: no scratch memory bound")
        index = choose(self.profiles, dict(zip(self.spec.input_names, key, strict=True)))
        if index is None:
            raise BackendUnavailable(f"{self.name}: no profile covers {key}")
        context = self.engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        context.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
        if not context.set_optimization_profile_async(index, stream.cuda_stream if stream is not None else 0):
            raise BackendUnavailable(f"{self.name}: TensorRT refused optimization profile {index}")
        for name, shape in zip(self.spec.input_names, key, strict=True):
            if not context.set_input_shape(name, shape):
                raise BackendUnavailable(f"{self.name}: TensorRT refused shape {shape} for {name}")
        inputs = {
            name: torch.empty(shape, dtype=self._dtype(name), device=self.device)
            for name, shape in zip(self.spec.input_names, key, strict=True)
        }
        outputs = {
            name: torch.empty(tuple(context.get_tensor_shape(name)), dtype=self._dtype(name), device=self.device)
            for name in self.spec.output_names
        }
        for name, tensor in (*inputs.items(), *outputs.items()):
            context.set_tensor_address(name, tensor.data_ptr())
        return _ShapeSlot(context, inputs, outputs)

    def _slot(self, key: tuple[Shape, ...], stream: torch.cuda.Stream | None) -> _ShapeSlot:
        """The context for these shapes, made on first use; the least recently used one goes past ``max_shapes``."""
        slot = self.slots.get(key)
        if slot is not None:
            self.slots.move_to_end(key)
            return slot
        if len(self.slots) >= self.max_shapes:
            if stream is not None:
                stream.synchronize()  # nothing queued may still use the buffers about to be freed
            evicted, _ = self.slots.popitem(last=False)
            log.debug("%s: dropped the context for %s", self.name, evicted)
        slot = self.slots[key] = self._new_slot(key, stream)
        return slot

    def execute(self, inputs: Mapping[str, torch.Tensor], stream: torch.cuda.Stream | None) -> dict[str, torch.Tensor]:
        """Copies inputs into the shape's buffers, runs (or replays), and returns copies of the outputs."""
        key = tuple(tuple(inputs[name].shape) for name in self.spec.input_names)
        slot = self._slot(key, stream)
        handle = stream.cuda_stream if stream is not None else 0
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for name, tensor in inputs.items():
                slot.inputs[name].copy_(tensor, non_blocking=True)
            if slot.graph is not None:
                slot.graph.replay()
            elif not slot.context.execute_async_v3(handle):
                raise DeviceExecutionError(f"{self.spec.name}: TensorRT execution failed")
            return {name: tensor.clone() for name, tensor in slot.outputs.items()}

    def refit(
        self,
        weight_map: WeightMap,
        patch: WeightPatch | None,
        restore: Iterable[str],
        stream: torch.cuda.Stream | None,
    ) -> None:
        """Sets the patch's weights to base + delta and the ``restore`` parameters back to base, from the
        base values in the graph's data file every time (refitting on top of an earlier LoRA would keep
        its trace), then refits on the worker's stream and recaptures the CUDA graphs it had."""
        refitter = self.trt.Refitter(self.engine, make_logger(self.trt))
        refittable = set(refitter.get_all_weights())
        wanted = set(patch.names) if patch is not None else set()
        targets = [
            (name, weight) for name in sorted(wanted | set(restore)) for weight in weight_map.by_parameter.get(name, [])
        ]
        fixed = sorted({weight.initializer for _, weight in targets} - refittable)
        if fixed:
            raise BackendUnavailable(
                f"{self.name} cannot refit {', '.join(fixed[:3])} "
                "(ENGINE_REFIT=all also makes convolution kernels refittable)"
            )
        location = self.trt.TensorLocation.DEVICE if self.device.type == "cuda" else self.trt.TensorLocation.HOST
        values = []  # TensorRT reads them during the refit: they live until it is done
        for name, weight in targets:
            delta = patch.delta(name, self.device) if patch is not None and name in wanted else None
            value = weight_map.patched_value(weight, delta, self.device)
            values.append(value)
            element = getattr(self.trt.DataType, BY_TORCH[value.dtype].tensorrt)
            if not refitter.set_named_weights(
                weight.initializer, self.trt.Weights(element, value.data_ptr(), value.numel()), location
            ):
                raise BackendUnavailable(f"{self.name}: TensorRT refused the weights for {weight.initializer}")
        if not refitter.refit_cuda_engine_async(stream.cuda_stream if stream is not None else 0):
            raise BackendUnavailable(
                f"{self.name}: TensorRT refused the refit (missing: {refitter.get_missing_weights()})"
            )
        if stream is not None:
            stream.synchronize()
        self._recapture(stream)

    def _recapture(self, stream: torch.cuda.Stream | None) -> None:
        """Graphs captured before a refit are replaced by new captures of the same shapes."""
        captured = [key for key, slot in self.slots.items() if slot.graph is not None]
        for key in captured:
            self.slots[key].graph = None
        if stream is not None:
            for key in captured:
                self._capture(key, stream)

    def capture_optima(self, stream: torch.cuda.Stream) -> int:
        """CUDA graphs of each profile's optimum shapes (at warm-up, never in a request); how many were kept."""
        captured = 0
        for profile in self.profiles:
            shapes = profile.shapes()
            captured += self._capture(tuple(shapes[name].optimum for name in self.spec.input_names), stream)
        return captured

    def _capture(self, key: tuple[Shape, ...], stream: torch.cuda.Stream) -> bool:
        """Runs these shapes once, then captures them; a capture whose enqueue fails is discarded."""
        slot = self._slot(key, stream)
        if slot.graph is not None:
            return True
        with torch.cuda.stream(stream):
            for tensor in slot.inputs.values():
                tensor.zero_()
            if not slot.context.execute_async_v3(stream.cuda_stream):  # the first run initializes lazily
                raise DeviceExecutionError(f"{self.spec.name}: TensorRT execution failed")
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=stream):
                captured = slot.context.execute_async_v3(stream.cuda_stream)
        except RuntimeError as error:
            log.warning("%s: CUDA graph capture failed at %s, running without: %s", self.name, key, error)
            return False
        if not captured:
            log.warning(
                "%s: TensorRT's enqueue failed during CUDA graph capture at %s, running without", self.name, key
            )
            return False
        slot.graph = graph
        return True


class TensorRTRunner(Runner):
    """One component's engines behind the Runner interface."""

    backend = "tensorrt"

    def __init__(
        self,
        spec: ComponentSpec,
        engines: Sequence[LoadedEngine],
        precision: str,
        device: torch.device,
        stream: torch.cuda.Stream | None,
    ):
        super().__init__(spec, precision, device)
        self.engines = list(engines)
        self.stream = stream
        self.weight_map: WeightMap | None = None
        """The map of the graph the engines were built from, which LoRA refits go through."""
        self._patched: set[str] = set()
        """Parameters a refit has changed from their base values."""

    def apply_patch(self, patch: WeightPatch | None) -> None:
        """Refits every engine of the component (see ``LoadedEngine.refit``)."""
        if self.weight_map is None:
            raise BackendUnavailable("the engine's ONNX export has no weight map; export it again to serve LoRAs")
        wanted = set(patch.names) if patch is not None else set()
        unpatchable = self.weight_map.cannot_patch(wanted)
        if unpatchable:
            raise BackendUnavailable(f"the graph's weight map cannot patch {', '.join(unpatchable[:3])}")
        if not wanted and not self._patched:
            return  # the engines hold their base weights
        for engine in self.engines:
            if not engine.engine.refittable:
                raise BackendUnavailable(
                    f"{engine.name} was built without refit (ENGINE_REFIT=none, or before LoRA support)"
                )
        restore, self._patched = self._patched, self._patched | wanted  # a failed refit leaves both to restore
        for engine in self.engines:
            engine.refit(self.weight_map, patch, restore, self.stream)
        self._patched = wanted

    def _profiles(self) -> list[tuple[LoadedEngine, Profile]]:
        return [(engine, profile) for engine in self.engines for profile in engine.store.profiles]

    def unsupported_reason(self, shapes: Mapping[str, Shape]) -> str | None:
        pairs = self._profiles()
        if choose([profile for _, profile in pairs], shapes) is not None:
            return None
        return "; ".join(filter(None, (profile.unsupported_reason(shapes) for _, profile in pairs)))

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        shapes = {name: tuple(tensor.shape) for name, tensor in inputs.items()}
        pairs = self._profiles()
        index = choose([profile for _, profile in pairs], shapes)
        if index is None:
            raise BackendUnavailable(f"{self.spec.name}: {self.unsupported_reason(shapes)}")
        caller = torch.cuda.current_stream(self.device) if self.stream is not None else None
        if self.stream is not None:
            self.stream.wait_stream(caller)  # inputs written on the caller's stream are ready
        outputs = pairs[index][0].execute(inputs, self.stream)
        if caller is not None:
            caller.wait_stream(self.stream)  # and outputs are ready for the caller, without a host sync
        return outputs

    def capture_graphs(self) -> int:
        """CUDA graphs for each engine's optimum shapes; how many were captured."""
        if self.stream is None:
            return 0
        captured = sum(engine.capture_optima(self.stream) for engine in self.engines if engine.use_cuda_graphs)
        self.stream.synchronize()
        return captured


@dataclass
class TensorRTBackend:
    """Every engine the worker runs, their shared scratch memory and stream."""

    runners: dict[str, TensorRTRunner]
    unavailable: dict[str, str]
    scratch: torch.Tensor | None = None
    unusable: str | None = None
    """Set when the store holds engines for this GPU and model but not one of them loads: a
    deployment problem (another TensorRT, corrupt plans) that slow torch serving would hide."""
    missing: list[str] = field(default_factory=list)
    """Components with no engine built yet (the normal state before `make engines`)."""

    def capture_graphs(self) -> int:
        """At warm-up: a CUDA graph for each engine's optimum shapes; how many were captured."""
        return sum(runner.capture_graphs() for runner in self.runners.values())

    @property
    def memory_bytes(self) -> int:
        """What the engines hold on the GPU: their plans (weights and kernels) and the shared scratch."""
        plans = sum(engine.plan_bytes for runner in self.runners.values() for engine in runner.engines)
        return plans + (self.scratch.numel() if self.scratch is not None else 0)


def engines_for_gpu(store: Store, spec: ComponentSpec, fingerprint: str, precision: str, gpu: str) -> list[Artifact]:
    """Every engine built for this component, weights, precision and GPU, whatever its TensorRT version."""
    return store.find(kind="tensorrt", component=spec.name, fingerprint=fingerprint, precision=precision, gpu=gpu)


def runnable(artifact: Artifact, spec: ComponentSpec, tags: tuple[str, str]) -> bool:
    """Built by this TensorRT (or version-compatible with it) from the graph this exporter makes."""
    return artifact.key.tensorrt in tags and artifact.key.exporter == exporter_id(spec)


def make_runtime(trt: ModuleType, logger: Any = None) -> Any:
    runtime = trt.Runtime(logger or make_logger(trt))
    runtime.engine_host_code_allowed = True  # version-compatible engines carry their own runtime code
    return runtime


def deserialize(
    trt: ModuleType,
    runtime: Any,
    plan: bytes,
    profiles: tuple[Profile, ...],
    spec: ComponentSpec,
    device: torch.device,
    name: str,
    use_cuda_graphs: bool = False,
    max_shapes: int = 4,
) -> LoadedEngine:
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise BackendUnavailable("TensorRT could not deserialize it (other version or GPU, or corrupt)")
    if engine.num_optimization_profiles != len(profiles):
        raise BackendUnavailable(f"{engine.num_optimization_profiles} profiles, its manifest lists {len(profiles)}")
    return LoadedEngine(
        trt, engine, profiles, spec, device, use_cuda_graphs, name=name, max_shapes=max_shapes, plan_bytes=len(plan)
    )


def share_memory(
    loaded: Mapping[str, list[LoadedEngine]], precisions: Mapping[str, str], device: torch.device
) -> tuple[dict[str, TensorRTRunner], torch.Tensor | None]:
    """A runner per component over engines that share one scratch buffer and one stream."""
    engines = [engine for group in loaded.values() for engine in group]
    if not engines:
        return {}, None
    scratch = torch.empty(max(1, *(e.device_memory_size for e in engines)), dtype=torch.uint8, device=device)
    for engine in engines:
        engine.bind_scratch(scratch)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    runners = {
        component: TensorRTRunner(group[0].spec, group, precisions[component], device, stream)
        for component, group in loaded.items()
    }
    return runners, scratch


def load_tensorrt(
    store: Store,
    components: Mapping[str, tuple[ComponentSpec, str, str]],
    device: torch.device,
    gpu: str,
    use_cuda_graphs: bool,
    trt: ModuleType | None = None,
    max_shapes: int = 4,
    profile_labels: Mapping[str, str] | None = None,
) -> TensorRTBackend:
    """Engines for each component (spec, fingerprint, precision); a plan that does not load is skipped.

    Where the store has an engine with the component's configured profiles (``profile_labels``),
    only that one is loaded (one set of weights per component); otherwise every engine it has
    for this GPU.
    """
    trt = trt or tensorrt_module()
    runtime = make_runtime(trt)
    tags = version_tags(trt)
    loaded: dict[str, list[LoadedEngine]] = {}
    unavailable: dict[str, str] = {}
    built_for_gpu: dict[str, list[str]] = {}
    missing: list[str] = []
    for component, (spec, fingerprint, precision) in components.items():
        reasons = []
        for_gpu = engines_for_gpu(store, spec, fingerprint, precision, gpu)
        if for_gpu:
            built_for_gpu[component] = sorted({str(artifact.key.tensorrt) for artifact in for_gpu})
        candidates = [a for a in for_gpu if runnable(a, spec, tags)]
        wanted = (profile_labels or {}).get(component)
        configured = [a for a in candidates if a.key.profile == wanted]
        if candidates and wanted is not None and not configured:
            log.warning("%s: no engine built for profiles %s, loading the store's others", component, wanted)
        for artifact in configured or candidates:
            try:
                plan = artifact.read_verified(ENGINE_FILE)
                profiles = tuple(Profile.from_json(profile) for profile in artifact.manifest["profiles"])
                engine = deserialize(
                    trt, runtime, plan, profiles, spec, device, artifact.path.name, use_cuda_graphs, max_shapes
                )
                loaded.setdefault(component, []).append(engine)
            except Exception as error:  # a plan that does not load is skipped, whatever the cause
                log.warning("skipping engine %s: %s", artifact.path.name, error)
                said = error if isinstance(error, WorkerError) else f"{type(error).__name__} (the worker logged why)"
                reasons.append(f"{artifact.path.name}: {said}")
        if component not in loaded and reasons:
            unavailable[component] = "; ".join(reasons)
        elif component not in loaded:
            unavailable[component] = f"no engine for {gpu} and TensorRT {tags[0]} in the engine store"
            missing.append(component)
    unusable = None
    if built_for_gpu and not loaded:
        built = "; ".join(f"{c}: TensorRT {', '.join(v)}" for c, v in built_for_gpu.items())
        unusable = f"the store has engines for {gpu} ({built}) but none loads with TensorRT {tags[0]}: " + "; ".join(
            unavailable[c] for c in built_for_gpu
        )
    runners, scratch = share_memory(loaded, {c: precision for c, (_, _, precision) in components.items()}, device)
    backend = TensorRTBackend(runners, unavailable, scratch, unusable, missing)
    if runners:
        log.info("TensorRT engines hold %.0f MB of GPU memory", backend.memory_bytes / 2**20)
    return backend
