"""A stand-in for TensorRT where its full libraries and a GPU cannot exist (dev and CI machines).

It is a mock, and only for that: the code under test builds and runs "engines" through
it on the CPU, so the logic around TensorRT (profiles, keys, buffers, shapes, fallback)
runs for real. Each fake class declares ``__slots__``, so setting an attribute it does
not define fails, and ``test_tensorrt_api.py`` checks that every public method and
property a fake defines exists on TensorRT 11's real bindings: code that works against
these fakes uses only names TensorRT has. Enums are the real lean runtime's.

A fake engine "computes" each output from the first input of the same shape (times
two), or fills it with the first input's mean, reading and writing memory at the
addresses the runner set, so a stale address or shape shows up as a wrong value.

Each call the runner makes fails as the bindings' does (python/src/infer/pyCore.cpp and
NvInferRuntime.h): ``set_optimization_profile_async`` raises, ``set_tensor_address`` returns
False for a name that is no I/O tensor; a refit reads its weights (host or device) when it
runs, refuses while ``get_missing_weights`` names any (weights of the same shape built next
to each other count as fused in pairs, so setting one makes its partner missing), and may
fail having refitted some. With tests/fake_cuda.py installed, executions and refits run on
the stream they are given, and their reads are checked against the writes before them.
"""

from __future__ import annotations

import ctypes
import json
from types import SimpleNamespace

import numpy as np
import onnx
import tensorrt_lean as real

from engine.common.dtypes import BY_TENSORRT
from tests import fake_cuda

ONNX_TO_TRT = {
    onnx.TensorProto.FLOAT: "FLOAT",
    onnx.TensorProto.FLOAT16: "HALF",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.INT32: "INT32",
}


class ParserError:
    __slots__ = ("_text",)

    def __init__(self, text: str):
        self._text = text

    def desc(self) -> str:
        return self._text

    def node_name(self) -> str:
        return "node_0"


class INetworkDefinition:
    __slots__ = ("_flags", "_refittable", "_tensors", "_weights")

    def __init__(self, flags: int):
        self._flags = flags
        self._tensors: dict[str, dict] = {}
        self._weights: dict[str, dict] = {}
        self._refittable: list[str] = []

    def mark_weights_refittable(self, name: str) -> bool:
        if name not in self._weights:
            return False
        self._refittable.append(name)
        return True


class OnnxParser:
    __slots__ = ("_errors", "_network")

    def __init__(self, network: INetworkDefinition, logger: object):
        self._network = network
        self._errors: list[ParserError] = []

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, index: int) -> ParserError:
        return self._errors[index]

    def parse_from_file(self, model: str) -> bool:
        try:
            graph = onnx.load(model, load_external_data=False).graph
        except Exception as error:
            self._errors.append(ParserError(f"cannot read {model}: {error}"))
            return False
        for values, is_input in ((graph.input, True), (graph.output, False)):
            for value in values:
                tensor_type = value.type.tensor_type
                dims = [d.dim_param or d.dim_value for d in tensor_type.shape.dim]
                self._network._tensors[value.name] = {
                    "dtype": ONNX_TO_TRT[tensor_type.elem_type],
                    "input": is_input,
                    "dims": dims,
                }
        for tensor in graph.initializer:
            self._network._weights[tensor.name] = {"dtype": ONNX_TO_TRT[tensor.data_type], "dims": list(tensor.dims)}
        return True


class IOptimizationProfile:
    __slots__ = ("_shapes",)

    def __init__(self) -> None:
        self._shapes: dict[str, list] = {}

    def set_shape(self, input: str, min, opt, max) -> None:
        self._shapes[input] = [list(min), list(opt), list(max)]


class ITimingCache:
    __slots__ = ("_entries",)

    def __init__(self, entries: dict[str, int]):
        self._entries = entries

    def combine(self, input_cache: ITimingCache, ignore_mismatch: bool) -> bool:
        self._entries = {**input_cache._entries, **self._entries}
        return True

    def serialize(self) -> bytes:
        return json.dumps(self._entries, sort_keys=True).encode()


