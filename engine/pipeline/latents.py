"""The VAE's latent space: image latents scaled into the denoiser's space and back, and noised.

diffusers' pipelines scale latents by the VAE's ``scaling_factor``, shifted by its ``shift_factor``
(SD3, Flux) or normalized by per-channel ``latents_mean``/``latents_std``; noising follows the
scheduler: ``add_noise``, or ``scale_noise`` for flow matching.
"""

from __future__ import annotations

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from engine.models.model import Model


class LatentScaling:
    """One model's latent scaling on one device."""

    def __init__(self, model: Model, device: torch.device):
        self.model = model
        self.device = device

    def statistics(self, channels: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The VAE's per-channel latent mean and std, where its config gives them."""
        vae = self.model.config.configs["vae"]
        if vae.get("latents_mean") is None or vae.get("latents_std") is None:
            return None
        mean = torch.tensor(vae["latents_mean"], device=self.device).view(1, channels, 1, 1)
        std = torch.tensor(vae["latents_std"], device=self.device).view(1, channels, 1, 1)
        return mean, std

    def scale(self, latents: torch.Tensor) -> torch.Tensor:
        """Image latents into the denoiser's latent space (the inverse of ``unscale``)."""
        scaling = self.model.config.configs["vae"]["scaling_factor"]
        shift = self.model.config.configs["vae"].get("shift_factor")
        statistics = self.statistics(latents.shape[1])
        if statistics is None:
            return latents * scaling if shift is None else (latents - shift) * scaling
        mean, std = statistics
        return (latents - mean) * scaling / std

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the VAE's latent scaling, and its shift (SD3's and Flux's ``shift_factor``, or per-channel
        latent statistics)."""
        scaling = self.model.config.configs["vae"]["scaling_factor"]
        shift = self.model.config.configs["vae"].get("shift_factor")
        statistics = self.statistics(latents.shape[1])
        if statistics is None:
            return latents / scaling if shift is None else latents / scaling + shift
        mean, std = statistics
        return latents * std / scaling + mean


def initial_sigma(scheduler: SchedulerMixin) -> float:
    """How much the starting noise is scaled: flow-matching schedulers start from plain noise."""
    return getattr(scheduler, "init_noise_sigma", 1.0)


def noised(
    scheduler: SchedulerMixin, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """Latents noised to ``timesteps``: ``add_noise``, or for flow matching ``scale_noise`` (a blend
    towards the noise, as SD3's and Flux's img2img pipelines do)."""
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(latents, timesteps, noise)
    return scheduler.add_noise(latents, noise, timesteps)
