"""Few-step schedulers and checkpoints against diffusers' own pipelines, same inputs, same seed.

Each new scheduler at 1, 2, 4 and 8 steps on SD and on SDXL; a held-out SDXL folder
whose scheduler config is already a Lightning-style trailing Euler; a held-out LCM-distilled
UNet (``time_cond_proj_dim``) with its LCM scheduler; and the names AUTOMATIC1111 and ComfyUI
users type, which must give the same images as ours.
"""

from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import pytest
import torch
from diffusers import (
    EulerDiscreteScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from engine.common.errors import RequestError
from engine.models.builtin import builtin_model_folder
from engine.serving.worker import Worker
from engine.settings import Settings
from tests.conftest import run_export
from tests.parity import (
    TOLERANCE,
    assert_same_images,
    cpu_worker,
    decoded,
    diffusers_pipe,
    generate,
    reference_images,
)

NEW_SCHEDULERS = ("lcm", "tcd", "euler_trailing", "euler_a_trailing", "dpmpp_2m_sde_karras")


@pytest.fixture(scope="module")
def sd(cache_dir, tmp_path_factory):
    worker = cpu_worker("tiny", cache_dir, tmp_path_factory.mktemp("sd"))
    return worker, diffusers_pipe(StableDiffusionPipeline, worker)


@pytest.fixture(scope="module")
def sdxl(cache_dir, tmp_path_factory):
    worker = cpu_worker("tiny-sdxl", cache_dir, tmp_path_factory.mktemp("sdxl"))
    return worker, diffusers_pipe(StableDiffusionXLPipeline, worker)


def few_step(steps: int, seed: int, **extra) -> dict:
    return {
        "prompt": "a red fox",
        "width": 64,
        "height": 64,
        "num_inference_steps": steps,
        "guidance_scale": 6.0,
        "seed": seed,
        **extra,
    }


STEPS = (1, 2, 4, 8)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("scheduler", NEW_SCHEDULERS)
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_few_step_schedulers_match_diffusers(request, family, scheduler, steps):
    worker, pipe = request.getfixturevalue(family)
    extra = {"negative_prompt": "blurry"} if family == "sd" else {}
    payload = few_step(steps, steps + (10 if family == "sdxl" else 0), scheduler=scheduler, **extra)
    assert_same_images(generate(worker, payload), reference_images(pipe, worker, payload))


def test_each_few_step_scheduler_makes_its_own_image(sd):
    """The parity above compares real differences: the schedulers' 2-step images differ from one another."""
    worker, _ = sd
    images = {name: generate(worker, few_step(2, 5, scheduler=name))[0] for name in NEW_SCHEDULERS}
    for first, second in itertools.pairwise(NEW_SCHEDULERS):
        assert np.abs(images[first] - images[second]).max() > 2, (first, second)


def needs_torchsde() -> None:
    pytest.importorskip("torchsde", reason="DPM++ SDE needs torchsde, a dependency this environment lacks")


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("scheduler", ["dpmpp_sde", "dpmpp_sde_karras"])
@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_dpmpp_sde_matches_diffusers_seeded_per_image(request, family, scheduler, steps):
    needs_torchsde()
    worker, pipe = request.getfixturevalue(family)
    payload = few_step(steps, 50 + steps, scheduler=scheduler, num_images=2)
    assert_same_images(generate(worker, payload), reference_images(pipe, worker, payload))


def test_dpmpp_sde_gives_a_seed_the_same_image_alone_and_in_a_batch(sd):
    needs_torchsde()
    worker, _ = sd
    batch = generate(worker, few_step(4, 60, scheduler="DPM++ SDE Karras", num_images=2))
    alone = generate(worker, few_step(4, 61, scheduler="DPM++ SDE Karras"))
    assert np.abs(batch[1] - alone[0]).max() <= TOLERANCE  # a batch of two rounds a little differently
    assert np.abs(batch[0] - batch[1]).max() > 4 * TOLERANCE


def test_without_torchsde_dpmpp_sde_is_refused_as_a_request_error(sd):
    if importlib.util.find_spec("torchsde") is not None:
        pytest.skip("torchsde is installed here")
    with pytest.raises(RequestError, match=r"^scheduler: must be one of .*, got 'DPM\+\+ SDE'"):
        sd[0].resolve(few_step(2, 1, scheduler="DPM++ SDE"))


@pytest.mark.parametrize(
    ("typed", "ours"),
    [
        ("DPM++ 2M SDE Karras", "dpmpp_2m_sde_karras"),
        ("euler_ancestral sgm_uniform", "euler_a_trailing"),
        ("LCM", "lcm"),
    ],
)
def test_aliases_give_the_same_images_as_our_names(sd, typed, ours):
    worker, _ = sd
    request, _ = worker.resolve(few_step(2, 4, scheduler=typed))
    assert request.scheduler == ours
    assert np.array_equal(
        generate(worker, few_step(2, 4, scheduler=typed))[0], generate(worker, few_step(2, 4, scheduler=ours))[0]
    )


@pytest.mark.parametrize("typed", ["Euler", "euler simple", "euler sgm_uniform", "flow_euler"])
def test_a_flux_model_reads_the_euler_names_its_users_type_as_flow_euler(cache_dir, tmp_path, typed):
    worker = cpu_worker("tiny-flux", cache_dir, tmp_path)
    payload = {"prompt": "a red fox", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 3}
    assert worker.resolve({**payload, "scheduler": typed})[0].scheduler == "flow_euler"
    assert np.array_equal(generate(worker, {**payload, "scheduler": typed})[0], generate(worker, payload)[0])
    with pytest.raises(RequestError, match=r"^scheduler: must be one of flow_euler for this model"):
        worker.resolve({**payload, "scheduler": "Euler a"})


@pytest.fixture(scope="module")
def lightning(cache_dir, tmp_path_factory):
    """A held-out SDXL folder shipped as SDXL-Lightning is: Euler with trailing timesteps and no step offset,
    a wider UNet than the built-in's."""
    folder = tmp_path_factory.mktemp("held-out-lightning")
    base = StableDiffusionXLPipeline.from_pretrained(builtin_model_folder("tiny-sdxl", cache_dir))
    with torch.random.fork_rng():
        torch.manual_seed(5)
        unet = UNet2DConditionModel.from_config({**base.unet.config, "attention_head_dim": 4})
    scheduler = EulerDiscreteScheduler.from_config(base.scheduler.config, timestep_spacing="trailing", steps_offset=0)
    StableDiffusionXLPipeline(**{**base.components, "unet": unet, "scheduler": scheduler}).save_pretrained(folder)
    worker = cpu_worker(str(folder), cache_dir, tmp_path_factory.mktemp("lightning-engines"))
    return worker, diffusers_pipe(StableDiffusionXLPipeline, worker)


@pytest.mark.parametrize("steps", STEPS)
def test_a_trailing_folder_runs_with_its_own_schedule(lightning, steps):
    worker, pipe = lightning
    payload = few_step(steps, 20 + steps, guidance_scale=0.0)
    request, _ = worker.resolve(payload)
    assert request.scheduler is None  # the folder's own scheduler, as its authors ship it
    assert_same_images(generate(worker, payload), reference_images(pipe, worker, payload))


@pytest.fixture(scope="module")
def lcm_distilled(cache_dir, tmp_path_factory):
    """A held-out LCM-distilled SD folder: a UNet with a guidance-scale embedding (``time_cond_proj_dim``)
    and the LCM scheduler, as LCM checkpoints ship."""
    folder = tmp_path_factory.mktemp("held-out-lcm")
    base = StableDiffusionPipeline.from_pretrained(builtin_model_folder("tiny", cache_dir), safety_checker=None)
    with torch.random.fork_rng():
        torch.manual_seed(9)
        unet = UNet2DConditionModel.from_config({**base.unet.config, "time_cond_proj_dim": 33})
        torch.nn.init.normal_(unet.time_embedding.cond_proj.weight, std=0.5)
    scheduler = LCMScheduler.from_config(base.scheduler.config)
    StableDiffusionPipeline(**{**base.components, "unet": unet, "scheduler": scheduler}).save_pretrained(folder)
    worker = cpu_worker(str(folder), cache_dir, tmp_path_factory.mktemp("lcm-engines"))
    return worker, diffusers_pipe(StableDiffusionPipeline, worker)


@pytest.mark.parametrize(("steps", "guidance"), [(1, 8.5), (4, 3.0), (8, 1.5)])
def test_an_lcm_distilled_unet_takes_guidance_as_an_embedding(lcm_distilled, steps, guidance):
    worker, pipe = lcm_distilled
    assert "timestep_cond" in worker.model.specs["unet"].input_names
    payload = few_step(steps, 30 + steps, guidance_scale=guidance, num_images=2)
    ours = generate(worker, payload)
    assert_same_images(ours, reference_images(pipe, worker, payload))
    other = generate(worker, {**payload, "guidance_scale": 1.0})
    assert np.abs(ours[0] - other[0]).max() > 2  # the embedding steers the image


def test_an_lcm_distilled_sdxl_unet_takes_the_embedding_after_its_added_conditions(cache_dir, tmp_path):
    """LCM-SDXL's layout: text embeds and time ids, then the guidance embedding, in one UNet call."""
    base = StableDiffusionXLPipeline.from_pretrained(builtin_model_folder("tiny-sdxl", cache_dir))
    with torch.random.fork_rng():
        torch.manual_seed(3)
        unet = UNet2DConditionModel.from_config({**base.unet.config, "time_cond_proj_dim": 20})
        torch.nn.init.normal_(unet.time_embedding.cond_proj.weight, std=0.5)
    scheduler = LCMScheduler.from_config(base.scheduler.config)
    StableDiffusionXLPipeline(**{**base.components, "unet": unet, "scheduler": scheduler}).save_pretrained(
        tmp_path / "lcm-sdxl"
    )
    worker = cpu_worker(str(tmp_path / "lcm-sdxl"), cache_dir, tmp_path / "engines")
    assert worker.model.specs["unet"].input_names[-3:] == ["text_embeds", "time_ids", "timestep_cond"]
    payload = few_step(2, 7, guidance_scale=6.0, num_images=2)
    pipe = diffusers_pipe(StableDiffusionXLPipeline, worker)
    assert_same_images(generate(worker, payload), reference_images(pipe, worker, payload))


def test_an_lcm_distilled_unet_exports_its_guidance_embedding_for_onnxruntime(lcm_distilled, cache_dir, tmp_path):
    torch_worker, _ = lcm_distilled
    folder = str(torch_worker.model.folder)
    done = run_export(tmp_path, cache_dir, "--model", folder, "--components", "unet")
    assert done.returncode == 0, done.stderr[-3000:]
    settings = Settings(
        model=folder,
        cache_dir=cache_dir,
        engine_dir=tmp_path,
        device="cpu",
        component_backends={"unet": "onnxruntime"},
        backend="torch",
    )
    ort_worker = Worker(settings)
    payload = few_step(4, 41, guidance_scale=7.0, num_images=2)
    actual = ort_worker.handle({"id": "o", "input": payload})
    assert actual["metrics"]["backends"]["unet"] == "onnxruntime"
    expected = torch_worker.handle({"id": "t", "input": payload})
    assert_same_images(decoded(actual), decoded(expected))


def test_an_lcm_pipeline_folder_runs_with_its_pipeline_defaults(lcm_distilled, cache_dir, tmp_path):
    """A folder saved as diffusers' ``LatentConsistencyModelPipeline`` (as LCM checkpoints ship) loads, and a
    request without steps or guidance gets that pipeline's defaults: 4 steps, guidance 8.5."""
    base = StableDiffusionPipeline.from_pretrained(lcm_distilled[0].model.folder, safety_checker=None)
    folder = tmp_path / "lcm-pipeline"
    LatentConsistencyModelPipeline(
        **{**base.components, "safety_checker": None, "feature_extractor": None}, requires_safety_checker=False
    ).save_pretrained(folder)
    worker = cpu_worker(str(folder), cache_dir, tmp_path / "engines")
    payload = {"prompt": "a red fox", "width": 64, "height": 64, "seed": 3}
    request, _ = worker.resolve(payload)
    assert (request.steps, request.guidance_scale) == (4, 8.5)
    pipe = LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a red fox", width=64, height=64, generator=torch.Generator().manual_seed(3)).images
    assert_same_images(generate(worker, payload), [np.asarray(image, dtype=np.int16) for image in theirs])
