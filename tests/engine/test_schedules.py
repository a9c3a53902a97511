"""Set-up schedulers kept per (name, steps, latent size) and copied per request: each request steps its
own copy, equal to a scheduler made for it, and per-seed Brownian schedulers are never kept."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from engine.models.model import load_model
from engine.pipeline.schedules import Schedules
from engine.schedulers import make_scheduler


def fresh(model, name, steps, shape, seeds=(1,)):
    scheduler = make_scheduler(name, model.scheduler_config, seeds)
    options = model.family.timestep_options(model.config, scheduler, steps, shape)
    scheduler.set_timesteps(steps, device=torch.device("cpu"), **options)
    return scheduler


@pytest.mark.parametrize(
    ("model_name", "name", "shapes"),
    [
        ("tiny", "euler_a_trailing", [(1, 4, 8, 8), (2, 4, 8, 8)]),
        ("tiny-sdxl", None, [(1, 4, 8, 8)]),
        ("tiny-flux", None, [(1, 16, 8, 8), (1, 16, 16, 8), (2, 16, 8, 8)]),  # the shift follows the size
    ],
)
def test_each_request_gets_its_own_copy_equal_to_a_fresh_scheduler(cache_dir, model_name, name, shapes):
    model = load_model(model_name, cache_dir)
    schedules = Schedules(model, torch.device("cpu"))
    for shape in shapes:
        first = schedules.scheduler(name, 4, shape, [1])
        first.step(torch.zeros(shape), first.timesteps[0], torch.ones(shape), return_dict=False)  # steps this copy
        second = schedules.scheduler(name, 4, shape, [2])
        assert second is not first and second.step_index is None
        expected = fresh(model, name, 4, shape)
        assert torch.equal(second.timesteps, expected.timesteps)
        assert torch.equal(second.sigmas, expected.sigmas)
    assert len(schedules._kept) == len({shape[2:] for shape in shapes})


def test_a_scheduler_seeded_per_image_is_made_for_each_request(cache_dir):
    if importlib.util.find_spec("torchsde") is None:
        pytest.skip("DPM++ SDE needs torchsde")
    schedules = Schedules(load_model("tiny", cache_dir), torch.device("cpu"))
    first = schedules.scheduler("dpmpp_sde", 4, (2, 4, 8, 8), [5, 6])
    second = schedules.scheduler("dpmpp_sde", 4, (2, 4, 8, 8), [7, 8])
    assert first.config.noise_sampler_seed == [5, 6] and second.config.noise_sampler_seed == [7, 8]
    assert not schedules._kept
