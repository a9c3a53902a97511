"""Stage timers, step statistics, memory, and the cold-start breakdown.

On a GPU, stages and UNet steps are timed with CUDA events that are read after the
request's single synchronization, so timing never stalls the denoising loop.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch


class _CpuMark:
    def __init__(self) -> None:
        self.time = time.perf_counter()

    def ms_since(self, start: _CpuMark) -> float:
        return (self.time - start.time) * 1000.0


class _CudaMark:
    def __init__(self) -> None:
        self.event = torch.cuda.Event(enable_timing=True)
        self.event.record()

    def ms_since(self, start: _CudaMark) -> float:
        return start.event.elapsed_time(self.event)


@dataclass
class StageTimer:
    """Times named stages and individual UNet steps of one request, and samples the GPU's memory
    at the end of each (the device's own figure, so TensorRT's engines and scratch and
    onnxruntime's arenas count, not only torch's allocations)."""

    device: torch.device
    _stages: dict[str, list[tuple[object, object]]] = field(default_factory=dict)
    _steps: list[tuple[object, object]] = field(default_factory=list)
    _device_used_mb: float = 0.0

    def _mark(self) -> _CpuMark | _CudaMark:
        if self.device.type != "cuda":
            return _CpuMark()
        free, total = torch.cuda.mem_get_info(self.device)  # a driver query: no synchronization
        self._device_used_mb = max(self._device_used_mb, (total - free) / 2**20)
        return _CudaMark()

    def peak_memory_mb(self) -> float:
        """GPU: the most device memory in use at any stage or step boundary, or torch's own peak if
        higher (it sees allocations between boundaries). CPU: the process's peak resident memory."""
        if self.device.type != "cuda":
            return peak_rss_mb()
        torch_peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        return round(max(self._device_used_mb, torch_peak), 1)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = self._mark()
        try:
            yield
        finally:
            self._stages.setdefault(name, []).append((start, self._mark()))

    @contextmanager
    def step(self) -> Iterator[None]:
        start = self._mark()
        try:
            yield
        finally:
            self._steps.append((start, self._mark()))

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def stages_ms(self) -> dict[str, float]:
        self._synchronize()
        return {
            name: round(sum(end.ms_since(start) for start, end in pairs), 3) for name, pairs in self._stages.items()
        }

    def stage_total(self, name: str) -> tuple[float, int]:
        """A stage's milliseconds over the request, and how many times it ran."""
        self._synchronize()
        pairs = self._stages.get(name, [])
        return sum(end.ms_since(start) for start, end in pairs), len(pairs)

    def step_stats_ms(self) -> dict[str, float]:
        self._synchronize()
        steps = [end.ms_since(start) for start, end in self._steps]
        if not steps:
            return {"p50": 0.0, "p95": 0.0, "max": 0.0, "count": 0}
        p50, p95 = np.percentile(steps, [50, 95])
        return {
            "p50": round(float(p50), 3),
            "p95": round(float(p95), 3),
            "max": round(max(steps), 3),
            "count": len(steps),
        }


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Starts a new peak resident-memory window (Linux: ``clear_refs``); False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """Peak resident memory since the last ``reset_peak_rss`` (the process's lifetime peak elsewhere)."""
    with contextlib.suppress(OSError):
        match = re.search(r"^VmHWM:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
        if match:
            return round(int(match.group(1)) / 1024, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def process_start_time() -> float:
    """When this process started, in seconds since the epoch, to about a clock tick.

    psutil's ``create_time`` adds the process's start (in clock ticks since boot) to the boot time
    from ``/proc/stat``, which the kernel gives in whole seconds: up to a second off, as much as a
    whole cold start of the tiny model. ``/proc/uptime`` counts from the same boot in hundredths.
    """
    try:
        after_command = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
        started_ticks = int(after_command[19])  # field 22, starttime; the first two fields precede ")"
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux
        return psutil.Process().create_time()
    return time.time() - (uptime - started_ticks / os.sysconf("SC_CLK_TCK"))


class ColdStart:
    """Milliseconds spent in each start-up phase; reported on the process's first job only.

    Times are wall-clock from the process's own start, so interpreter start-up and
    imports count too.
    """

    def __init__(self, process_start: float | None = None):
        self._start = process_start if process_start is not None else process_start_time()
        self._last = self._start
        self.phases_ms: dict[str, float] = {}
        self.store_read: tuple[int, float] | None = None
        self.notes: dict[str, str] = {}
        """Facts of the start-up that are not times, such as ``model_source``."""
        self.reported = False

    def record_store_read(self, count: int, seconds: float) -> None:
        """Bytes read from the engine store during start-up, and the time it took."""
        self.store_read = (count, seconds)

    def mark(self, phase: str) -> None:
        now = time.time()
        self.phases_ms[phase] = round((now - self._last) * 1000.0, 1)
        self._last = now

    def note(self, name: str, value: str) -> None:
        self.notes[name] = value

    def summary(self) -> dict[str, float | str]:
        summary: dict[str, float | str] = {**self.phases_ms, "total": round((self._last - self._start) * 1000.0, 1)}
        if self.store_read is not None and self.store_read[0]:
            count, seconds = self.store_read
            summary["store_read_mb"] = round(count / 1e6, 1)
            summary["store_read_mb_per_s"] = round(count / 1e6 / max(seconds, 1e-6), 1)
        summary.update(self.notes)
        return summary

    def take_first(self) -> dict[str, float | str] | None:
        """The breakdown the first time it is asked for, None afterwards."""
        if self.reported:
            return None
        self.reported = True
        return self.summary()
