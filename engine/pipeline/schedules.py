"""A request's scheduler, set up once per name, step count and latent size, and copied for each request.

diffusers' ``from_config`` and ``set_timesteps`` take 1-2 ms on the CPU per request: more than all of a
4-step request's own Python around the denoiser (about 0.02 ms a step). A request gets a deep copy
(0.1-0.4 ms) of the scheduler the first request of its kind set up, so no two requests share step
state and a template is never stepped. A scheduler that draws from Brownian trees seeded per
image (DPM++ SDE) is made for each request.
"""

from __future__ import annotations

import copy
import inspect
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from engine.models.model import Model
from engine.schedulers import make_scheduler

MAX_SCHEDULES = 32
"""Set-up schedulers kept (least recently used out): a few KB each."""


def _seeded(scheduler: SchedulerMixin) -> bool:
    return "noise_sampler_seed" in inspect.signature(type(scheduler).__init__).parameters


class Schedules:
    """One model's set-up schedulers, by (scheduler name, steps, latent shape)."""

    def __init__(self, model: Model, device: torch.device):
        self.model = model
        self.device = device
        self._kept: OrderedDict[tuple, SchedulerMixin] = OrderedDict()
        self._lock = threading.Lock()

    def scheduler(self, name: str | None, steps: int, shape: tuple[int, ...], seeds: Sequence[int]) -> SchedulerMixin:
        """The named scheduler (None: the model's own) with its timesteps set for ``steps`` steps of
        latents of ``shape``, the family's way (Flux's and SD3's shift follow the image's size); the
        caller's own, to step."""
        key = (name, steps, shape[2:])
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None:
                self._kept.move_to_end(key)
                return copy.deepcopy(kept)
        model = self.model
        scheduler = make_scheduler(name, model.scheduler_config, seeds)
        options = model.family.timestep_options(model.config, scheduler, steps, shape)
        scheduler.set_timesteps(steps, device=self.device, **options)
        if _seeded(scheduler):
            return scheduler
        with self._lock:
            self._kept[key] = copy.deepcopy(scheduler)
            while len(self._kept) > MAX_SCHEDULES:
                self._kept.popitem(last=False)
        return scheduler
