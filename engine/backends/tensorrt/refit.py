"""Refitting one engine from the graph's weight map: base + delta for a patch's parameters, base for the rest.

Two rules from NVIDIA's documentation shape it:

- ``IRefitter::refitCudaEngineAsync`` (NvInferRuntime.h): "The weights updating task should use
  the same stream as the one used for the refit call", and modifying the weights before the
  refit completes is undefined. Every value is computed on the refit's stream and lives
  until that stream is synchronized.
- ``IRefitter::getMissingWeights``: where the engine was optimized in a way that combines
  weights, setting some makes the others of the combination missing, and the refit fails
  until they are supplied. demo/Diffusion's ``Engine.refit`` supplies them after the changed
  ones; here they come from the weight map's base values (any the patch changes are set already).

A refit that returns false "may have refitted a subset of weights": the caller restores the base.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from engine.backends.tensorrt.runtime import make_logger
from engine.common.dtypes import BY_TORCH
from engine.common.errors import BackendUnavailable
from engine.store.weightmap import MappedWeight, WeightMap

if TYPE_CHECKING:
    from engine.lora.library import WeightPatch


class _Weights:
    """The values handed to one refitter, kept alive until its refit is done."""

    def __init__(self, trt: ModuleType, refitter: Any, name: str):
        self.trt = trt
        self.refitter = refitter
        self.name = name
        self.values: dict[str, torch.Tensor] = {}

    def set(self, initializer: str, value: torch.Tensor) -> None:
        trt = self.trt
        element = getattr(trt.DataType, BY_TORCH[value.dtype].tensorrt)
        location = trt.TensorLocation.DEVICE if value.is_cuda else trt.TensorLocation.HOST
        self.values[initializer] = value
        if not self.refitter.set_named_weights(
            initializer, trt.Weights(element, value.data_ptr(), value.numel()), location
        ):
            raise BackendUnavailable(f"{self.name}: TensorRT refused the weights for {initializer}")


def refit_engine(
    trt: ModuleType,
    engine: Any,
    name: str,
    weight_map: WeightMap,
    patch: WeightPatch | None,
    restore: Iterable[str],
    device: torch.device,
    stream: torch.cuda.Stream | None,
) -> None:
    """Sets the patch's parameters to base + delta and the ``restore`` parameters to base, supplies the
    weights TensorRT then reports missing at their base values, and refits on ``stream``. Returns once
    the refit is done; BackendUnavailable where TensorRT refuses."""
    refitter = trt.Refitter(engine, make_logger(trt))
    refittable = set(refitter.get_all_weights())
    wanted = set(patch.names) if patch is not None else set()
    targets: list[tuple[str, MappedWeight]] = [
        (parameter, weight)
        for parameter in sorted(wanted | set(restore))
        for weight in weight_map.by_parameter.get(parameter, [])
    ]
    fixed = sorted({weight.initializer for _, weight in targets} - refittable)
    if fixed:
        raise BackendUnavailable(
            f"{name} cannot refit {', '.join(fixed[:3])} (ENGINE_REFIT=all also makes convolution kernels refittable)"
        )
    weights = _Weights(trt, refitter, name)
    # Computed on the refit's stream: their inputs are host memory (the data file, the LoRA factors), so
    # nothing on another stream needs waiting for.
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        for parameter, weight in targets:
            delta = patch.delta(parameter, device) if patch is not None and parameter in wanted else None
            weights.set(weight.initializer, weight_map.patched_value(weight, delta, device))
        _supply_missing(refitter, weights, weight_map, device)
        if not refitter.refit_cuda_engine_async(stream.cuda_stream if stream is not None else 0):
            raise BackendUnavailable(f"{name}: TensorRT refused the refit")
    if stream is not None:
        stream.synchronize()  # the values may be freed now


def _supply_missing(refitter: Any, weights: _Weights, weight_map: WeightMap, device: torch.device) -> None:
    """The weights combined with those set, at their base values, until TensorRT reports none missing."""
    missing = list(refitter.get_missing_weights())
    while missing:
        unknown = [initializer for initializer in missing if initializer not in weight_map.by_initializer]
        again = [initializer for initializer in missing if initializer in weights.values]
        if unknown or again:
            raise BackendUnavailable(
                f"{weights.name}: TensorRT needs {', '.join((unknown or again)[:3])} for this refit, "
                + ("which the weight map does not hold" if unknown else "which it was given")
            )
        for initializer in missing:
            weights.set(initializer, weight_map.patched_value(weight_map.by_initializer[initializer], None, device))
        missing = list(refitter.get_missing_weights())
