"""A request's peak memory, estimated before it runs, so one that cannot fit is refused, not killed.

On the CPU an out-of-memory request is killed by the kernel with no error (a 2048x2048
image died at about 12 GB here), taking the worker with it. The estimate covers the two
stages whose activations grow with the request: the UNet (two rows per image with
classifier-free guidance, at latent size, widest at its first block) and the VAE decoder
(every image at once, at full size, widest at its last block). Each is the stage's widest
activation times the number of such tensors alive at the peak, measured with the SD 1.5
architecture in fp32 on the CPU (UNet: 35-41 KB per latent pixel and row at 512-768 px,
about 32 tensors of 320 channels; VAE decoder: 3.6-3.7 KB per pixel and image, about 7
tensors of 128 channels), with a margin. The weights are already resident and are not
counted. On a GPU the same estimate is checked against free device memory for the
components that run outside TensorRT (whose engines allocate their activations up front).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from engine.dtypes import PRECISION_DTYPES
from engine.models.family import ModelConfig

UNET_LIVE_TENSORS = 36
VAE_LIVE_TENSORS = 8
"""Measured 32 and 7 (see above), rounded up."""
TEXT_TOKENS_BOUND = 512
"""At least as many text tokens as a transformer family joins to the image's (SD3: 77 + 256)."""
CGROUP = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Estimate:
    stage: str
    bytes: int


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
) -> list[Estimate]:
    """The activation peak of each stage that grows with the request, largest first, each stage at
    its own precision (SDXL's VAE runs in fp32 under fp16)."""
    factor = config.vae_scale_factor
    rows = images * (2 if guidance else 1)
    latent_pixels = (height // factor) * (width // factor)
    vae_channels = config.configs["vae"]["block_out_channels"][0]
    vae_bytes = images * height * width * vae_channels * element_bytes(vae_precision) * VAE_LIVE_TENSORS
    found = [
        denoiser_estimate(config, rows, latent_pixels, element_bytes(denoiser_precision)),
        Estimate("vae_decoder", vae_bytes),
    ]
    return sorted(found, key=lambda estimate: estimate.bytes, reverse=True)


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


def _cgroup_room() -> int | None:
    """What the container's memory limit leaves (cgroup v2), where there is one."""
    with contextlib.suppress(OSError, ValueError):
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit != "max":
            return int(limit) - int((CGROUP / "memory.current").read_text())
    return None


def available_bytes(device: torch.device) -> int:
    """Free device memory on a GPU; on the CPU, the smaller of the system's available memory and the
    container limit's room."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    room = _cgroup_room()
    available = int(psutil.virtual_memory().available)
    return min(available, room) if room is not None else available
