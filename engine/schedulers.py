"""Schedulers by name; each inherits the model's own scheduler config.

A name is one of ``SCHEDULERS`` (a sampler, with its noise schedule where it differs from
the model's: ``_karras``, ``_trailing``) or a name AUTOMATIC1111 or ComfyUI users type for
it, read case-insensitively (``canonical_name``): ``DPM++ 2M Karras``, ``Euler a``,
``dpmpp_2m karras``, ``euler_ancestral``, ``euler sgm_uniform``.

Each request steps a scheduler of its own (``engine.pipeline.schedules`` copies one set up per
name, step count and size), so concurrent requests never share a scheduler's step state. A request's
``eta`` goes to every ``step`` of the schedulers that take one (``ETA_DEFAULTS``).
"""

from __future__ import annotations

import importlib.util
import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin


@dataclass(frozen=True)
class SchedulerChoice:
    """A diffusers scheduler class and the settings it overrides in the model's config."""

    class_name: str
    overrides: dict[str, Any] = field(default_factory=dict)


TRAILING = {"timestep_spacing": "trailing"}
KARRAS = {"use_karras_sigmas": True}
SDE = {"algorithm_type": "sde-dpmsolver++"}
TCD_ETA = 0.3
"""TCD's stochasticity (gamma in the paper): the value diffusers' TCD examples use."""
ETA_DEFAULTS: dict[str, float] = {"DDIMScheduler": 0.0, "TCDScheduler": TCD_ETA}
"""The schedulers whose ``step`` takes ``eta`` (a request's ``eta``), with the value a request without one
gets: DDIM's 0 as diffusers' pipelines pass it, TCD's as diffusers' TCD examples. Kept by class name, so
the request schema reads it without importing diffusers."""

SCHEDULERS: dict[str, SchedulerChoice] = {
    "ddim": SchedulerChoice("DDIMScheduler"),
    "ddpm": SchedulerChoice("DDPMScheduler"),
    "pndm": SchedulerChoice("PNDMScheduler"),
    "euler": SchedulerChoice("EulerDiscreteScheduler"),
    "euler_trailing": SchedulerChoice("EulerDiscreteScheduler", TRAILING),
    "euler_a": SchedulerChoice("EulerAncestralDiscreteScheduler"),
    "euler_a_trailing": SchedulerChoice("EulerAncestralDiscreteScheduler", TRAILING),
    "heun": SchedulerChoice("HeunDiscreteScheduler"),
    "dpmpp_2m": SchedulerChoice("DPMSolverMultistepScheduler"),
    "dpmpp_2m_karras": SchedulerChoice("DPMSolverMultistepScheduler", KARRAS),
    "dpmpp_2m_sde": SchedulerChoice("DPMSolverMultistepScheduler", SDE),
    "dpmpp_2m_sde_karras": SchedulerChoice("DPMSolverMultistepScheduler", SDE | KARRAS),
    "dpmpp_sde": SchedulerChoice("DPMSolverSDEScheduler"),
    "dpmpp_sde_karras": SchedulerChoice("DPMSolverSDEScheduler", KARRAS),
    "unipc": SchedulerChoice("UniPCMultistepScheduler"),
    "lcm": SchedulerChoice("LCMScheduler"),
    "tcd": SchedulerChoice("TCDScheduler"),
    "flow_euler": SchedulerChoice("FlowMatchEulerDiscreteScheduler"),
}
REQUIRES = {"DPMSolverSDEScheduler": "torchsde"}
"""Schedulers that need a package diffusers does not (a project dependency; offered only where installed)."""


def installed(choice: SchedulerChoice) -> bool:
    """Whether the scheduler's own dependency, where it has one, can be imported."""
    package = REQUIRES.get(choice.class_name)
    return package is None or importlib.util.find_spec(package) is not None


SCHEDULER_NAMES: tuple[str, ...] = tuple(SCHEDULERS)
CLASSIC_SCHEDULERS: tuple[str, ...] = tuple(
    name for name, choice in SCHEDULERS.items() if not name.startswith("flow_") and installed(choice)
)
"""The noise-prediction schedulers of Stable Diffusion 1.x/2.x and SDXL that can run here."""
FLOW_SCHEDULERS: tuple[str, ...] = ("flow_euler",)
"""Flow-matching schedulers (SD3, Flux)."""

