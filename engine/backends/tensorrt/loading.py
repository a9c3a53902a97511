"""Finding a component's engines in the store for this GPU and TensorRT version, and loading them.

An engine built for another GPU or TensorRT version is skipped with its reason; the engines
loaded share one scratch buffer, sized by the largest.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import torch

from engine.backends.tensorrt.engine import LoadedEngine
from engine.backends.tensorrt.runner import TensorRTBackend, TensorRTRunner
from engine.backends.tensorrt.runtime import built_by_newer, make_runtime, tensorrt_module, version_refusal
from engine.common.errors import BackendUnavailable, WorkerError
from engine.spec import ComponentSpec
from engine.store.artifact import Artifact
from engine.store.keys import ENGINE_FILE, exporter_id
from engine.store.profiles import Profile
from engine.store.store import Store

log = logging.getLogger(__name__)


def engines_for_gpu(
    store: Store, spec: ComponentSpec, fingerprint: str, precision: str, gpu: str, quantization: str | None = None
) -> list[Artifact]:
    """Every engine built for this component, weights, precision, quantization (None: unquantized) and GPU,
    whatever its TensorRT version."""
    return store.find(
        kind="tensorrt",
        component=spec.name,
        fingerprint=fingerprint,
        precision=precision,
        gpu=gpu,
        quantization=quantization,
    )


def runnable(artifact: Artifact, spec: ComponentSpec, version: str) -> bool:
    """Built by this TensorRT (or version-compatible with it) from the graph this exporter makes."""
    return version_refusal(str(artifact.key.tensorrt), version) is None and artifact.key.exporter == exporter_id(spec)


def deserialize(
    trt: ModuleType,
    runtime: Any,
    plan: bytes | mmap.mmap,
    profiles: tuple[Profile, ...],
    spec: ComponentSpec,
    device: torch.device,
    name: str,
    use_cuda_graphs: bool = False,
    max_shapes: int = 4,
) -> LoadedEngine:
    """The engine in ``plan``, any object with the buffer protocol: ``Runtime.deserialize_cuda_engine`` takes a
    buffer (its signature in the bindings), so a plan mapped from its file is never copied into this process."""
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
    quantization: str | None = None,
) -> TensorRTBackend:
    """Engines for each component (spec, fingerprint, precision); a plan that does not load is skipped.

    Where the store has an engine with the component's configured profiles (``profile_labels``),
    only that one is loaded (one set of weights per component); otherwise every engine it has
    for this GPU.
    """
    trt = trt or tensorrt_module()
    runtime = make_runtime(trt)
    version = trt.__version__
    loaded: dict[str, list[LoadedEngine]] = {}
    unavailable: dict[str, str] = {}
    built_for_gpu: dict[str, list[str]] = {}
    missing: list[str] = []
    for component, (spec, fingerprint, precision) in components.items():
        reasons = []
        for_gpu = engines_for_gpu(store, spec, fingerprint, precision, gpu, quantization)
        newer = [a for a in for_gpu if built_by_newer(str(a.key.tensorrt), version)]
        for artifact in newer:  # never deserialized: the plan cannot load here, and trying costs time and memory
            log.info("skipping engine %s: %s", artifact.path.name, version_refusal(str(artifact.key.tensorrt), version))
        if len(newer) < len(for_gpu):  # engines only a newer worker can load leave the store usable by this one
            built_for_gpu[component] = sorted({str(a.key.tensorrt) for a in for_gpu if a not in newer})
        candidates = [a for a in for_gpu if runnable(a, spec, version)]
        wanted = (profile_labels or {}).get(component)
        configured = [a for a in candidates if a.key.profile == wanted]
        if candidates and wanted is not None and not configured:
            log.warning("%s: no engine built for profiles %s, loading the store's others", component, wanted)
        for artifact in configured or candidates:
            try:
                profiles = tuple(Profile.from_json(profile) for profile in artifact.manifest["profiles"])
                with artifact.mapped_verified(ENGINE_FILE) as plan:
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
            what = f"no {quantization} engine" if quantization else "no engine"
            unavailable[component] = f"{what} for {gpu} and TensorRT {version} in the engine store" + "".join(
                f" ({artifact.path.name}: {version_refusal(str(artifact.key.tensorrt), version)})" for artifact in newer
            )
            missing.append(component)
    unusable = None
    if built_for_gpu and not loaded:
        built = "; ".join(f"{c}: TensorRT {', '.join(v)}" for c, v in built_for_gpu.items())
        unusable = f"the store has engines for {gpu} ({built}) but none loads with TensorRT {version}: " + "; ".join(
            unavailable[c] for c in built_for_gpu
        )
    runners, scratch = share_memory(loaded, {c: precision for c, (_, _, precision) in components.items()}, device)
    backend = TensorRTBackend(runners, unavailable, scratch, unusable, missing)
    if runners:
        log.info("TensorRT engines hold %.0f MB of GPU memory", backend.memory_bytes / 2**20)
    return backend
