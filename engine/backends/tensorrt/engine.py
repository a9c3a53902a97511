"""One deserialized TensorRT engine, run with execute_async_v3 on a dedicated stream.

Every engine of the worker runs on one CUDA stream, one after another, so their
execution contexts share one scratch buffer (``USER_MANAGED`` device memory sized by
the largest ``device_memory_size_v2``). Each input shape gets its own execution context
and buffers, made once and kept (``CUDA_GRAPH_SHAPES`` per engine, least recently used
out, contexts with a graph last), so a context is never reconfigured under a captured
graph. With CUDA graphs, the warm-up captures each profile's optimum shapes and requests
at those shapes replay them (an optimum whose context was dropped is captured again when
next used); other shapes run plainly. Any failure around a capture discards that capture.
The engine counts the graphs it keeps and their replays (``graph_captures``, ``graph_replays``).
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from engine.backends.tensorrt.refit import refit_engine
from engine.common.dtypes import BY_TENSORRT
from engine.common.errors import BackendUnavailable
from engine.common.faults import DeviceExecutionError
from engine.spec import ComponentSpec, Shape
from engine.store.profiles import Profile, choose
from engine.store.weightmap import WeightMap

if TYPE_CHECKING:
    from engine.lora.library import WeightPatch


log = logging.getLogger(__name__)


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
    graph_keys: set[tuple[Shape, ...]] = field(default_factory=set)
    """The shapes the warm-up captured (each profile's optimum): captured again after a refit or eviction."""
    graph_captures: int = 0
    """CUDA graphs captured and kept since the engine loaded (a discarded capture is not counted)."""
    graph_replays: int = 0
    """Calls that replayed a CUDA graph instead of enqueueing the engine."""

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
        try:  # the bindings raise where it fails, never return False (PY_ASSERT_RUNTIME_ERROR, pyCore.cpp)
            context.set_optimization_profile_async(index, stream.cuda_stream if stream is not None else 0)
        except RuntimeError as error:
            raise BackendUnavailable(f"{self.name}: TensorRT refused optimization profile {index}: {error}") from None
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
            if not context.set_tensor_address(name, tensor.data_ptr()):
                raise BackendUnavailable(f"{self.name}: TensorRT refused the address of {name}")
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
            plain = (shapes for shapes, kept in self.slots.items() if kept.graph is None)
            evicted = next(plain, next(iter(self.slots)))  # a context with a graph only when all have one
            del self.slots[evicted]
            log.debug("%s: dropped the context for %s", self.name, evicted)
        slot = self.slots[key] = self._new_slot(key, stream)
        return slot

    def execute(self, inputs: Mapping[str, torch.Tensor], stream: torch.cuda.Stream | None) -> dict[str, torch.Tensor]:
        """Copies inputs into the shape's buffers, runs (or replays), and returns copies of the outputs."""
        key = tuple(tuple(inputs[name].shape) for name in self.spec.input_names)
        if stream is not None and key in self.graph_keys and (key not in self.slots or self.slots[key].graph is None):
            self._capture(key, stream)  # a warm-up graph whose context was dropped: captured again, once
        slot = self._slot(key, stream)
        handle = stream.cuda_stream if stream is not None else 0
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for name, tensor in inputs.items():
                slot.inputs[name].copy_(tensor, non_blocking=True)
            if slot.graph is not None:
                slot.graph.replay()
                self.graph_replays += 1
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
        its trace), refits on the worker's stream (see ``refit.py``) and captures its graphs again."""
        refit_engine(self.trt, self.engine, self.name, weight_map, patch, restore, self.device, stream)
        self._recapture(stream)

    def _recapture(self, stream: torch.cuda.Stream | None) -> None:
        """Graphs captured before a refit are replaced by new captures of the same shapes."""
        for slot in self.slots.values():
            slot.graph = None
        if stream is not None:
            for key in [key for key in self.graph_keys if key in self.slots]:
                self._capture(key, stream)

    def capture_optima(self, stream: torch.cuda.Stream) -> int:
        """CUDA graphs of each profile's optimum shapes (at warm-up); how many were kept."""
        optima = [profile.shapes() for profile in self.profiles]
        keys = dict.fromkeys(tuple(shapes[name].optimum for name in self.spec.input_names) for shapes in optima)
        self.graph_keys.update(keys)
        return sum(self._capture(key, stream) for key in keys)

    def _capture(self, key: tuple[Shape, ...], stream: torch.cuda.Stream) -> bool:
        """Runs these shapes once, then captures them. Whatever fails on the way (the context or its buffers:
        out of memory, a refused profile; the first run; the capture) discards the capture and its context,
        and the shapes run plainly from then on."""
        try:
            slot = self._slot(key, stream)
            if slot.graph is not None:
                return True
            with torch.cuda.stream(stream):
                for tensor in slot.inputs.values():
                    tensor.zero_()
                if not slot.context.execute_async_v3(stream.cuda_stream):  # the first run initializes lazily
                    raise DeviceExecutionError("TensorRT execution failed before the capture")
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                captured = slot.context.execute_async_v3(stream.cuda_stream)
            if not captured:
                raise DeviceExecutionError("TensorRT's enqueue failed during the capture")
        except Exception as error:  # at warm-up, nothing here may stop the worker starting
            log.warning("%s: no CUDA graph at %s, running without: %s", self.name, key, error)
            self.graph_keys.discard(key)
            if key in self.slots:
                with contextlib.suppress(RuntimeError):  # a CUDA error here was logged above
                    stream.synchronize()  # nothing queued may still use the buffers about to be freed
                del self.slots[key]
            return False
        slot.graph = graph
        self.graph_captures += 1
        return True
