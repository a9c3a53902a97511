"""One component through the stages: export -> optimize -> validate -> publish.

Each stage's time goes into the artifact's manifest, and a stage is skipped
entirely when its artifact is already in the store.
"""

from __future__ import annotations

import gc
import logging
import mmap
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import ModuleType

import torch

from engine.backends.onnxruntime import OnnxRuntimeRunner, providers_for
from engine.backends.tensorrt.loading import deserialize, share_memory
from engine.backends.tensorrt.runner import TensorRTRunner
from engine.backends.tensorrt.runtime import make_logger, make_runtime, tensorrt_module, version_tags
from engine.common.errors import BackendUnavailable
from engine.models.model import Model
from engine.settings import default_export_work_dir
from engine.sizes import SizeRange
from engine.spec import ComponentSpec, Dims
from engine.store.artifact import Artifact
from engine.store.fingerprint import component_fingerprint
from engine.store.keys import ENGINE_FILE, ONNX_FILE, engine_key, onnx_key
from engine.store.profiles import Profile, component_profiles, profiles_label
from engine.store.staging import Staging, scratch_folder
from engine.store.store import Store
from engine.store.weightmap import WEIGHT_MAP_FILE, WeightMap
from export.onnx import export_dims
from export.optimize import optimize
from export.stagelog import StageLog
from export.tensorrt import BuildOptions, TimingCache, build_engine, refit_names, timing_cache_name
from export.trace import load_module, references_for, trace_component
from export.validate import Reference, Tolerance, check, compare, validation_dims
from export.weightmap import map_weights

log = logging.getLogger(__name__)

QUANTIZED_ENGINE_TOLERANCE = Tolerance(atol=5e-2, rtol=1e-1)
"""A quantized engine against the unquantized fp32 module: the quantization's own error on top of the fp16
bound. Not yet measured on a GPU; ModelOpt's fake quantization on the CPU was within it."""

TOOLS = (
    "torch",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "polygraphy",
    "diffusers",
    "transformers",
    "tensorrt",
    "nvidia-modelopt",
)


def tool_versions() -> dict[str, str]:
    found = {}
    for name in TOOLS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def validation_device(device: torch.device, precision: str) -> torch.device:
    """Where ONNX Runtime validates: the GPU with onnxruntime-gpu, else the CPU. bf16 graphs are
    validated on the CPU, as their fp32-arithmetic twin: onnxruntime's CUDA kernels cover bf16 in part."""
    if device.type == "cuda" and precision != "bf16":
        try:
            providers_for(device)
            return device
        except BackendUnavailable:
            log.warning("onnxruntime-gpu is not installed; validating ONNX graphs on the CPU")
    return torch.device("cpu")


