"""Calibration: the denoiser fake-quantized by Model Optimizer while the worker's own pipeline runs it.

The forward loop builds the worker (torch backend, fp32, on the export's device) and puts the
module being calibrated in its denoiser's place, so calibration sees the inputs serving sees:
the same prompt encoding, scheduler, guidance batching and latents. Prompts run one a request
at ``recipe.size`` with ``recipe.steps`` steps, seeded ``recipe.seed + index``.

What calibration produced (ModelOpt's state: which quantizers, their configuration; the
quantizers' amax and SmoothQuant's pre-quantization scales; the weights SmoothQuant rescaled) is
saved as ``calibration.pt`` and restored into a fresh module, so a rebuild for another GPU
type skips calibration.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from engine.backends.chain import ChainCalls
from engine.backends.torch import TorchRunner
from engine.common.metrics import StageTimer
from engine.request.checking import parse_request
from engine.settings import Backend, Precision, Quantize, Settings, TorchFallback
from export.quantize.recipe import Recipe

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.pt"


def calibration_settings(settings: Settings, component: str, empty_store: Path) -> Settings:
    """The worker's settings for calibration: torch in fp32, unquantized, and the denoiser's own weights
    never loaded (its chain asks onnxruntime first, in an empty store, so its torch runner stays lazy
    until the module being calibrated replaces it): one copy of a large denoiser in memory, not two."""
    return settings.model_copy(
        update={
            "backend": Backend.TORCH,
            "component_backends": {component: Backend.ONNXRUNTIME},
            "engine_dir": empty_store,
            "precision": Precision.FP32,
            "quantize": Quantize.NONE,
            "torch_fallback": TorchFallback.LAZY,
            "warmup": False,
        }
    )


def pipeline_loop(settings: Settings, recipe: Recipe, component: str) -> Callable[[torch.nn.Module], None]:
    """ModelOpt's ``forward_loop``: the recipe's prompts through the worker's pipeline, ``component`` run by
    the module given."""

    def forward_loop(module: torch.nn.Module) -> None:
        from engine.serving.worker import Worker

        with tempfile.TemporaryDirectory(prefix="calibration-") as empty_store:
            worker = Worker(calibration_settings(settings, component, Path(empty_store)))
        chain = worker.chains[component]
        chain.runners = [TorchRunner(chain.runners[-1].spec, module, "fp32", worker.device)]
        chain.unavailable.clear()
        for index, prompt in enumerate(recipe.prompts):
            payload = {
                "prompt": prompt,
                "num_inference_steps": recipe.steps,
                "height": recipe.size,
                "width": recipe.size,
                "seed": recipe.seed + index,
            }
            request = parse_request(payload, worker.limits)
            with torch.no_grad():
                worker.pipeline(request, [recipe.seed + index], ChainCalls(worker.chains), StageTimer(worker.device))
            log.info("calibration prompt %d/%d done", index + 1, len(recipe.prompts))

    return forward_loop


def calibrate(module: torch.nn.Module, recipe: Recipe, forward_loop: Callable[[torch.nn.Module], None]) -> None:
    """Inserts ModelOpt's quantizers into ``module`` and calibrates them by running ``forward_loop``."""
    import modelopt.torch.quantization as mtq

    mtq.quantize(module, recipe.config, forward_loop)


def calibrated_state(module: torch.nn.Module) -> dict:
    """What ``restore`` needs: ModelOpt's state and every tensor calibration set or changed."""
    import modelopt.torch.opt as mto

    smoothed = {
        name.removesuffix(".input_quantizer")
        for name, child in module.named_modules()
        if name.endswith("input_quantizer") and getattr(child, "_pre_quant_scale", None) is not None
    }
    tensors = {
        name: value.detach().cpu()
        for name, value in module.state_dict().items()
        if "_quantizer." in name or name.rpartition(".")[0] in smoothed
    }
    return {"modelopt_state": mto.modelopt_state(module), "tensors": tensors}


def save(module: torch.nn.Module, folder: Path) -> Path:
    path = folder / CALIBRATION_FILE
    torch.save(calibrated_state(module), path)
    return path


def restore(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    """A fresh (unquantized) module made what calibration made it, without running it."""
    import modelopt.torch.opt as mto

    state = torch.load(path, map_location="cpu", weights_only=False)
    module = mto.restore_from_modelopt_state(module, state["modelopt_state"])
    device = next(module.parameters()).device
    missing = set(state["tensors"]) - set(module.state_dict())
    if missing:
        raise ValueError(f"{path.name}: tensors the module does not have: {sorted(missing)[:3]}")
    module.load_state_dict({k: v.to(device) for k, v in state["tensors"].items()}, strict=False)
    return module


def round_weights_as_exported(module: torch.nn.Module) -> None:
    """Sets each INT8-quantized weight to what the graph's Q/DQ pair makes of it, round(w / scale) x scale with
    scale = amax / 127 (ModelOpt's ``export_int8``), ties to even, as onnxruntime and TensorRT divide.

    ModelOpt's fake quantization multiplies by 127 / amax instead, which puts a weight within a rounding error
    of a step boundary on the other side (4 of the tiny UNet's 878,592): one step apart in every output the
    weight reaches, at every shape. Quantizing a rounded weight again gives it back (to float rounding), on
    both sides, so after this the fake-quantized module and the graph hold the same quantized weights, and the
    graph exported from it the same as before.
    """
    with torch.no_grad():
        for name, quantizer in module.named_modules():
            if not (name.endswith("weight_quantizer") and quantizer.is_enabled and quantizer.num_bits == 8):
                continue
            weight = module.get_submodule(name.rpartition(".")[0]).weight
            scale = quantizer.amax.float() / quantizer.maxbound
            scale.masked_fill_(scale == 0, 1.0)
            low = 0 if quantizer.unsigned else -quantizer.maxbound - int(not quantizer.narrow_range)
            rounded = torch.clamp(torch.round(weight / scale), low, quantizer.maxbound) * scale
            weight.copy_(rounded)


def quantizer_count(module: torch.nn.Module) -> int:
    """Enabled quantizers in a module (weights and inputs counted apart)."""
    return sum(1 for name, child in module.named_modules() if name.endswith("_quantizer") and child.is_enabled)
