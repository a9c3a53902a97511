"""Which backend runs each component: a runner chain per component, built from the settings and the store.

The backends are tried in the order ``BACKEND`` asks for, each with the artifacts the
store holds for this model, precision and GPU; what could not be loaded is left out of
the chain with its reason, and torch ends every chain unless ``TORCH_FALLBACK=off``
(see ``engine.backends.chain`` for how a chain runs a call). ONNX Runtime is imported only
when a chain asks for it, so a torch-only worker starts without it.
"""

from __future__ import annotations

import functools
import logging
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from engine.backends.chain import RunnerChain
from engine.backends.quantized import (
    QuantizedRunner,
    load_quantized_onnxruntime,
    load_quantized_tensorrt,
    quantized_name,
)
from engine.backends.tensorrt.loading import load_tensorrt
from engine.backends.tensorrt.runner import TensorRTBackend
from engine.backends.tensorrt.runtime import gpu_tag
from engine.backends.torch import AdapterTorchRunner, LazyTorchRunner, SharedTorchRunner
from engine.common.dtypes import PRECISION_DTYPES
from engine.common.errors import ArtifactError, BackendUnavailable, NotBuilt
from engine.devices import resolve_quantization
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


FP32_STANDBY_COMPONENTS = ("vae_decoder", "vae_encoder")
"""The components whose fp16 chains keep an fp32 torch runner aside for non-finite outputs (see above)."""
UNREADABLE = "its files in the engine store could not be read (the worker logged why)"
"""The reason a backend is unavailable when reading its artifact failed: the OS error names server paths."""


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
    from engine.backends.onnxruntime import onnxruntime_has_cuda

    return [Backend.TENSORRT, *([Backend.ONNXRUNTIME] if onnxruntime_has_cuda() else [])]


def tensorrt_runs_on(device: torch.device) -> bool:
    """TensorRT engines run on CUDA devices only."""
    return device.type == "cuda"


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


def add_quantized(
    runners: list,
    unavailable: dict[str, str],
    backend: Backend,
    tensorrt: TensorRTBackend,
    store: Store,
    spec: ComponentSpec,
    fingerprint: str,
    precision: str,
    quantization: str,
    device: torch.device,
) -> None:
    """The quantized runner of ``backend`` into ``runners``, or why there is none into ``unavailable``."""
    label = f"{backend.value} {quantization}"
    if backend is Backend.TENSORRT:
        name = quantized_name(spec.name, quantization)
        if name in tensorrt.runners:
            runners.append(QuantizedRunner(tensorrt.runners[name], quantization))
        else:
            unavailable[label] = tensorrt.unavailable.get(name, f"no {quantization} engine")
        return
    try:
        runners.append(load_quantized_onnxruntime(store, spec, fingerprint, precision, quantization, device))
    except (ArtifactError, BackendUnavailable, OSError) as error:
        log.warning("%s: %s unavailable: %s", spec.name, label, error)
        unavailable[label] = str(error) if not isinstance(error, OSError) else UNREADABLE
    except Exception as error:  # onnxruntime refusing the graph: the unquantized one serves
        log.exception("%s: %s could not be loaded", spec.name, label)
        unavailable[label] = f"could not be loaded ({type(error).__name__}; the worker logged why)"


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
    if tensorrt_components and tensorrt_runs_on(device):
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

    quantization = resolve_quantization(settings.quantize, device)
    denoiser = model.family.denoiser
    quantized = quantization is not None and denoiser in components
    if quantized and denoiser in tensorrt_components and tensorrt_runs_on(device):
        spec = model.specs[denoiser]
        try:
            load_quantized_tensorrt(
                tensorrt,
                store,
                (spec, fingerprint(denoiser), precisions[denoiser]),
                quantization,
                device,
                gpu_tag(device),
                settings.cuda_graphs,
                settings.cuda_graph_shapes,
                profiles_label(component_profiles(spec, ranges, settings.max_prompt_chunks)),
            )
        except Exception as error:  # the unquantized engine serves
            log.exception("the %s engine could not be loaded", quantization)
            tensorrt.unavailable[quantized_name(denoiser, quantization)] = (
                f"could not be loaded ({type(error).__name__})"
            )

    for component, runner in tensorrt.runners.items():
        if runner.quantization is not None or component not in model.specs:
            continue
        runner.weight_map = graph_weight_map(
            store, model.specs[component], fingerprint(component), precisions[component]
        )

    not_built: dict[str, list[str]] = {}
    chains = {}
    for component, backends in wanted.items():
        spec, runners, unavailable = model.specs[component], [], {}
        for backend in backends:
            if quantized and component == denoiser:
                add_quantized(runners, unavailable, backend, tensorrt, store, spec, fingerprint(component),
                              precisions[component], quantization, device)  # fmt: skip
            try:
                if backend is Backend.TENSORRT:
                    if component in tensorrt.missing:
                        raise NotBuilt(tensorrt.unavailable[component])
                    if component not in tensorrt.runners:
                        raise BackendUnavailable(tensorrt.unavailable.get(component, "no engine"))
                    runners.append(tensorrt.runners[component])
                else:
                    from engine.backends.onnxruntime import load_onnxruntime_runner

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


def share_torch_weights(
    chain: RunnerChain, owner: RunnerChain, wrap: Callable[[torch.nn.Module], torch.nn.Module]
) -> None:
    """Replaces ``chain``'s torch runner by one on ``owner``'s torch module, wrapped, where both have one."""
    owners = [runner for runner in owner.runners if isinstance(runner, LazyTorchRunner)]
    for position, runner in enumerate(chain.runners):
        if isinstance(runner, LazyTorchRunner) and owners:
            chain.runners[position] = SharedTorchRunner(runner.spec, owners[0], wrap)


def share_adapter_weights(
    chain: RunnerChain, owner: RunnerChain, wrap: Callable[[torch.nn.Module], torch.nn.Module], own_prefix: str
) -> None:
    """``share_torch_weights`` for an IP denoiser: its torch runner runs ``owner``'s module, wrapped, and
    keeps the wrapper's own parameters (those under ``own_prefix``, the adapter's matrices) itself."""
    owners = [runner for runner in owner.runners if isinstance(runner, LazyTorchRunner)]
    for position, runner in enumerate(chain.runners):
        if isinstance(runner, LazyTorchRunner) and owners:
            chain.runners[position] = AdapterTorchRunner(runner.spec, owners[0], wrap, own_prefix)
