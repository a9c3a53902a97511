"""An exported component against PyTorch, on fresh random inputs at several shapes.

The reference is the fp32 torch module; the candidate is any Runner (ONNX Runtime here,
TensorRT on a GPU), so validation also exercises the runner the worker will use. One of
the shapes is never the one the graph was traced at, which catches shapes that were
frozen into the graph.

The reference outputs are computed first and kept (they are small), so the torch module
is freed before the candidate loads: the two never hold the weights at the same time.
On the CPU, large models are compared at small sizes, which check the same graph at a
fraction of the cost; on a GPU, at the native size.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch

from engine.backends.base import Runner
from engine.common.errors import ArtifactError
from engine.models.model import Model
from engine.spec import ComponentSpec, Dims

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    """Passes when max |candidate - reference| <= atol + rtol * max |reference| and, where ``mean_rtol`` is set,
    mean |candidate - reference| <= mean_rtol * max |reference|: a bound on how much of the output is off, which
    a few single values far off pass and a whole tensor slightly off does not."""

    atol: float
    rtol: float
    mean_rtol: float | None = None


TOLERANCES = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-3),
    "fp16": Tolerance(atol=1e-2, rtol=2e-2),
    "bf16": Tolerance(atol=4e-2, rtol=8e-2),
}
"""bf16 keeps 8 bits of mantissa to fp16's 11, so it rounds each value 8 times as coarsely; its
bounds are 4 times fp16's, as the errors of a deep network grow slower than each rounding."""


@dataclass(frozen=True)
class Comparison:
    shape: str
    output: str
    max_abs_error: float
    mean_abs_error: float
    allowed: float
    mean_allowed: float | None = None

    @property
    def passed(self) -> bool:
        return self.max_abs_error <= self.allowed and (
            self.mean_allowed is None or self.mean_abs_error <= self.mean_allowed
        )

    def failure(self) -> str:
        """What is out of bounds, for an error message ("" when nothing is)."""
        found = []
        if not self.max_abs_error <= self.allowed:
            found.append(f"max |diff| {self.max_abs_error:.3g} > {self.allowed:.3g}")
        if self.mean_allowed is not None and not self.mean_abs_error <= self.mean_allowed:
            found.append(f"mean |diff| {self.mean_abs_error:.3g} > {self.mean_allowed:.3g}")
        return ", ".join(found)


CPU_VALIDATION_SIDE = 128
"""On the CPU, images of at most this side: a full-size UNet takes seconds there, not minutes."""


@dataclass(frozen=True)
class Reference:
    """Inputs at one shape and what the fp32 torch module made of them (on the CPU)."""

    dims: Dims
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]

    @property
    def shape(self) -> str:
        shape = f"{self.dims.batch}x{self.dims.height}x{self.dims.width}"
        return shape if self.dims.prompt_chunks == 1 else f"{shape}, {self.dims.prompt_chunks} prompt chunks"


def validation_dims(model: Model, device: torch.device) -> list[Dims]:
    """A size the UNet cannot halve evenly (like the traced one), a batch of two with a prompt of two
    chunks (the graph is traced at one), and a non-square size with a reference image of the transposed
    size (Flux Kontext's: its tokens are an axis of their own).

    At the native size on a GPU; on the CPU, at most ``CPU_VALIDATION_SIDE`` pixels a side.
    """
    factor = model.config.vae_scale_factor
    native = model.config.native_size
    side = native if device.type == "cuda" else min(native, CPU_VALIDATION_SIDE)
    latent = side // factor
    odd = Dims(1, (latent + 1) * factor, max(latent - 1, 1) * factor)
    if model.config.unet_down_factor == 1:
        odd = Dims(1, side, side)
    wide = side + side // 2 - (side // 2) % factor
    return [odd, Dims(2, side, side, prompt_chunks=2), Dims(1, side, wide, reference_height=wide, reference_width=side)]


def reference_outputs(
    spec: ComponentSpec, reference: Runner, dims_list: list[Dims], seed: int = 1234
) -> list[Reference]:
    """Fresh random inputs at each shape, and the reference's outputs for them."""
    references = []
    for index, dims in enumerate(dims_list):
        inputs = spec.sample_inputs(dims, "fp32", seed=seed + index)
        outputs = {name: value.float().cpu() for name, value in reference(inputs).items()}
        references.append(Reference(dims, inputs, outputs))
    return references


def compare(
    spec: ComponentSpec,
    references: list[Reference],
    candidate: Runner,
    precision: str,
    tolerance: Tolerance | None = None,
) -> list[Comparison]:
    """Each output at each reference's shape; within ``tolerance``, by default the precision's."""
    tolerance = tolerance or TOLERANCES[precision]
    results = []
    for reference in references:
        actual = candidate(reference.inputs)
        for name in spec.output_names:
            want = reference.outputs[name]
            got = actual[name].float().cpu()
            if got.shape != want.shape:
                raise ArtifactError(f"{spec.name}.{name}: shape {tuple(got.shape)} != torch's {tuple(want.shape)}")
            error = (got - want).abs()
            largest = float(want.abs().max())
            results.append(
                Comparison(
                    shape=reference.shape,
                    output=name,
                    max_abs_error=float(error.max()),
                    mean_abs_error=float(error.mean()),
                    allowed=tolerance.atol + tolerance.rtol * largest,
                    mean_allowed=None if tolerance.mean_rtol is None else tolerance.mean_rtol * largest,
                )
            )
    return results


def check(spec: ComponentSpec, backend: str, results: list[Comparison]) -> list[dict]:
    """Raises with every failing comparison; returns the results for the manifest."""
    failures = [r for r in results if not r.passed or not torch.isfinite(torch.tensor(r.max_abs_error))]
    if failures:
        details = "; ".join(f"{r.output} at {r.shape}: {r.failure() or 'not finite'}" for r in failures)
        raise ArtifactError(f"{spec.name}: {backend} differs from torch: {details}")
    return [asdict(r) | {"passed": r.passed} for r in results]