def release_memory(device: torch.device) -> None:
    """Returns what freed modules held, so the next stage starts from a low-water mark."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Exporter:
    model: Model
    store: Store
    device: torch.device
    precision: str
    work_dir: Path = field(default_factory=default_export_work_dir)
    """Local folder for raw exports; only validated artifacts reach the store."""

    def component_precision(self, component: str) -> str:
        return self.model.family.component_precision(component, self.precision, self.model.config)

    def onnx(self, component: str, stages: StageLog) -> Artifact:
        spec = self.model.specs[component]
        precision = self.component_precision(component)
        with stages.stage("fingerprint"):
            fingerprint = component_fingerprint(self.model, component, self.store.file_digest)
        key = onnx_key(spec, fingerprint, precision)

        def build(staging: Staging) -> None:
            device = validation_device(self.device, precision)
            with scratch_folder(self.work_dir) as raw_dir:
                raw = raw_dir / ONNX_FILE
                dims = validation_dims(self.model, device)
                stages.on_stage("trace")
                traced = trace_component(self.model, component, self.device, dims, raw, precision)
                references = traced.references
                stages.merge(traced.stages)  # load, reference, export and hashing, timed where they ran
                release_memory(self.device)
                with stages.stage("optimize"):
                    graph = optimize(raw, staging.path / ONNX_FILE, spec, precision)
            with stages.stage("weight map"):
                weight_map = map_weights(staging.path / ONNX_FILE, traced.digests)
                weight_map.write(staging.path)
            with stages.stage("validate"):
                candidate = OnnxRuntimeRunner(spec, staging.path / ONNX_FILE, precision, device)
                parity = check(spec, "onnxruntime", compare(spec, references, candidate, precision))
                del candidate
            staging.info.update(
                model=self.model.name,
                traced_size=f"{export_dims(self.model).height}x{export_dims(self.model).width}",
                graph=asdict(graph),
                weight_map={"mapped": len(weight_map.weights), "unpatchable": list(weight_map.unpatchable)},
                parity=parity,
                validation=validation_record("onnxruntime", device, references),
                tools=tool_versions(),
                **stages.report(),
            )

        return self.store.ensure(key, build)

    def engine(self, component: str, onnx: Artifact, builder: EngineBuilder, stages: StageLog) -> Artifact:
        """One engine for every configured size range (one optimization profile each, the weights held
        once), validated against torch through the TensorRT runner at sizes each profile covers."""
        spec = self.model.specs[component]
        precision = self.component_precision(component)
        profiles = component_profiles(spec, builder.ranges, builder.max_prompt_chunks)
        label = profiles_label(profiles)
        quantization, recipe = onnx.key.quantization, onnx.key.recipe
        key = engine_key(spec, onnx.key.fingerprint, precision, builder.gpu, builder.tag, label, quantization, recipe)

        def build(staging: Staging) -> None:
            onnx.verify()
            candidates = validation_dims(self.model, self.device)
            dims = list(dict.fromkeys(d for profile in profiles for d in covered_dims(spec, profile, candidates)))
            with stages.stage("reference engine"):
                module = load_module(self.model, component, self.device)
                references = references_for(self.model, component, module, dims)
                del module
            release_memory(self.device)
            plan = staging.path / ENGINE_FILE
            weight_map = WeightMap.read(onnx.path) if WEIGHT_MAP_FILE in onnx.files else None
            refittable = refit_names(weight_map, builder.options.refit)
            with stages.stage("build engine"):
                marked = builder.build(onnx.file(ONNX_FILE), profiles, plan, refittable)
            with stages.stage("validate engine"):
                candidate = builder.runner(spec, plan, profiles, precision, self.device)
                tolerance = QUANTIZED_ENGINE_TOLERANCE if quantization else None
                parity = check(spec, "tensorrt", compare(spec, references, candidate, precision, tolerance))
                del candidate
            staging.info.update(
                model=self.model.name,
                quantization=onnx.manifest.get("quantization"),
                profiles=[profile.to_json() for profile in profiles],
                builder=asdict(builder.options),
                engine_bytes=plan.stat().st_size,
                refittable_weights=marked,
                parity=parity,
                validation=validation_record("tensorrt", self.device, references),
                tools=tool_versions(),
                **stages.report(),
            )

        return self.store.ensure(key, build)


def validation_record(backend: str, device: torch.device, references: list[Reference]) -> dict:
    """What the manifest says about how an artifact was checked."""
    return {"backend": backend, "device": str(device), "shapes": [r.shape for r in references]}


def covered_dims(spec: ComponentSpec, profile: Profile, candidates: list[Dims]) -> list[Dims]:
    """The validation sizes an engine's profile covers, or its optimum when it covers none of them; a
    reference image (Flux Kontext's) at a size it can have (``ComponentSpec.reference_within``)."""
    candidates = [spec.reference_within(d) for d in candidates]
    covered = [d for d in candidates if profile.unsupported_reason(spec.input_shapes(d)) is None]
    if covered:
        return covered
    batch, height, width = 1, *_optimum_size(spec, profile)
    return [spec.reference_within(Dims(batch, height, width))]


def _optimum_size(spec: ComponentSpec, profile: Profile) -> tuple[int, int]:
    for tensor in spec.inputs:
        if "latent_height" in tensor.shape:
            shape = profile.shapes()[tensor.name].optimum
            return (
                shape[tensor.shape.index("latent_height")] * spec.latent_factor,
                shape[tensor.shape.index("latent_width")] * spec.latent_factor,
            )
        if "height" in tensor.shape:
            shape = profile.shapes()[tensor.name].optimum
            return shape[tensor.shape.index("height")], shape[tensor.shape.index("width")]
    return 512, 512  # the component has no spatial input (a text encoder): any size will do


@dataclass
class EngineBuilder:
    """TensorRT's builder for this GPU and version, with the store's timing cache."""

    trt: ModuleType
    ranges: list[SizeRange]
    options: BuildOptions
    gpu: str
    tag: str
    timing_cache: TimingCache
    logger: object = None
    max_prompt_chunks: int = 1

    @classmethod
    def create(
        cls,
        store: Store,
        gpu: str,
        ranges: list[SizeRange],
        options: BuildOptions,
        lock_stale_s: float,
        lock_heartbeat_s: float,
        trt: ModuleType | None = None,
        max_prompt_chunks: int = 1,
        gpu_model: str = "",
    ) -> EngineBuilder:
        """``gpu_model`` (``runtime.gpu_model``) keys the timing cache by the GPU's model as well as its ``gpu`` tag."""
        trt = trt or tensorrt_module()
        if not hasattr(trt, "Builder"):
            raise BackendUnavailable("building engines needs the full TensorRT package, not the lean runtime")
        version, compatible = version_tags(trt)
        cache_path = store.root / "timing-cache" / timing_cache_name(gpu, gpu_model, version)
        cache = TimingCache(cache_path, lock_stale_s, lock_heartbeat_s)
        tag = compatible if options.version_compatible else version
        return cls(trt, ranges, options, gpu, tag, cache, make_logger(trt), max_prompt_chunks)

    def build(self, onnx_path: Path, profiles: list[Profile], plan: Path, refittable: list[str]) -> int:
        return build_engine(
            self.trt, self.logger, onnx_path, profiles, self.options, self.timing_cache, plan, refittable
        )

    def runner(
        self, spec: ComponentSpec, plan: Path, profiles: list[Profile], precision: str, device: torch.device
    ) -> TensorRTRunner:
        """The engine just built, through the same loading and runner the worker uses, deserialized from its
        file mapped into memory rather than read into a copy."""
        runtime = make_runtime(self.trt, self.logger)
        with plan.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            loaded = deserialize(self.trt, runtime, mapped, tuple(profiles), spec, device, spec.name)
        runners, _ = share_memory({spec.name: [loaded]}, {spec.name: precision}, device)
        return runners[spec.name]
