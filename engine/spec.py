"""One spec per model component: the single source of tensor names, dtypes and shapes.

Export (ONNX input names, dynamic axes, sample inputs), validation (fresh random
inputs at several shapes), the TensorRT build (min/opt/max profile shapes) and every
runner read the same ``ComponentSpec``. A shape is written once, here, with named
dimensions that a ``Dims`` resolves for one request.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from engine.common.dtypes import BY_NAME, PRECISION_DTYPES

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Dims:
    """What one call asks of a component: images in the batch, the image size in pixels, the
    prompt's length in chunks of the text encoder's length (77 tokens for CLIP), and the size of a
    reference image the denoiser also reads (Flux Kontext's; the image's size where not given)."""

    batch: int
    height: int
    width: int
    prompt_chunks: int = 1
    reference_height: int | None = None
    reference_width: int | None = None
    ip_tokens: int = 4
    """Image-prompt tokens the IP denoiser reads per row (4 per image for a plain IP-Adapter, 16 for Plus)."""
    ip_tokens_2: int = 4
    """The same for a second IP-Adapter, where a request has two."""
    ip_images: int = 1
    """Image prompts an image encoder and a projection take in one call."""


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor whose shape mixes fixed sizes and named dimensions.

    Named dimensions: ``batch``, ``height``, ``width`` (pixels), ``latent_height``,
    ``latent_width`` (pixels divided by the VAE's scale factor), ``text_batch`` (a text
    encoder's rows: one per prompt chunk), ``prompt_tokens`` (the UNet's conditioning
    sequence: every chunk's tokens joined), ``reference_latent_height`` and
    ``reference_latent_width`` (a reference image's latent sides, which set how many tokens it
    adds to a transformer's sequence) and ``latent_height/2``, ``latent_width/4``...
    (a latent side after the UNet's stride-2 downsamplers, which round up: ControlNet residuals).
    """

    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"
    value_range: tuple[float, float] | None = None
    keep_fp32: bool = False

    @property
    def is_float(self) -> bool:
        return self.dtype.startswith("float")

    def torch_dtype(self, precision: str) -> torch.dtype:
        """The tensor's dtype in a graph of the given precision; integer tensors never change."""
        if self.is_float and precision != "fp32" and not self.keep_fp32:
            return PRECISION_DTYPES[precision]
        return BY_NAME[self.dtype].torch

    def resolve(self, sizes: Mapping[str, int]) -> Shape:
        return tuple(sizes[dim] if isinstance(dim, str) else dim for dim in self.shape)


DOWNSAMPLINGS = (2, 4, 8, 16, 32)


def downsampled(dim: str, factor: int) -> str:
    """The named dimension of a latent side after ``log2(factor)`` stride-2 downsamplers."""
    return dim if factor == 1 else f"{dim}/{factor}"


