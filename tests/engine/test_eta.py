"""A request's ``eta``: the stochasticity of the schedulers whose step takes one (TCD, DDIM), checked as a
field (0 to 1, finite), refused by name for every other scheduler, and run as diffusers' pipelines run it."""

from __future__ import annotations

import inspect

import diffusers
import numpy as np
import pytest
from diffusers import StableDiffusionPipeline

from engine.common.errors import RequestError
from engine.request.checking import parse_request
from engine.request.limits import Limits
from engine.schedulers import ETA_DEFAULTS, SCHEDULERS, TCD_ETA
from tests.parity import assert_same_images, cpu_worker, diffusers_pipe, generate, reference_images

LIMITS = Limits(64, 25, 7.5, 64, 1024, 1024 * 1024, 50, 4, 4, 60.0, model_scheduler="PNDMScheduler")


def problems(payload: dict, limits: Limits = LIMITS) -> str:
    with pytest.raises(RequestError) as caught:
        parse_request({"prompt": "a", **payload}, limits)
    return str(caught.value)


def test_the_eta_table_is_every_scheduler_whose_step_takes_eta():
    takes = {
        choice.class_name
        for choice in SCHEDULERS.values()
        if "eta" in inspect.signature(getattr(diffusers, choice.class_name).step).parameters
    }
    assert set(ETA_DEFAULTS) == takes
    assert ETA_DEFAULTS["TCDScheduler"] == TCD_ETA == 0.3


@pytest.mark.parametrize("eta", [0, 0.0, 0.3, 1, 1.0])
@pytest.mark.parametrize("scheduler", ["tcd", "TCD", "ddim"])
def test_eta_is_taken_from_0_to_1_with_a_scheduler_that_takes_it(scheduler, eta):
    request = parse_request({"prompt": "a", "scheduler": scheduler, "eta": eta}, LIMITS)
    assert request.eta == eta and request.scheduler == scheduler.lower()


@pytest.mark.parametrize(
    ("eta", "rule"),
    [
        (-0.1, "eta: Input should be greater than or equal to 0"),
        (1.5, "eta: Input should be less than or equal to 1"),
        (float("nan"), "eta: Input should be a finite number"),
        (float("inf"), "eta: Input should be a finite number"),
        ("0.3", "eta: Input should be a valid number"),
        (True, "eta: Input should be a valid number"),
    ],
)
def test_an_eta_out_of_range_or_not_a_number_is_refused(eta, rule):
    assert problems({"scheduler": "tcd", "eta": eta}) == rule


@pytest.mark.parametrize(
    ("typed", "ours"), [("euler_a", "euler_a"), ("LCM", "lcm"), ("DPM++ 2M Karras", "dpmpp_2m_karras")]
)
def test_eta_with_a_scheduler_that_takes_none_is_refused_naming_it(typed, ours):
    expected = f"eta: only applies with a scheduler that takes it (ddim, tcd); scheduler '{ours}' takes none"
    assert problems({"scheduler": typed, "eta": 0.5}) == expected
    assert expected in problems({"scheduler": typed, "eta": 0.5, "width": 65})  # another field failed too


def test_eta_without_a_scheduler_follows_the_model_folders_own():
    assert problems({"eta": 0.5}) == (
        "eta: only applies with a scheduler that takes it (ddim, tcd); "
        "the model's own scheduler (PNDMScheduler) takes none"
    )
    tcd_folder = Limits(64, 25, 7.5, 64, 1024, 1024 * 1024, 50, 4, 4, 60.0, model_scheduler="TCDScheduler")
    assert parse_request({"prompt": "a", "eta": 0.5}, tcd_folder).eta == 0.5


@pytest.fixture(scope="module")
def sd(cache_dir, tmp_path_factory):
    worker = cpu_worker("tiny", cache_dir, tmp_path_factory.mktemp("sd"))
    return worker, diffusers_pipe(StableDiffusionPipeline, worker)


def payload(scheduler: str, eta: float | None, steps: int = 4) -> dict:
    request = {"prompt": "a red fox", "width": 64, "height": 64, "num_inference_steps": steps, "seed": 8}
    request |= {"scheduler": scheduler, "guidance_scale": 6.0, "num_images": 2}
    return request if eta is None else {**request, "eta": eta}


@pytest.mark.parametrize(("scheduler", "eta"), [("tcd", 0.0), ("tcd", 1.0), ("tcd", 0.7), ("ddim", 0.8)])
def test_a_requests_eta_matches_diffusers_pipeline_called_with_it(sd, scheduler, eta):
    worker, pipe = sd
    request = payload(scheduler, eta)
    assert_same_images(generate(worker, request), reference_images(pipe, worker, request))


@pytest.mark.parametrize(("scheduler", "default", "other"), [("tcd", 0.3, 0.9), ("ddim", 0.0, 1.0)])
def test_eta_steers_the_image_and_its_default_is_the_schedulers(sd, scheduler, default, other):
    worker, _ = sd
    unset = generate(worker, payload(scheduler, None))
    assert np.array_equal(unset[0], generate(worker, payload(scheduler, default))[0])
    assert np.abs(unset[0] - generate(worker, payload(scheduler, other))[0]).max() > 2


def test_a_bad_eta_is_a_request_error_and_the_worker_keeps_serving(sd):
    worker, _ = sd
    refused = worker.handle({"id": "bad", "input": payload("euler", 0.5, steps=2)})
    assert refused["error"].startswith("eta: only applies with a scheduler that takes it")
    served = worker.handle({"id": "good", "input": payload("tcd", 0.5, steps=2)})
    assert served["status"] == "success", served
