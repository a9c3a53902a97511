"""The denoising step loop: the latents stepped through the schedule, with ControlNet residuals.

``DiffusionPipeline`` (``engine.pipeline.loop``) gathers what a run takes that no step changes into a
``Denoising`` and calls ``denoise``; each call steps its own copy of the scheduler, so a stage rerun
in fp32 starts where the first run did. The order of operations is diffusers': scale the model input,
run the ControlNets, then the (controlled) denoiser, classifier-free guidance, the scheduler's step,
and, for a 4-channel inpainting model, the kept region blended back.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from engine.backends.base import ComponentCall
from engine.common.metrics import StageTimer
from engine.models.controlnet import CONTROLLED_UNET
from engine.pipeline.preparation import Control, Inpainting

StepCallback = Callable[[int, int], None]
"""Called after each denoising step with (steps done, steps in all); may raise to stop."""


@dataclass(frozen=True, eq=False)
class Denoising:
    """One request's inputs to the step loop that stay the same from step to step."""

    denoiser: str
    """The component each step runs where no ControlNet acts (the family's UNet or transformer)."""
    scheduler: SchedulerMixin
    """The scheduler as the first step finds it; every run steps a copy of it."""
    timesteps: torch.Tensor
    conditioning: Mapping[str, torch.Tensor]
    """The denoiser's inputs besides latents and timestep: text embeddings and the family's extras."""
    cfg_scale: float | None
    """The scale of classifier-free guidance (rows batched negatives first), or None without it."""
    options: Mapping[str, object]
    """The scheduler's extra ``step`` arguments (TCD's ``eta``)."""
    generators: list[torch.Generator]
    """One per image; the scheduler's ``step`` draws from them where it takes a generator."""
    controls: Sequence[Control] = ()
    controlled: str = CONTROLLED_UNET
    """The component steps where a ControlNet acts run (the controlled UNet, or its IP variant)."""
    inpaint: Inpainting | None = None
    channels: torch.Tensor | None = None
    """The denoiser's extra input channels (an inpainting model's mask and masked image, a Flux Control
    model's control image), joined to the latents at every step."""


def _accepts(function: Callable, name: str) -> bool:
    return name in inspect.signature(function).parameters


def denoise(
    latents: torch.Tensor,
    run: Denoising,
    runners: Mapping[str, ComponentCall],
    timer: StageTimer,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """The latents after every step of ``run.timesteps``, stepped on a fresh copy of ``run.scheduler``."""
    scheduler = copy.deepcopy(run.scheduler)
    timesteps, channels, cfg_scale = run.timesteps, run.channels, run.cfg_scale
    guidance = cfg_scale is not None
    step_kwargs = {"generator": run.generators} if _accepts(scheduler.step, "generator") else {}
    step_kwargs |= run.options
    for index, timestep in enumerate(timesteps):
        with timer.step():
            model_input = torch.cat([latents] * 2) if guidance else latents
            if hasattr(scheduler, "scale_model_input"):  # flow matching feeds latents as they are
                model_input = scheduler.scale_model_input(model_input, timestep)
            inputs = {"sample": model_input, "timestep": timestep.reshape(1), **run.conditioning}
            residuals = _residuals(run.controls, inputs, index, len(timesteps), runners, timer)
            if channels is not None:
                extra = torch.cat([channels] * 2) if guidance else channels
                inputs["sample"] = torch.cat([model_input, extra], dim=1)
            denoiser = runners[run.denoiser] if residuals is None else runners[run.controlled]
            noise_pred = denoiser({**inputs, **(residuals or {})})["noise_pred"].to(latents.dtype)
            if cfg_scale is not None:
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = noise_uncond + cfg_scale * (noise_text - noise_uncond)
            latents = scheduler.step(noise_pred, timestep, latents, **step_kwargs, return_dict=False)[0]
            if run.inpaint is not None and run.inpaint.channels is None:
                latents = run.inpaint.blend(latents, scheduler, timesteps, index)
        if on_step is not None:
            on_step(index + 1, len(timesteps))
    return latents


def _residuals(
    controls: Sequence[Control],
    inputs: Mapping[str, torch.Tensor],
    index: int,
    steps: int,
    runners: Mapping[str, ComponentCall],
    timer: StageTimer,
) -> dict[str, torch.Tensor] | None:
    """The ControlNets' residuals for one step, each scaled and then summed in request order, as
    diffusers' ``MultiControlNetModel``; None when none acts at this step. A ControlNet whose
    scale is 0 here is not run: its residuals would add exact zeros."""
    total: dict[str, torch.Tensor] | None = None
    for control in controls:
        scale = control.scale_at(index, steps)
        if scale == 0.0:
            continue
        with timer.stage(control.component):
            outputs = runners[control.component]({**inputs, "controlnet_cond": control.image})
        scaled = {name: value * scale for name, value in outputs.items()}
        total = scaled if total is None else {name: total[name] + scaled[name] for name in total}
    return total