def with_downsampled(sizes: dict[str, int]) -> dict[str, int]:
    """The sizes with every downsampled latent side added: each stride-2 convolution rounds up."""
    for dim in ("latent_height", "latent_width"):
        for factor in DOWNSAMPLINGS:
            sizes[downsampled(dim, factor)] = -(-sizes[dim] // factor)
    return sizes


@dataclass(frozen=True)
class ComponentSpec:
    """Everything every stage needs to know about one exported component."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    latent_factor: int = 8
    batch_multiplier: int = 1
    """The component sees this many rows per image: 2 where classifier-free guidance batches
    the unconditional and the conditional inputs into one call."""
    tokens_per_chunk: int = 77
    """The text encoder's sequence length, which one prompt chunk fills."""
    reference_sides: tuple[int, int, int] | None = None
    """The smallest, optimum and largest side in pixels of a reference image the component reads (Flux
    Kontext's, always resized to one of its preferred resolutions): an engine's profile covers these
    on the reference axes whatever image sizes it covers, so every reference runs on it."""

    def sizes(self, dims: Dims, guidance: bool = True) -> dict[str, int]:
        multiplier = self.batch_multiplier if guidance else 1
        return with_downsampled(
            {
                "batch": dims.batch * multiplier,
                "text_batch": dims.batch * multiplier * dims.prompt_chunks,
                "prompt_tokens": dims.prompt_chunks * self.tokens_per_chunk,
                "height": dims.height,
                "width": dims.width,
                "latent_height": dims.height // self.latent_factor,
                "latent_width": dims.width // self.latent_factor,
                "reference_latent_height": (dims.reference_height or dims.height) // self.latent_factor,
                "reference_latent_width": (dims.reference_width or dims.width) // self.latent_factor,
                "ip_images": dims.ip_images,
                "ip_tokens": dims.ip_tokens,
                "ip_tokens_2": dims.ip_tokens_2,
            }
        )

    def reference_within(self, dims: Dims) -> Dims:
        """``dims`` with its reference image's sides (the image's where not given) moved inside
        ``reference_sides``, where the component has them; the sizes a reference can have."""
        if self.reference_sides is None:
            return dims
        least, _, most = self.reference_sides
        height = min(max(dims.reference_height or dims.height, least), most)
        width = min(max(dims.reference_width or dims.width, least), most)
        return replace(dims, reference_height=height, reference_width=width)

    @property
    def follows_prompt_length(self) -> bool:
        """Whether a longer prompt changes the component's input shapes (text encoders and the UNet)."""
        return any(dim in ("text_batch", "prompt_tokens") for tensor in self.inputs for dim in tensor.shape)

    def input_shapes(self, dims: Dims, guidance: bool = True) -> dict[str, Shape]:
        sizes = self.sizes(dims, guidance)
        return {tensor.name: tensor.resolve(sizes) for tensor in self.inputs}

    def output_shapes(self, dims: Dims, guidance: bool = True) -> dict[str, Shape]:
        sizes = self.sizes(dims, guidance)
        return {tensor.name: tensor.resolve(sizes) for tensor in self.outputs}

    def output_shapes_from_inputs(self, input_shapes: Mapping[str, Shape]) -> dict[str, Shape]:
        """Output shapes implied by concrete input shapes, through the named dimensions they share."""
        sizes: dict[str, int] = {}
        for tensor in self.inputs:
            for dim, size in zip(tensor.shape, input_shapes[tensor.name], strict=True):
                if isinstance(dim, str):
                    sizes[dim] = size
        if "latent_height" in sizes and "height" not in sizes:
            sizes["height"] = sizes["latent_height"] * self.latent_factor
            sizes["width"] = sizes["latent_width"] * self.latent_factor
        if "height" in sizes and "latent_height" not in sizes:
            sizes["latent_height"] = sizes["height"] // self.latent_factor
            sizes["latent_width"] = sizes["width"] // self.latent_factor
        if "latent_height" in sizes:
            sizes = with_downsampled(sizes)
        return {tensor.name: tensor.resolve(sizes) for tensor in self.outputs}

    @property
    def input_names(self) -> list[str]:
        return [tensor.name for tensor in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [tensor.name for tensor in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Named axes of every input and output, in torch.onnx's ``dynamic_axes`` form."""
        return {
            tensor.name: {axis: dim for axis, dim in enumerate(tensor.shape) if isinstance(dim, str)}
            for tensor in (*self.inputs, *self.outputs)
            if any(isinstance(dim, str) for dim in tensor.shape)
        }

    def sample_inputs(
        self,
        dims: Dims,
        precision: str = "fp32",
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> dict[str, torch.Tensor]:
        """Random inputs of the right names, shapes, dtypes and value ranges."""
        generator = torch.Generator("cpu").manual_seed(seed)
        shapes = self.input_shapes(dims)
        inputs: dict[str, torch.Tensor] = {}
        for tensor in self.inputs:
            shape = shapes[tensor.name]
            if not tensor.is_float:
                low, high = tensor.value_range or (0, 2)
                value = torch.randint(int(low), int(high), shape, generator=generator)
            elif tensor.value_range is not None:
                low, high = tensor.value_range
                value = torch.rand(shape, generator=generator) * (high - low) + low
            else:
                value = torch.randn(shape, generator=generator)
            inputs[tensor.name] = value.to(device=device, dtype=tensor.torch_dtype(precision))
        return inputs