class IBuilderConfig:
    __slots__ = ("_cache", "_flags", "_level", "_pools", "_profiles")

    def __init__(self) -> None:
        self._pools: dict = {}
        self._flags: set = set()
        self._profiles: list[IOptimizationProfile] = []
        self._level = 3
        self._cache: ITimingCache | None = None

    @property
    def builder_optimization_level(self) -> int:
        return self._level

    @builder_optimization_level.setter
    def builder_optimization_level(self, level: int) -> None:
        self._level = level

    def set_memory_pool_limit(self, pool: object, pool_size: int) -> None:
        self._pools[pool] = pool_size

    def set_flag(self, flag: object) -> None:
        self._flags.add(flag)

    def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
        self._profiles.append(profile)
        return len(self._profiles) - 1

    def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache:
        return ITimingCache(json.loads(serialized_timing_cache) if serialized_timing_cache else {})

    def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
        self._cache = cache
        return True

    def get_timing_cache(self) -> ITimingCache:
        assert self._cache is not None
        return self._cache


class Builder:
    __slots__ = ("_logger",)
    failures = 0  # a test raises this to make the next builds return None, as TensorRT does on failure

    def __init__(self, logger: object):
        self._logger = logger

    def create_network(self, flags: int) -> INetworkDefinition:
        return INetworkDefinition(flags)

    def create_builder_config(self) -> IBuilderConfig:
        return IBuilderConfig()

    def create_optimization_profile(self) -> IOptimizationProfile:
        return IOptimizationProfile()

    def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> bytes | None:
        if Builder.failures:
            Builder.failures -= 1
            return None
        cache = config._cache  # the builder times into the config's cache, if it has one
        if cache is not None:
            cache._entries[f"tactic-{len(cache._entries)}"] = 1
        profiles = [profile._shapes for profile in config._profiles]
        refit = real.BuilderFlag.REFIT_INDIVIDUAL in config._flags or real.BuilderFlag.REFIT in config._flags
        refittable = {name: network._weights[name] for name in network._refittable} if refit else {}
        plan = {"tensors": network._tensors, "profiles": profiles, "flags": network._flags, "weights": refittable}
        return b"FAKEPLAN" + json.dumps(plan).encode()