SAMPLER_ALIASES = {"euler_ancestral": "euler_a", "uni_pc": "unipc", "k_euler": "euler", "k_euler_a": "euler_a"}
"""ComfyUI's and k-diffusion's sampler names that differ from ours."""
SCHEDULE_ALIASES = {"karras": "_karras", "trailing": "_trailing", "sgm_uniform": "_trailing", "simple": "_trailing"}
"""Noise schedules typed after a sampler (ComfyUI's ``scheduler``, A1111's schedule type), as the suffix of
our name. ``sgm_uniform`` and ``simple`` are trailing timesteps, as diffusers' scheduler docs map them."""
DEFAULT_SCHEDULES = ("normal", "automatic", "default")
"""Schedule names that keep the model's own spacing."""
WHOLE_ALIASES = {"sgm_uniform": "euler_trailing"}
"""Names that stand alone: ``sgm_uniform`` is Euler with trailing timesteps, as SDXL-Lightning is run."""


def normalized(name: str) -> str:
    """Lower case, ``++`` as ``pp``, and any run of spaces, ``+``, ``-`` or ``_`` as one ``_``."""
    return re.sub(r"[\s+_-]+", "_", name.strip().lower().replace("++", "pp")).strip("_")


def canonical_name(name: str) -> str | None:
    """Our name for a scheduler name in any accepted style, or None for a name we do not know."""
    key = normalized(name)
    key = WHOLE_ALIASES.get(key, key)
    if key in SCHEDULERS:
        return key
    sampler, suffix = key, ""
    for schedule, ending in SCHEDULE_ALIASES.items():
        if key.endswith("_" + schedule):
            sampler, suffix = key[: -len(schedule) - 1], ending
            break
    else:
        for schedule in DEFAULT_SCHEDULES:
            if key.endswith("_" + schedule):
                sampler = key[: -len(schedule) - 1]
    candidate = SAMPLER_ALIASES.get(sampler, sampler) + suffix
    return candidate if candidate in SCHEDULERS else None


FLOW_EULER_NAMES = ("euler", "euler_trailing")
"""What SD3's and Flux's users type for their sampler (Forge's ``Euler``, ComfyUI's ``euler`` with
``simple`` or ``sgm_uniform``): on a flow-matching model, ``flow_euler`` with the model's own shift."""


def offered_name(name: str, offered: Sequence[str]) -> str | None:
    """``canonical_name``, where a model offering ``flow_euler`` reads the Euler names as it."""
    found = canonical_name(name)
    if found not in offered and "flow_euler" in offered and found in FLOW_EULER_NAMES:
        return "flow_euler"
    return found


def make_scheduler(name: str | None, model_config: dict[str, Any], seeds: Sequence[int] = ()) -> SchedulerMixin:
    """The named scheduler on the model's config (prediction type, betas, spacing), or the model's own.

    A scheduler that draws its noise from a Brownian tree of its own (``DPMSolverSDEScheduler``, DPM++ SDE)
    gets one tree per image, seeded with that image's seed, so a seed gives the same image in any batch.
    """
    import diffusers  # here, not at import: the request schema reads the names without loading diffusers

    choice = SchedulerChoice(model_config["_class_name"]) if name is None else SCHEDULERS[name]
    cls = getattr(diffusers, choice.class_name)
    overrides = dict(choice.overrides)
    if seeds and "noise_sampler_seed" in inspect.signature(cls.__init__).parameters:
        overrides["noise_sampler_seed"] = list(seeds)
    return cls.from_config(model_config, **overrides)


def scheduler_class(name: str | None, model_class: str) -> str:
    """The diffusers class a request's scheduler runs: the named one's, or the model's own (``model_class``)."""
    return model_class if name is None else SCHEDULERS[name].class_name


def eta_names(names: Sequence[str]) -> list[str]:
    """Those of ``names`` whose scheduler takes ``eta``."""
    return [name for name in names if SCHEDULERS[name].class_name in ETA_DEFAULTS]


def step_options(name: str | None, model_class: str, eta: float | None = None) -> dict[str, Any]:
    """Extra arguments of every ``step`` of the scheduler a request runs: ``eta`` where it takes one, the
    request's or the scheduler's default (``ETA_DEFAULTS``); none for the others."""
    default = ETA_DEFAULTS.get(scheduler_class(name, model_class))
    if default is None:
        return {}
    return {"eta": default if eta is None else eta}
