"""A request's peak memory, estimated before it runs, so one that cannot fit is refused, not killed.

On the CPU an out-of-memory request is killed by the kernel with no error (a 2048x2048
image died at about 12 GB here), taking the worker with it. The estimate covers the stages
whose activations grow with the request: the UNet (two rows per image with classifier-free
guidance, at latent size, widest at its first block), each ControlNet (the UNet's rows and
width), the VAE encoder (the one input image, at full size, widest at its first block; image-to-
image and inpainting only) and the VAE decoder (every image at once, at full size, widest at its
last block). Each is the stage's widest activation times the number of such tensors alive at the
peak, measured with the SD 1.5 architecture in fp32 on the CPU, as the peak resident memory
above the weights (UNet: 35-41 KB per latent pixel and row at 512-768 px, about 32 tensors of
320 channels; ControlNet: 42-45 KB, about 33-36 tensors of 320 channels, its control image's
embedding included; VAE decoder: 3.6-3.7 KB per pixel and image, about 7 tensors of 128 channels;
VAE encoder: 2.6 KB per pixel, about 5 tensors of 128 channels), with a margin. ControlNets'
residuals, summed, are held while the UNet runs, so they add to its stage. Stages run one after
another: the request needs the largest.

Image prompts (IP-Adapters) add two terms. The image encoder (CLIP vision) is a stage of its own:
per image, its token sequence at its width, ``ENCODER_LIVE_TENSORS`` of them (every hidden state,
which diffusers asks for, plus a layer's working set), and one attention map per head (a head per
64 channels or more). Measured as above for a random ViT-H/14 (224 px, 257 tokens of 1280, 32
layers) in transformers, as the slope of the peak from 1 to 4 images (so fixed costs cancel): 66 MB
per image with eager attention, 50 MB with SDPA; the estimate gives 74 MB. The IP denoiser's
second attention in each cross-attention layer keeps its output (one more tensor at the UNet's
first-block width) and its maps (one per head over the image tokens) alive beside the text
attention's: added to the UNet's stage, a bound by arithmetic, not a measurement.

The weights already resident are not counted; a LoRA set adds what applying it holds
(``patch_bytes``) on top of the largest stage, for as long as the request runs. Its factors are
read before that part of the check, so the free memory already counts them.

On a GPU the same estimate is checked against the device memory free for the components that
run outside TensorRT (whose engines allocate their activations up front): what the driver has
free plus what torch's allocator holds cached but unused, which the next request reuses.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import torch

from engine.common.dtypes import PRECISION_DTYPES
from engine.common.errors import RequestError
from engine.models.config import ModelConfig
from engine.models.controlnet import CONTROLLED_UNET, controlnet_component
from engine.models.ip_adapter import ip_denoisers

if TYPE_CHECKING:
    from engine.backends.base import Runner
    from engine.backends.chain import RunnerChain
    from engine.lora.library import LoraSelection
    from engine.models.model import Model
    from engine.pipeline.image_prompts import ImagePrompt
    from engine.request.resolved import ResolvedRequest
    from engine.settings import Settings

UNET_LIVE_TENSORS = 36
VAE_LIVE_TENSORS = 8
"""Measured 32 and 7 (see above), rounded up."""
CONTROLNET_LIVE_TENSORS = 40
VAE_ENCODER_LIVE_TENSORS = 6
"""Measured 33-36 and 5.0-5.1 (see above), rounded up."""
TEXT_TOKENS_BOUND = 512
"""At least as many text tokens as a transformer family joins to the image's (SD3: 77 + 256)."""
CGROUP = Path("/sys/fs/cgroup")
ENCODER_LIVE_TENSORS = 52
"""ViT-H's 33 hidden states and a layer's working set (normalized input, query, key, value, attention
output, the MLP's 4x-wide input and activation: 15), rounded up: 66 MB measured, 74 MB estimated."""
HEAD_WIDTH = 64
"""CLIP's narrowest attention head: width // 64 bounds its head count (ViT-L: 16, ViT-H: 16 of 80 wide)."""


@dataclass(frozen=True)
class Estimate:
    stage: str
    bytes: int


@dataclass(frozen=True)
class ImagePromptLoad:
    """What one IP-Adapter of a request runs: its images through its image encoder (each ``sequence``
    tokens of ``width``), giving the IP denoiser ``tokens`` image tokens per image."""

    encoder: str
    images: int
    sequence: int
    width: int
    tokens: int


def element_bytes(precision: str) -> int:
    return PRECISION_DTYPES[precision].itemsize


