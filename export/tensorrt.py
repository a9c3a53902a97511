"""Engine build: validated ONNX -> strongly typed TensorRT network -> serialized plan.

Precision comes from the ONNX file (fp16 weights and casts): TensorRT 11 builds only
strongly typed networks, and TensorRT 10 is asked for the same with the STRONGLY_TYPED
flag. One optimization profile per configured size range in one engine, a workspace limit, an optimization level,
a timing cache shared through the store so later builds on the same GPU model and
TensorRT version skip the tactic timing already done, and the weights LoRAs change
marked individually refittable. The plan goes from TensorRT's host memory to its file without
a copy: a Flux-size plan is tens of gigabytes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from engine.common.errors import ArtifactError
from engine.store.locking import BuildLock
from engine.store.profiles import Profile, profiles_label
from engine.store.weightmap import WeightMap

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildOptions:
    workspace_bytes: int
    optimization_level: int
    version_compatible: bool
    refit: str = "linear"
    """Which weights a LoRA may refit: ``linear`` (matrices), ``all`` (and convolution kernels), ``none``."""


def refit_names(weight_map: WeightMap | None, refit: str) -> list[str]:
    """The initializers to mark refittable: the mapped weights LoRAs change, and nothing else, so every
    other layer keeps the fusions that constant weights allow."""
    if weight_map is None or refit == "none":
        return []
    dims = {2} if refit == "linear" else {2, 3, 4, 5}
    return [weight.initializer for weight in weight_map.weights if len(weight.shape) in dims]


def mark_refittable(trt: ModuleType, network, config, names: Sequence[str]) -> int:
    """Individually refittable weights (``REFIT_INDIVIDUAL``); how many the network has."""
    if not names:
        return 0
    config.set_flag(trt.BuilderFlag.REFIT_INDIVIDUAL)
    return sum(bool(network.mark_weights_refittable(name)) for name in names)


def network_flags(trt: ModuleType) -> int:
    """0 on TensorRT 11 (always strongly typed); the STRONGLY_TYPED bit on TensorRT 10."""
    if int(trt.__version__.split(".")[0]) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def parse_onnx(trt: ModuleType, builder, logger, onnx_path: Path):
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(
            f"{error.node_name()}: {error.desc()}" for error in map(parser.get_error, range(parser.num_errors))
        )
        raise ArtifactError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    return network, parser


def builder_config(trt: ModuleType, builder, profiles: Sequence[Profile], options: BuildOptions, timing_cache: bytes):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    config.builder_optimization_level = options.optimization_level
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    for profile in profiles:  # one engine, one set of weights, an optimization profile per size range
        optimization_profile = builder.create_optimization_profile()
        for name, shapes in profile.inputs:
            optimization_profile.set_shape(name, shapes.minimum, shapes.optimum, shapes.maximum)
        config.add_optimization_profile(optimization_profile)
    if not config.set_timing_cache(config.create_timing_cache(timing_cache), False):
        # IBuilderConfig::setTimingCache refuses a cache whose device properties differ from this GPU's
        # (ignore_mismatch=False); the build goes on with an empty cache, which it fills with its own timings.
        log.warning("TensorRT refused the saved timing cache (made on another GPU); building without it")
        config.set_timing_cache(config.create_timing_cache(b""), False)
    return config


def timing_cache_name(gpu: str, gpu_model: str, version: str) -> str:
    """One cache per GPU model, not only per compute capability: GPUs of one SM (H100 PCIe and SXM; L4, L40S
    and RTX 4090) time tactics differently, and TensorRT refuses a cache another model made."""
    model = re.sub(r"[^a-z0-9]+", "-", gpu_model.lower()).strip("-")
    return f"{gpu}-{model}-trt{version}.cache" if model else f"{gpu}-trt{version}.cache"


class TimingCache:
    """A timing cache file per GPU model and TensorRT version, merged under a lock and replaced atomically."""

    def __init__(self, path: Path, lock_stale_s: float, lock_heartbeat_s: float):
        self.path = path
        self.lock = BuildLock(path.with_suffix(".lock"), lock_stale_s, lock_heartbeat_s)

    def read(self) -> bytes:
        with contextlib.suppress(FileNotFoundError):
            return self.path.read_bytes()
        return b""

    def merge(self, config) -> None:
        """Adds what this build timed to what other builds saved since it started. The plan is written
        by then, so a cache TensorRT cannot give back is logged, not raised."""
        cache = config.get_timing_cache()
        if cache is None:
            log.warning("TensorRT gave back no timing cache for this build; %s is left as it was", self.path.name)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            saved = self.read()
            if saved and not cache.combine(config.create_timing_cache(saved), False):
                log.warning("%s was made on another GPU or TensorRT; this build's timings replace it", self.path.name)
            temporary = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}")
            with open(temporary, "wb") as out:
                out.write(memoryview(cache.serialize()))
            os.replace(temporary, self.path)


def build_engine(
    trt: ModuleType,
    logger,
    onnx_path: Path,
    profiles: Sequence[Profile],
    options: BuildOptions,
    timing_cache: TimingCache,
    plan_path: Path,
    refittable: Sequence[str] = (),
) -> int:
    """Builds the plan; returns how many weights it can refit."""
    builder = trt.Builder(logger)
    network, _parser = parse_onnx(trt, builder, logger, onnx_path)
    config = builder_config(trt, builder, profiles, options, timing_cache.read())
    marked = mark_refittable(trt, network, config, refittable)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ArtifactError(f"TensorRT failed to build {onnx_path.name} for profiles {profiles_label(profiles)}")
    with open(plan_path, "wb") as out:
        # IHostMemory exposes the buffer protocol (py::buffer_protocol() and def_buffer in the bindings'
        # python/src/infer/pyFoundationalTypes.cpp): the file is written from TensorRT's own memory.
        out.write(memoryview(serialized))
    del serialized  # the plan's host memory goes back before anything else runs
    timing_cache.merge(config)
    return marked
