"""torch -> ONNX for one component, driven entirely by its spec."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from engine.artifacts import ONNX_OPSET
from engine.models import Model
from engine.models.spec import ComponentSpec, Dims

log = logging.getLogger(__name__)


def export_dims(model: Model) -> Dims:
    """The size the graph is traced at: one the UNet cannot halve evenly.

    At such a size diffusers' UNet resizes each upsampled tensor to its skip connection's
    size instead of doubling it, and the traced graph keeps that resize dynamic, so one
    graph serves every multiple-of-8 size. (torch.export instead specializes that branch
    into a divisibility guard, and takes about 30 times longer on the CPU.)
    """
    latent = model.config.native_size // model.config.vae_scale_factor
    height, width = latent + 1, max(latent - 1, 1)
    if model.config.unet_down_factor == 1:
        height, width = latent, latent
    factor = model.config.vae_scale_factor
    return Dims(batch=1, height=height * factor, width=width * factor)


def export_onnx(module: torch.nn.Module, spec: ComponentSpec, dims: Dims, path: Path) -> None:
    """Traces the module in fp32 on its current device; fp16 conversion comes after cleanup."""
    device = next(module.parameters()).device
    sample = spec.sample_inputs(dims, "fp32", device=device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values are expected here
        torch.onnx.export(
            module,
            tuple(sample.values()),
            str(path),
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes(),
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