def estimates(
    config: ModelConfig,
    images: int,
    height: int,
    width: int,
    guidance: bool,
    denoiser_precision: str,
    vae_precision: str,
    controlnets: Sequence[str] = (),
    encodes_image: bool = False,
    reference_pixels: int = 0,
    image_prompts: Sequence[ImagePromptLoad] = (),
) -> list[Estimate]:
    """The activation peak of each stage that grows with the request, largest first, each stage at
    its own precision (SDXL's VAE runs in fp32 under fp16). ``controlnets`` are the ControlNet
    components the request runs (at the denoiser's precision); ``encodes_image`` is true for
    image-to-image and inpainting; ``reference_pixels`` is a reference image's size (Flux Kontext's),
    whose tokens join the denoiser's sequence; ``image_prompts`` are the IP-Adapters' encoders and tokens
    (their encoders at the denoiser's precision)."""
    factor = config.vae_scale_factor
    rows = images * (2 if guidance else 1)
    latent_pixels = (height // factor) * (width // factor)
    vae_channels = config.configs["vae"]["block_out_channels"][0]
    vae_bytes = images * height * width * vae_channels * element_bytes(vae_precision) * VAE_LIVE_TENSORS
    size = element_bytes(denoiser_precision)
    denoiser = denoiser_estimate(config, rows, latent_pixels + reference_pixels // (factor * factor), size)
    if image_prompts and "unet" in config.configs:
        denoiser = Estimate(
            denoiser.stage, denoiser.bytes + ip_attention_bytes(config, rows, latent_pixels, image_prompts, size)
        )
    found = [Estimate("vae_decoder", vae_bytes)]
    found += [Estimate(prompt.encoder, image_encoder_bytes(prompt, size)) for prompt in image_prompts]
    if controlnets and "unet" in config.configs:
        unet = config.configs["unet"]
        residuals = rows * residual_elements(unet, height // factor, width // factor) * size
        denoiser = Estimate(denoiser.stage, denoiser.bytes + residuals)
        own = rows * latent_pixels * unet["block_out_channels"][0] * size * CONTROLNET_LIVE_TENSORS
        # every ControlNet after the first runs while the sum of those before it is held
        found += [Estimate(c, own + (residuals if index else 0)) for index, c in enumerate(controlnets)]
    if encodes_image:
        encoded = max(height * width, reference_pixels)
        encoder_bytes = encoded * vae_channels * element_bytes(vae_precision) * VAE_ENCODER_LIVE_TENSORS
        found.append(Estimate("vae_encoder", encoder_bytes))
    return sorted([denoiser, *found], key=lambda estimate: estimate.bytes, reverse=True)


def residual_elements(unet: dict, latent_height: int, latent_width: int) -> int:
    """Values in one row of a ControlNet's residuals, which take the UNet's down-block shapes: the input
    convolution's, each down block's resnets' and downsampler's, and the mid block's."""
    channels, layers = unet["block_out_channels"], unet["layers_per_block"]
    height, width = latent_height, latent_width
    total = channels[0] * height * width
    for index, width_channels in enumerate(channels):
        total += layers * width_channels * height * width
        if index < len(channels) - 1:
            height, width = (height + 1) // 2, (width + 1) // 2
            total += width_channels * height * width
    return total + channels[-1] * height * width


def image_encoder_bytes(prompt: ImagePromptLoad, size: int) -> int:
    """A CLIP vision encoder's peak for one IP-Adapter's images (see above)."""
    heads = max(prompt.width // HEAD_WIDTH, 1)
    per_image = prompt.sequence * prompt.width * ENCODER_LIVE_TENSORS + heads * prompt.sequence**2
    return prompt.images * per_image * size


def ip_attention_bytes(
    config: ModelConfig, rows: int, latent_pixels: int, image_prompts: Sequence[ImagePromptLoad], size: int
) -> int:
    """What the IP denoiser's second attention keeps alive at the UNet's first block: its output, and one
    map per head over every image token (the most heads any block has, a bound)."""
    unet = config.configs["unet"]
    heads = unet["attention_head_dim"]
    heads = max(heads) if isinstance(heads, list | tuple) else heads
    tokens = sum(prompt.images * prompt.tokens for prompt in image_prompts)
    return rows * latent_pixels * (unet["block_out_channels"][0] + heads * tokens) * size


def patch_bytes(shapes: Iterable[tuple[int, ...]], precision: str) -> int:
    """What applying a LoRA set to a component holds: a dense copy of each parameter it changes at the
    component's precision (torch keeps the base values to restore; onnxruntime and TensorRT take the
    patched values as whole tensors), and while it computes, the largest one's fp32 delta, its base
    in fp32 and their sum."""
    sizes = [math.prod(shape) for shape in shapes]
    return sum(sizes) * element_bytes(precision) + 3 * max(sizes, default=0) * element_bytes("fp32")


def denoiser_estimate(config: ModelConfig, rows: int, latent_pixels: int, size: int) -> Estimate:
    """The UNet's peak (measured, see above), or a transformer's: its token sequence at its width, as
    many tensors alive as the UNet's, plus one attention map per head, which the CPU's attention
    materializes. The transformer's figure is a model, not a measurement."""
    if "unet" in config.configs:
        channels = config.configs["unet"]["block_out_channels"][0]
        return Estimate("unet", rows * latent_pixels * channels * size * UNET_LIVE_TENSORS)
    transformer = config.configs["transformer"]
    tokens = latent_pixels // config.patch_size**2 + TEXT_TOKENS_BOUND
    heads = transformer["num_attention_heads"]
    width = heads * transformer["attention_head_dim"]
    activations = rows * tokens * width * size * UNET_LIVE_TENSORS
    return Estimate("transformer", activations + rows * heads * tokens * tokens * size)


def image_prompt_load(prompt: ImagePrompt, model: Model) -> ImagePromptLoad:
    """An image prompt's sizes, read from its encoder's and its projection's specs."""
    _, sequence, width = model.specs[prompt.encoder].outputs[1].shape
    tokens = model.specs[prompt.projection].outputs[0].shape[1]
    assert isinstance(sequence, int) and isinstance(width, int) and isinstance(tokens, int)
    return ImagePromptLoad(prompt.encoder, len(prompt.images), sequence, width, tokens)


def _cgroup_room() -> int | None:
    """What the container's memory limit leaves (cgroup v2), where there is one."""
    with contextlib.suppress(OSError, ValueError):
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit != "max":
            return int(limit) - int((CGROUP / "memory.current").read_text())
    return None


def available_bytes(device: torch.device) -> int:
    """On a GPU, device memory free for a request (``cuda_room``); on the CPU, the smaller of the
    system's available memory and the container limit's room."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return cuda_room(int(free), torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device))
    room = _cgroup_room()
    available = int(psutil.virtual_memory().available)
    return min(available, room) if room is not None else available


def cuda_room(free: int, reserved: int, allocated: int) -> int:
    """The driver's free memory plus what torch's caching allocator has reserved but holds no tensor in:
    a large request leaves its blocks cached, and the next request's tensors reuse them."""
    return free + max(reserved - allocated, 0)


def check_fits(
    request: ResolvedRequest,
    loras: LoraSelection,
    model: Model,
    chains: Mapping[str, RunnerChain],
    device: torch.device,
    precision: str,
    settings: Settings,
    image_prompts: Sequence[ImagePrompt] = (),
) -> None:
    """Refuses a request whose activations, with what applying its LoRA set holds, cannot fit the memory
    left: on a GPU, only the stages whose first runner is not a TensorRT engine count. ``image_prompts``
    are the request's IP-Adapters, whose components' specs are the model's by now."""
    family, config = model.family, model.config
    controlnets = [controlnet_component(control.name) for control in request.controlnets]
    if image_prompts:
        runs_denoiser = ip_denoisers(len(image_prompts))[1 if controlnets else 0]
    else:
        runs_denoiser = CONTROLLED_UNET if controlnets else family.denoiser

    def first_runner(component: str) -> Runner | None:
        chain = chains.get(runs_denoiser if component == family.denoiser else component)
        return chain.runners[0] if chain is not None and chain.runners else None

    def outside_engines(component: str) -> bool:
        runner = first_runner(component)
        return device.type != "cuda" or runner is None or runner.backend != "tensorrt"

    guidance = family.classifier_free_scale(*request.guidance) is not None
    denoiser, vae = (family.component_precision(c, precision, config) for c in (family.denoiser, "vae_decoder"))
    found = estimates(
        config,
        request.num_images,
        request.height,
        request.width,
        guidance,
        denoiser,
        vae,
        controlnets,
        encodes_image=request.image is not None or request.control is not None,
        reference_pixels=family.reference_pixels if request.image is not None else 0,
        image_prompts=[image_prompt_load(prompt, model) for prompt in image_prompts],
    )
    relevant = [estimate for estimate in found if outside_engines(estimate.stage)]
    lora = sum(
        patch_bytes(
            (model.parameter_shapes[component][name] for name in patch.names),
            family.component_precision(component, precision, config),
        )
        for component, patch in loras.patches.items()
        if outside_engines(component) and getattr(first_runner(component), "weights_key", None) != patch.key
    )
    if not relevant and not lora:
        return
    stage, needed = (relevant[0].stage, relevant[0].bytes + lora) if relevant else ("the LoRAs", lora)
    room = available_bytes(device) - int(settings.min_free_memory_gb * 2**30)
    if needed > room:
        where = "GPU" if device.type == "cuda" else "memory"
        fields, of_which = "width, height, num_images", ""
        if lora:
            fields, of_which = f"{fields}, loras", f" ({lora / 2**30:.1f} GiB of it for the LoRAs' patched weights)"
        raise RequestError(
            f"{fields}: {request.width}x{request.height} with {request.num_images} image(s) "
            f"needs about {needed / 2**30:.1f} GiB of {where} in {stage}{of_which}, and "
            f"{max(room, 0) / 2**30:.1f} GiB is free (MIN_FREE_MEMORY_GB={settings.min_free_memory_gb:g} "
            "kept aside); ask for a smaller size or fewer images"
        )
