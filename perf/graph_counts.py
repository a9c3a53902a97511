"""CUDA graph captures and replays per TensorRT component, counted from outside the runtime.

``LoadedEngine`` keeps no counts of its own. For the length of a ``with count_graphs() as counts:``
block this wraps torch's ``CUDAGraph.capture_end`` and ``CUDAGraph.replay``, and the engine's public
entry points (``execute``, ``capture_optima``, ``refit``: every path that captures or replays), which
say whose graph it is; so the GPU tests and ``make verify-gpu`` can tell a replayed graph from a
plain enqueue. Read only: nothing the engines do changes.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.backends.tensorrt.engine import LoadedEngine

_ENTRY_POINTS = ("execute", "capture_optima", "refit")
_running: ContextVar[LoadedEngine | None] = ContextVar("graph_counts_engine", default=None)


@dataclass
class GraphCounts:
    """What the engines captured and replayed inside the block, by component (the engine's spec name)."""

    _captured: list[tuple[LoadedEngine, torch.cuda.CUDAGraph]] = field(default_factory=list)
    _replayed: set[int] = field(default_factory=set)
    _replays: Counter[str] = field(default_factory=Counter)

    def graph_captures(self, component: str) -> int:
        """Graphs captured for the component and kept: held by one of its contexts now, or replayed.
        A capture the engine discarded (its enqueue failed while capturing) is not counted."""
        return sum(
            1
            for engine, graph in self._captured
            if engine.spec.name == component
            and (id(graph) in self._replayed or any(slot.graph is graph for slot in engine.slots.values()))
        )

    def graph_replays(self, component: str) -> int:
        """How many times a graph of the component's engines was launched instead of an enqueue."""
        return self._replays[component]


def _within(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(engine: LoadedEngine, *args: Any, **kwargs: Any) -> Any:
        token = _running.set(engine)
        try:
            return method(engine, *args, **kwargs)
        finally:
            _running.reset(token)

    return wrapper


@contextmanager
def count_graphs() -> Iterator[GraphCounts]:
    """Counts every engine's captures and replays until the block ends, then puts the methods back."""
    counts = GraphCounts()
    capture_end, replay = torch.cuda.CUDAGraph.capture_end, torch.cuda.CUDAGraph.replay

    def counted_capture_end(graph: torch.cuda.CUDAGraph) -> None:
        capture_end(graph)
        engine = _running.get()
        if engine is not None:
            counts._captured.append((engine, graph))

    def counted_replay(graph: torch.cuda.CUDAGraph) -> None:
        replay(graph)
        engine = _running.get()
        if engine is not None:
            counts._replayed.add(id(graph))
            counts._replays[engine.spec.name] += 1

    originals = {name: getattr(LoadedEngine, name) for name in _ENTRY_POINTS}
    torch.cuda.CUDAGraph.capture_end, torch.cuda.CUDAGraph.replay = counted_capture_end, counted_replay
    for name, method in originals.items():
        setattr(LoadedEngine, name, _within(method))
    try:
        yield counts
    finally:
        torch.cuda.CUDAGraph.capture_end, torch.cuda.CUDAGraph.replay = capture_end, replay
        for name, method in originals.items():
            setattr(LoadedEngine, name, method)
