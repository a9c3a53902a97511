"""Seconds and peak memory per export stage, for the summary and the manifests."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from engine.common.metrics import peak_rss_mb, reset_peak_rss


def _ignore(stage: str) -> None:
    return None


@dataclass
class StageLog:
    """Seconds and peak memory per stage of one component, and a hook the progress bar listens to.

    ``peak_rss_mb`` is the process's peak resident memory during the stage; ``peak_cuda_mb``
    torch's peak allocation on the GPU (TensorRT's builder allocates outside torch).
    """

    on_stage: Callable[[str], None] = _ignore
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    peak_cuda_mb: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.on_stage(name)
        reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - started, 3)
            self.peak_rss_mb[name] = peak_rss_mb()
            if self.device.type == "cuda":
                self.peak_cuda_mb[name] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)

    def report(self) -> dict[str, dict[str, float]]:
        """What goes into a manifest."""
        report = {"stage_seconds": dict(self.seconds), "stage_peak_rss_mb": dict(self.peak_rss_mb)}
        if self.peak_cuda_mb:
            report["stage_peak_cuda_mb"] = dict(self.peak_cuda_mb)
        return report

    def merge(self, other: StageLog) -> None:
        """Adds the stages another process ran for this component."""
        self.seconds.update(other.seconds)
        self.peak_rss_mb.update(other.peak_rss_mb)
        self.peak_cuda_mb.update(other.peak_cuda_mb)
