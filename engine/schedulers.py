"""Schedulers by name; each inherits the model's own scheduler config.

A fresh scheduler is made per request (``from_config`` is cheap), so concurrent
requests never share a scheduler's step state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
}
SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULERS)
CLASSIC_SCHEDULERS: tuple[str, ...] = tuple(name for name in SCHEDULERS if not name.startswith("flow_"))
"""The noise-prediction schedulers of Stable Diffusion 1.x/2.x and SDXL."""
FLOW_SCHEDULERS: tuple[str, ...] = ("flow_euler",)
"""Flow-matching schedulers (SD3, Flux)."""


def make_scheduler(name: str | None, model_config: dict[str, Any]) -> SchedulerMixin:
    """The named scheduler on the model's config (prediction type, betas, spacing), or the model's own."""
    import diffusers  # here, not at import: the request schema reads the names without loading diffusers

    if name is None:
        return getattr(diffusers, model_config["_class_name"]).from_config(model_config)
    class_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(model_config, **overrides)
