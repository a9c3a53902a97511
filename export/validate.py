"""An exported component against PyTorch, on fresh random inputs at several shapes.

The reference is the fp32 torch module; the candidate is any Runner (ONNX Runtime here,
TensorRT on a GPU), so validation also exercises the runner the worker will use. One of
the shapes is never the one the graph was traced at, which catches shapes that were
frozen into the graph.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch

from engine.backends.base import Runner
from engine.errors import ArtifactError
from engine.models import Model
from engine.models.spec import ComponentSpec, Dims

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    """Passes when max |candidate - reference| <= atol + rtol * max |reference|."""

    atol: float
    rtol: float


TOLERANCES = {"fp32": Tolerance(atol=1e-4, rtol=1e-3), "fp16": Tolerance(atol=1e-2, rtol=2e-2)}


@dataclass(frozen=True)
class Comparison:
    shape: str
    output: str
    max_abs_error: float
    mean_abs_error: float
    allowed: float

    @property
    def passed(self) -> bool:
        return self.max_abs_error <= self.allowed


def validation_dims(model: Model, traced: Dims) -> list[Dims]:
    """The traced size, the native size with a batch of two, and a non-square size."""
    native = model.config.native_size
    wide = native + native // 2 - (native // 2) % 8
    return [traced, Dims(2, native, native), Dims(1, native, wide)]


def compare(
    spec: ComponentSpec, reference: Runner, candidate: Runner, dims_list: list[Dims], precision: str, seed: int = 1234
) -> list[Comparison]:
    tolerance = TOLERANCES[precision]
    results = []
    for index, dims in enumerate(dims_list):
        inputs = spec.sample_inputs(dims, "fp32", seed=seed + index)
        expected = reference(inputs)
        actual = candidate(inputs)
        for name in spec.output_names:
            want = expected[name].float().cpu()
            got = actual[name].float().cpu()
            if got.shape != want.shape:
                raise ArtifactError(f"{spec.name}.{name}: shape {tuple(got.shape)} != torch's {tuple(want.shape)}")
            error = (got - want).abs()
            results.append(
                Comparison(
                    shape=f"{dims.batch}x{dims.height}x{dims.width}",
                    output=name,
                    max_abs_error=float(error.max()),
                    mean_abs_error=float(error.mean()),
                    allowed=tolerance.atol + tolerance.rtol * float(want.abs().max()),
                )
            )
    return results


def check(spec: ComponentSpec, backend: str, results: list[Comparison]) -> list[dict]:
    """Raises with every failing comparison; returns the results for the manifest."""
    failures = [r for r in results if not r.passed or not torch.isfinite(torch.tensor(r.max_abs_error))]
    if failures:
        details = "; ".join(
            f"{r.output} at {r.shape}: max |diff| {r.max_abs_error:.3g} > {r.allowed:.3g}" for r in failures
        )
        raise ArtifactError(f"{spec.name}: {backend} differs from torch: {details}")
    return [asdict(r) | {"passed": r.passed} for r in results]