def _derived_sizes(sizes: dict[str, int]) -> dict[str, int]:
    """Pixel and latent sizes imply each other (the VAE's factor 8), as a real engine's shape inference knows."""
    for pixel, latent in (("height", "latent_height"), ("width", "latent_width")):
        if latent in sizes:
            sizes.setdefault(pixel, sizes[latent] * 8)
        if pixel in sizes:
            sizes.setdefault(latent, sizes[pixel] // 8)
    return sizes


class IExecutionContext:
    __slots__ = ("_addresses", "_engine", "_executions", "_memory", "_profile", "_shapes", "_strategy")

    def __init__(self, engine: ICudaEngine, strategy: object):
        self._engine = engine
        self._strategy = strategy
        self._shapes: dict[str, tuple] = {}
        self._addresses: dict[str, int] = {}
        self._memory: tuple[int, int] | None = None
        self._executions = 0
        self._profile = 0

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        if not 0 <= profile_index < self._engine.num_optimization_profiles:
            raise RuntimeError("Error in set optimization profile async.")  # PY_ASSERT_RUNTIME_ERROR in pyCore.cpp
        self._profile = profile_index
        self._shapes = {}
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        low, _, high = self._engine._profiles[self._profile][name]
        shape = tuple(shape)
        if not all(lo <= s <= hi for s, lo, hi in zip(shape, low, high, strict=True)):
            return False
        self._shapes[name] = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        if name in self._shapes:
            return self._shapes[name]
        sizes: dict[str, int] = {}
        for input_name in self._engine._inputs:
            for dim, size in zip(self._engine._tensors[input_name]["dims"], self._shapes[input_name], strict=True):
                if isinstance(dim, str):
                    sizes[dim] = size
        sizes = _derived_sizes(sizes)
        return tuple(sizes[d] if isinstance(d, str) else d for d in self._engine._tensors[name]["dims"])

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if name not in self._engine._tensors or not memory:
            return False
        self._addresses[name] = memory
        return True

    def set_device_memory(self, memory: int, size: int) -> None:
        assert size >= self._engine.device_memory_size_v2
        self._memory = (memory, size)

    def _array(self, name: str, shape: tuple) -> np.ndarray:
        dtype = np.dtype(BY_TENSORRT[self._engine._tensors[name]["dtype"]].numpy)
        count = int(np.prod(shape))
        buffer = (ctypes.c_char * (count * dtype.itemsize)).from_address(self._addresses[name])
        return np.frombuffer(buffer, dtype=dtype).reshape(shape)

    def execute_async_v3(self, stream_handle: int) -> bool:
        assert self._memory is not None, "USER_MANAGED contexts need their device memory set"
        cuda = fake_cuda.ACTIVE

        def run() -> None:
            inputs = {name: self._array(name, self._shapes[name]) for name in self._engine._inputs}
            first = inputs[self._engine._inputs[0]]
            for name in self._engine._inputs:
                if cuda is not None:
                    cuda.read(self._addresses[name], name, stream_handle)
            for name in self._engine._outputs:
                out = self._array(name, self.get_tensor_shape(name))
                same = next((value for value in inputs.values() if value.shape == out.shape), None)
                out[...] = same * 2 if same is not None else first.astype(np.float64).mean()
                if cuda is not None:
                    cuda.write(self._addresses[name], name, stream_handle)
            self._executions += 1

        if cuda is not None:
            cuda.launch(stream_handle, run)
        else:
            run()
        return True


class ICudaEngine:
    __slots__ = ("_contexts", "_inputs", "_outputs", "_partners", "_profiles", "_refits", "_tensors", "_weights")

    def __init__(self, plan: dict):
        self._tensors = plan["tensors"]
        self._weights: dict[str, dict] = plan.get("weights", {})
        """Refittable weights: dtype, dims and, once refitted, the values TensorRT was given."""
        self._partners: dict[str, str] = {}
        """Weights fused in pairs (a refit of one needs the other): neighbours of the same shape."""
        names = list(self._weights)
        for first, second in zip(names[::2], names[1::2], strict=False):
            if self._weights[first]["dims"] == self._weights[second]["dims"]:
                self._partners[first], self._partners[second] = second, first
        self._refits = 0
        self._profiles = [
            {name: tuple(map(tuple, shapes)) for name, shapes in profile.items()} for profile in plan["profiles"]
        ]
        self._inputs = [name for name, tensor in self._tensors.items() if tensor["input"]]
        self._outputs = [name for name, tensor in self._tensors.items() if not tensor["input"]]
        self._contexts: list[IExecutionContext] = []

    @property
    def num_io_tensors(self) -> int:
        return len(self._tensors)

    @property
    def num_optimization_profiles(self) -> int:
        return len(self._profiles)

    def get_tensor_name(self, index: int) -> str:
        return list(self._tensors)[index]

    def get_tensor_dtype(self, name: str) -> object:
        return getattr(real.DataType, self._tensors[name]["dtype"])

    @property
    def refittable(self) -> bool:
        return bool(self._weights)

    @property
    def device_memory_size_v2(self) -> int:
        return 4096 * len(self._tensors)

    def create_execution_context(self, strategy: object) -> IExecutionContext:
        context = IExecutionContext(self, strategy)
        self._contexts.append(context)
        return context


class Refitter:
    """Takes weights as TensorRT does (checked against the prototype's type and size, on the host or the
    device), reads them when the refit runs, and keeps a copy of what each refit set, where a test can
    compare it with torch's patched parameters."""

    __slots__ = ("_engine", "_logger", "_pending")
    failures = 0  # a test raises this to make the next refits fail after refitting some weights, as TensorRT may

    def __init__(self, engine: ICudaEngine, logger: object):
        self._engine = engine
        self._logger = logger
        self._pending: dict[str, object] = {}

    def get_all_weights(self) -> list[str]:
        return list(self._engine._weights)

    def get_missing_weights(self) -> list[str]:
        partners = self._engine._partners
        return sorted({partners[name] for name in self._pending if name in partners} - set(self._pending))

    def set_named_weights(self, name: str, weights: object, location: object) -> bool:
        prototype = self._engine._weights.get(name)
        if prototype is None or weights.dtype.name != prototype["dtype"]:
            return False
        if weights.size != int(np.prod(prototype["dims"])):
            return False
        assert location in (real.TensorLocation.HOST, real.TensorLocation.DEVICE)
        self._pending[name] = weights
        return True

    def refit_cuda_engine_async(self, stream_handle: int) -> bool:
        if self.get_missing_weights():
            return False
        names = list(self._pending)
        failing = Refitter.failures > 0
        if failing:
            Refitter.failures -= 1
            names = names[: len(names) // 2]  # "If False is returned, a subset of weights may have been refitted."
        for name in names:
            values = self._pending[name].numpy()
            if fake_cuda.ACTIVE is not None:
                fake_cuda.ACTIVE.read(values.ctypes.data, name, stream_handle)
            self._engine._weights[name]["values"] = values.reshape(self._engine._weights[name]["dims"]).copy()
        self._engine._refits += 1
        return not failing


class Runtime:
    __slots__ = ("_host_code", "_logger")

    def __init__(self, logger: object):
        self._logger = logger
        self._host_code = False

    @property
    def engine_host_code_allowed(self) -> bool:
        return self._host_code

    @engine_host_code_allowed.setter
    def engine_host_code_allowed(self, allowed: bool) -> None:
        self._host_code = allowed

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> ICudaEngine | None:
        if not bytes(serialized_engine).startswith(b"FAKEPLAN"):
            return None
        return ICudaEngine(json.loads(bytes(serialized_engine)[len(b"FAKEPLAN") :]))


TENSORRT_10_STRONGLY_TYPED = 1
"""NetworkDefinitionCreationFlag::kSTRONGLY_TYPED in TensorRT 10's NvInfer.h (kEXPLICIT_BATCH is 0). The
only enum value here not read from real bindings: TensorRT 10's cannot be imported without its libraries;
tests/test_tensorrt_gpu.py checks the flag on the real bindings where they load."""


def fake_tensorrt(version: str = "11.4.0.106") -> SimpleNamespace:
    """A module-like namespace with the fakes and the real enums TensorRT code reads."""
    return SimpleNamespace(
        __version__=version,
        Builder=Builder,
        OnnxParser=OnnxParser,
        Runtime=Runtime,
        Refitter=Refitter,
        Weights=real.Weights,
        TensorLocation=real.TensorLocation,
        ILogger=real.ILogger,
        DataType=real.DataType,
        MemoryPoolType=real.MemoryPoolType,
        BuilderFlag=real.BuilderFlag,
        ExecutionContextAllocationStrategy=real.ExecutionContextAllocationStrategy,
        NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=TENSORRT_10_STRONGLY_TYPED),
    )


FAKE_CLASSES = (
    OnnxParser,
    ParserError,
    INetworkDefinition,
    IOptimizationProfile,
    ITimingCache,
    IBuilderConfig,
    Builder,
    IExecutionContext,
    ICudaEngine,
    Refitter,
    Runtime,
)
"""Each fake has the name of the TensorRT class it stands in for."""


def passing_compare(spec, references, candidate, precision, tolerance=None):
    """Stands in for validation against torch, which a fake engine cannot pass; the candidate still runs."""
    from export.validate import Comparison

    candidate(references[0].inputs)
    return [Comparison(references[0].shape, name, 0.0, 0.0, 1e-3) for name in spec.output_names]


def publish_fake_engines(store, model, components, ranges, monkeypatch, version: str = "11.4.0.106"):
    """Fake engines for some components, published through the real export stage."""
    import torch

    from export import stages
    from export.stagelog import StageLog
    from export.tensorrt import BuildOptions

    monkeypatch.setattr(stages, "compare", passing_compare)
    exporter = stages.Exporter(model, store, torch.device("cpu"), "fp32")
    builder = stages.EngineBuilder.create(
        store, "sm90", ranges, BuildOptions(2**30, 3, False), 30, 1, trt=fake_tensorrt(version)
    )
    published = {}
    for component in components:
        [onnx] = store.find(kind="onnx", component=component)
        published[component] = exporter.engine(component, onnx, builder, StageLog())
    return published
