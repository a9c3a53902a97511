"""torch -> ONNX for one component, driven entirely by its spec."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from engine.models.model import Model
from engine.spec import ComponentSpec, Dims
from engine.store.keys import ONNX_OPSET

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


def rms_norm_symbolic(g, input, normalized_shape, weight, eps):
    """``aten::rms_norm`` (``torch.nn.RMSNorm``: Flux's query and key norms), which opset 19 lacks, as
    x / sqrt(mean(x^2) + eps) * weight. The square is a Pow and the mean a ReduceMean, which the fp16
    pass keeps in fp32, so large activations cannot overflow."""
    from torch.onnx import symbolic_helper

    dims = symbolic_helper._get_const(normalized_shape, "is", "normalized_shape")
    axes = g.op("Constant", value_t=torch.tensor(list(range(-len(dims), 0)), dtype=torch.long))
    epsilon = (
        torch.finfo(torch.float32).eps if symbolic_helper._is_none(eps) else symbolic_helper._get_const(eps, "f", "eps")
    )
    two = g.op("Constant", value_t=torch.tensor(2.0))
    mean = g.op("ReduceMean", g.op("Pow", input, two), axes, keepdims_i=1)
    normalized = g.op("Div", input, g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(epsilon)))))
    return normalized if symbolic_helper._is_none(weight) else g.op("Mul", normalized, weight)


def traceable_rotary_embedding(original: Callable) -> Callable:
    """diffusers' ``apply_rotary_emb`` as Flux calls it, with the pairs split by ``unflatten``: the original
    reshapes to ``(*x.shape[:-1], -1, 2)``, whose sizes the TorchScript tracer records as constants, so
    the graph would only take the traced sequence length. The same arithmetic otherwise."""

    def apply(
        x: torch.Tensor,
        freqs_cis: tuple[torch.Tensor, torch.Tensor],
        use_real: bool = True,
        use_real_unbind_dim: int = -1,
        sequence_dim: int = 2,
    ) -> torch.Tensor:
        if not use_real or use_real_unbind_dim != -1 or sequence_dim not in (1, 2):
            return original(x, freqs_cis, use_real, use_real_unbind_dim, sequence_dim)
        cos, sin = (f[None, None, :, :] if sequence_dim == 2 else f[None, :, None, :] for f in freqs_cis)
        real, imaginary = x.unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack([-imaginary, real], dim=-1).flatten(3)
        return (x.float() * cos.to(x.device) + rotated.float() * sin.to(x.device)).to(x.dtype)

    return apply


@contextmanager
def traceable_modules() -> Iterator[None]:
    """What the tracer needs from torch and diffusers: an ONNX form of ``aten::rms_norm``, and Flux's
    rotary embedding with dynamic sizes (only while tracing)."""
    from diffusers.models.transformers import transformer_flux

    torch.onnx.register_custom_op_symbolic("aten::rms_norm", rms_norm_symbolic, ONNX_OPSET)
    original = transformer_flux.apply_rotary_emb
    transformer_flux.apply_rotary_emb = traceable_rotary_embedding(original)
    try:
        yield
    finally:
        transformer_flux.apply_rotary_emb = original


def export_onnx(module: torch.nn.Module, spec: ComponentSpec, dims: Dims, path: Path) -> None:
    """Traces the module in fp32 on its current device; fp16 conversion comes after cleanup."""
    device = next(module.parameters()).device
    sample = spec.sample_inputs(dims, "fp32", device=device)
    with torch.no_grad(), warnings.catch_warnings(), traceable_modules():
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
