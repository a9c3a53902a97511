"""A diffusers model folder's configs, read once: the sizes and channel counts every stage derives from them.

``ModelConfig`` reads ``model_index.json`` and each component's ``config.json`` (or a scheduler's
``scheduler_config.json``) and answers what the families, the pipeline and the memory estimate ask
of them: the VAE's scale factor, the denoiser's channels and patch side, the native image size, and
the dtype a component's weights are stored in.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.models.modules import stored_dtype

TRANSFORMER_SAMPLE_SIZE = 128
"""Latent side of a transformer whose config has none (Flux's): diffusers' FluxPipeline default, 1024 px."""


@dataclass
class ModelConfig:
    """The parts of a diffusers model folder that shape tensors and the pipeline."""

    folder: Path
    pipeline_class: str
    pipeline_config: dict[str, Any]
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    _stored_dtypes: dict[str, torch.dtype | None] = field(default_factory=dict, repr=False, compare=False)

    def checkpoint_dtype(self, subfolder: str) -> torch.dtype | None:
        """The type the subfolder's weights are stored in (read once), or None where it cannot tell."""
        if subfolder not in self._stored_dtypes:
            folder = self.folder / subfolder
            self._stored_dtypes[subfolder] = stored_dtype(folder) if folder.is_dir() else None
        return self._stored_dtypes[subfolder]

    @classmethod
    def read(cls, folder: Path, config_subfolders: Sequence[str]) -> ModelConfig:
        index = json.loads((folder / "model_index.json").read_text())
        configs = {}
        for sub in config_subfolders:
            names = ("config.json", "scheduler_config.json")
            path = next((folder / sub / n for n in names if (folder / sub / n).is_file()), None)
            if path is not None:
                configs[sub] = json.loads(path.read_text())
        return cls(folder=folder, pipeline_class=index["_class_name"], pipeline_config=index, configs=configs)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.configs["vae"]["block_out_channels"]) - 1)

    @property
    def denoiser_config(self) -> dict[str, Any]:
        """The UNet's config, or the transformer's for the families that denoise with one."""
        return self.configs["unet"] if "unet" in self.configs else self.configs["transformer"]

    @property
    def patch_size(self) -> int:
        """A transformer's latent patch side (2 where the pipeline packs 2x2 latents into one token, as
        Flux's does: its transformer then takes 4 times the VAE's channels); 1 for a UNet."""
        if "unet" in self.configs:
            return 1
        if self.denoiser_out_channels == 4 * self.latent_channels:
            return 2
        return int(self.denoiser_config.get("patch_size") or 1)

    @property
    def denoiser_out_channels(self) -> int:
        """The denoiser's output channels: its input's where its config leaves them out (Flux's)."""
        config = self.denoiser_config
        return int(config.get("out_channels") or config["in_channels"])

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's factor, times a transformer's patch side."""
        return self.vae_scale_factor * self.patch_size

    @property
    def max_side(self) -> int | None:
        """The largest image side the denoiser takes, where it has one (SD3's position embedding)."""
        patches = self.denoiser_config.get("pos_embed_max_size")
        return int(patches) * self.size_multiple if patches else None

    @property
    def native_size(self) -> int:
        sample_size = self.denoiser_config.get("sample_size", TRANSFORMER_SAMPLE_SIZE)
        if isinstance(sample_size, list | tuple):
            sample_size = sample_size[0]
        return int(sample_size) * self.vae_scale_factor

    @property
    def guidance_embedding_dim(self) -> int | None:
        """Width of an LCM-distilled UNet's guidance-scale embedding (its ``time_cond_proj_dim``); None
        for a UNet that takes classifier-free guidance instead, or a transformer."""
        dim = self.configs.get("unet", {}).get("time_cond_proj_dim")
        return int(dim) if dim else None

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE's latents: the UNet takes more only when it is an inpainting UNet."""
        return int(self.configs["vae"]["latent_channels"])

    @property
    def inpainting_unet(self) -> bool:
        """An inpainting UNet takes the mask and the masked image's latents besides the latents."""
        return "unet" in self.configs and int(self.configs["unet"]["in_channels"]) != self.latent_channels

    @property
    def unet_down_factor(self) -> int:
        """How many times the UNet halves the latent; latent sizes it handles without resizing. 1 for a
        transformer, which never halves (it cuts the latent into patches)."""
        if "unet" not in self.configs:
            return 1
        return 2 ** (len(self.configs["unet"]["block_out_channels"]) - 1)
