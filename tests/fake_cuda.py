"""CUDA streams and graphs on the CPU, so the TensorRT runner's stream and graph logic runs in tests.

``install`` puts them where the runner calls ``torch.cuda`` (``stream``, ``current_stream``,
``CUDAGraph``, ``graph``). Work still happens at once, as it must on the CPU, but each write
and read of device memory is tagged with the stream it was issued on and that stream's
count of operations, and each stream knows how far it has waited for every other one
(``wait_stream``): a read on one stream of memory last written on another, without
waiting for that write, is recorded in ``unordered``, the race a GPU would have. The fake
TensorRT (tests/fake_tensorrt.py) reads and writes through ``ACTIVE`` when one is installed.
A graph records the TensorRT launches made on its stream while capturing, and runs them
again on ``replay``, as CUDA runs the captured kernels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch

ACTIVE: FakeCuda | None = None


class Stream:
    """Stands in for ``torch.cuda.Stream``: a handle, a count of work issued, and what it has waited for."""

    def __init__(self, cuda: FakeCuda, handle: int):
        self.cuda = cuda
        self.cuda_stream = handle
        self.issued = 0
        self.waited: dict[int, int] = {}
        """Stream handle -> how many of that stream's operations this one is ordered after."""

    def wait_stream(self, stream: Stream) -> None:
        for handle, count in (*stream.waited.items(), (stream.cuda_stream, stream.issued)):
            self.waited[handle] = max(self.waited.get(handle, 0), count)
        self.cuda.log.append(("wait", self.cuda_stream, stream.cuda_stream))

    def synchronize(self) -> None:
        self.cuda.log.append(("synchronize", self.cuda_stream, None))


class CUDAGraph:
    """Stands in for ``torch.cuda.CUDAGraph``: the launches captured, run again on each replay."""

    def __init__(self) -> None:
        self.launches: list[Callable[[], None]] = []
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        for launch in self.launches:
            launch()


class FakeCuda:
    def __init__(self) -> None:
        self.streams: dict[int, Stream] = {}
        self.default = self.new_stream()
        self._current = [self.default]
        self.writes: dict[int, tuple[int, int]] = {}
        """Address -> the stream that last wrote it and that stream's count at the write."""
        self.log: list[tuple[str, int, object]] = []
        """Every operation in order: (what, stream handle, detail)."""
        self.unordered: list[str] = []
        self.capturing: tuple[Stream, CUDAGraph] | None = None

    def new_stream(self, device: object = None) -> Stream:
        stream = Stream(self, len(self.streams) * 0x1000)  # the first, the default stream, is 0 as in CUDA
        self.streams[stream.cuda_stream] = stream
        return stream

    def current_stream(self, device: object = None) -> Stream:
        return self._current[-1]

    @contextlib.contextmanager
    def stream(self, stream: Stream | None) -> Iterator[None]:
        self._current.append(stream or self._current[-1])
        try:
            yield
        finally:
            self._current.pop()

    @contextlib.contextmanager
    def graph(self, graph: CUDAGraph, stream: Stream | None = None, **_: object) -> Iterator[None]:
        capture = stream or self.current_stream()
        self.capturing = (capture, graph)
        try:
            with self.stream(capture):
                yield
        finally:
            self.capturing = None

    def write(self, address: int, what: str, handle: int | None = None) -> None:
        """A write of device memory on stream ``handle`` (default: the current stream)."""
        stream = self.streams[handle] if handle is not None else self.current_stream()
        stream.issued += 1
        self.writes[address] = (stream.cuda_stream, stream.issued)
        self.log.append(("write", stream.cuda_stream, what))

    def read(self, address: int, what: str, handle: int) -> None:
        """A read of device memory on stream ``handle``; unordered if its last write was on another stream
        this one has not waited for."""
        stream = self.streams[handle]
        stream.issued += 1
        self.log.append(("read", handle, what))
        writer = self.writes.get(address)
        if writer is not None and writer[0] != handle and stream.waited.get(writer[0], 0) < writer[1]:
            self.unordered.append(f"{what}: read on stream {handle} before its write on stream {writer[0]}")

    def launch(self, handle: int, run: Callable[[], None]) -> None:
        """TensorRT's work on stream ``handle``: captured into the graph being captured on it, else run."""
        if self.capturing is not None and self.capturing[0].cuda_stream == handle:
            self.capturing[1].launches.append(run)
            self.log.append(("capture", handle, None))
        else:
            run()


def install(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    """A FakeCuda in place of torch.cuda's streams and graphs, for one test."""
    cuda = FakeCuda()
    monkeypatch.setattr(torch.cuda, "stream", cuda.stream)
    monkeypatch.setattr(torch.cuda, "current_stream", cuda.current_stream)
    monkeypatch.setattr(torch.cuda, "graph", cuda.graph)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", CUDAGraph)
    monkeypatch.setattr(torch.cuda, "Stream", cuda.new_stream)
    monkeypatch.setattr(f"{__name__}.ACTIVE", cuda)
    return cuda
