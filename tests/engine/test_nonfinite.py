"""NaN and Inf never come back as an image: the component that made them runs again on an fp32 runner,
or the request fails saying so, and the worker serves on.

onnxruntime and TensorRT do not overflow on demand, so a runner that runs the real torch runner and
then puts one NaN (or Inf) into its outputs stands in for one that does. The fp16 VAE's overflow is
real: the tiny model's torch VAE in fp16 (which this CPU's torch runs) turns very large latents into
NaN where the fp32 one does not; on a GPU the same test runs on the worker's own fp16 chains.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
import torch

from engine.backends.assemble import build_chains
from engine.backends.base import Runner
from engine.backends.chain import RunnerChain
from engine.backends.torch import LazyTorchRunner
from engine.models.builtin import builtin_model_folder
from engine.serving.worker import Worker
from engine.store.store import Store
from tests.export.test_export import images_of
from tests.parity import picture, to_base64
from tests.test_controlnet import make_controlnet

REQUEST = {"prompt": "a red fox", "width": 64, "height": 64, "num_inference_steps": 3, "seed": 5, "num_images": 2}
IMAGE = to_base64(picture(64, 64))
MASK = to_base64(picture(64, 64, seed=1).convert("L"))


class PoisonedRunner(Runner):
    """Runs another runner, then puts ``value`` into the first element of each of its outputs."""

    def __init__(self, wrapped: Runner, backend: str = "onnxruntime", precision: str | None = None, value=np.nan):
        super().__init__(wrapped.spec, precision or wrapped.precision, wrapped.device)
        self.backend = backend
        self.wrapped = wrapped
        self.value = value
        self.calls = 0

    def apply_patch(self, patch) -> None:
        self.wrapped.apply_patch(patch)

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.calls += 1
        outputs = {name: value.contiguous().clone() for name, value in self.wrapped(inputs).items()}
        for value in outputs.values():
            value.view(-1)[0] = self.value
        return outputs


class LoudRunner(Runner):
    """A denoiser whose predictions are scaled far up, as an overflow-prone LoRA makes them: the final
    latents are huge but finite in the loop's fp32."""

    backend = "torch"

    def __init__(self, wrapped: Runner, scale: float):
        super().__init__(wrapped.spec, wrapped.precision, wrapped.device)
        self.wrapped = wrapped
        self.scale = scale

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: value.float() * self.scale for name, value in self.wrapped(inputs).items()}


@pytest.fixture
def worker(make_settings) -> Worker:
    return Worker(make_settings(backend="torch"))


def poison(worker: Worker, component: str, **options) -> PoisonedRunner:
    chain = worker.chains[component]
    poisoned = PoisonedRunner(chain.runners[0], **options)
    chain.runners.insert(0, poisoned)
    return poisoned


@pytest.mark.parametrize(
    ("component", "extra"),
    [
        ("text_encoder", {}),
        ("unet", {"scheduler": "euler_a"}),  # the rerun draws the same noise at every step
        ("vae_decoder", {}),
        ("vae_encoder", {"image": IMAGE, "strength": 0.7, "scheduler": "euler_a"}),
        ("vae_encoder", {"image": IMAGE, "mask": MASK, "strength": 0.8, "scheduler": "euler_a"}),
    ],
)
def test_a_nan_is_rerun_on_the_next_fp32_runner_and_the_image_is_a_sound_runs(worker, component, extra):
    payload = {**REQUEST, **extra}
    expected = worker.handle({"id": "clean", "input": payload})
    poisoned = poison(worker, component)

    response = worker.handle({"id": "nan", "input": payload})
    assert response["status"] == "success", response
    assert poisoned.calls > 0
    metrics = response["metrics"]
    assert metrics["fallbacks"][component] == "onnxruntime fp32: produced NaN/Inf; reran on torch fp32"
    assert metrics["backends"][component] == "onnxruntime, torch"
    for mine, reference in zip(images_of(response), images_of(expected), strict=True):
        assert np.array_equal(mine, reference)


def test_a_nan_from_a_controlnet_reruns_the_controlnet(make_settings, cache_dir, tmp_path):
    """Its residuals make the UNet's output NaN; the ControlNet moves (the UNet has no fp32 runner left
    on the CPU and stays), and the image is a sound run's."""
    make_controlnet(builtin_model_folder("tiny", cache_dir), tmp_path / "controlnets" / "edges", seed=1)
    worker = Worker(make_settings(backend="torch", controlnet_dir=tmp_path / "controlnets"))
    payload = {**REQUEST, "controlnets": [{"name": "edges", "image": IMAGE}], "scheduler": "euler_a"}
    expected = worker.handle({"id": "clean", "input": payload})
    poison(worker, "controlnet.edges")
    response = worker.handle({"id": "nan", "input": payload})
    assert response["metrics"]["fallbacks"] == {
        "controlnet.edges": "onnxruntime fp32: produced NaN/Inf; reran on torch fp32"
    }
    for mine, reference in zip(images_of(response), images_of(expected), strict=True):
        assert np.array_equal(mine, reference)


def test_an_inf_from_the_denoiser_is_caught_too(worker):
    expected = worker.handle({"id": "clean", "input": REQUEST})
    poison(worker, "unet", value=np.inf)
    response = worker.handle({"id": "inf", "input": REQUEST})
    assert "produced NaN/Inf" in response["metrics"]["fallbacks"]["unet"]
    for mine, reference in zip(images_of(response), images_of(expected), strict=True):
        assert np.array_equal(mine, reference)


def test_when_every_runner_gives_nan_the_request_fails_clearly_and_the_worker_serves_on(worker):
    expected = worker.handle({"id": "clean", "input": REQUEST})
    chain = worker.chains["vae_decoder"]
    original = list(chain.runners)
    first = poison(worker, "vae_decoder")
    chain.runners[1] = last = PoisonedRunner(original[0], backend="torch")

    response = worker.handle({"id": "nan", "input": REQUEST})
    assert response == {
        "status": "error",
        "error": "the model produced NaN/Inf values (vae_decoder on torch fp32); try another seed, LoRA or scale",
        "request_id": "nan",
    }
    assert first.calls == 1 and last.calls == 1

    chain.runners[:] = original
    after = worker.handle({"id": "after", "input": REQUEST})
    for mine, reference in zip(images_of(after), images_of(expected), strict=True):
        assert np.array_equal(mine, reference)


def test_a_nan_does_not_count_as_the_runner_failing_and_a_rerun_lasts_for_its_request(worker):
    """Non-finite outputs are the request's doing: however many come, the runner stays in its chain, and
    each request tries it first again."""
    poisoned = poison(worker, "unet")
    for index in range(4):
        assert worker.handle({"id": str(index), "input": {**REQUEST, "scheduler": "euler"}})["status"] == "success"
    assert poisoned in worker.chains["unet"].runners
    assert poisoned.calls == 4 * REQUEST["num_inference_steps"], "each request, every step: checked at the end"


def test_fp16_vae_chains_keep_an_fp32_torch_vae_aside_and_others_none(model, make_settings, tmp_path):
    settings = make_settings(backend="torch")
    store = Store(tmp_path / "engines")
    cpu = torch.device("cpu")
    half, _ = build_chains(model, settings, store, cpu, "fp16")
    full, _ = build_chains(model, settings, store, cpu, "fp32")
    for component, chain in half.items():
        if component not in ("vae_decoder", "vae_encoder"):
            assert chain.fp32_standby is None, f"{component}: an fp32 copy would hold the GPU for good"
            continue
        assert isinstance(chain.fp32_standby, LazyTorchRunner) and chain.fp32_standby.precision == "fp32", component
        assert not chain.fp32_standby.loaded, "loaded on first use only"
    assert all(chain.fp32_standby is None for chain in full.values())
    off, _ = build_chains(model, make_settings(backend="onnxruntime", torch_fallback="off"), store, cpu, "fp16")
    assert all(chain.fp32_standby is None for chain in off.values()), "TORCH_FALLBACK=off loads no torch weights"


def test_a_rerun_skips_runners_that_do_not_compute_in_fp32(worker):
    """A GPU's chain: an fp16 engine, then fp16 torch; the rerun goes past fp16 torch to the fp32 standby."""
    chain = worker.chains["vae_decoder"]
    torch_fp32 = chain.runners[0]
    engine = PoisonedRunner(torch_fp32, backend="tensorrt", precision="fp16")
    torch_fp16 = PoisonedRunner(torch_fp32, backend="torch", precision="fp16")
    worker.chains["vae_decoder"] = RunnerChain("vae_decoder", [engine, torch_fp16], fp32_standby=torch_fp32)
    response = worker.handle({"id": "a", "input": REQUEST})
    assert response["metrics"]["fallbacks"]["vae_decoder"] == "tensorrt fp16: produced NaN/Inf; reran on torch fp32"
    assert response["metrics"]["precisions"]["vae_decoder"] == "fp16, fp32"
    assert engine.calls == 1 and torch_fp16.calls == 0


def loud_request(worker: Worker, scale: float) -> dict:
    """A request whose denoiser's predictions are ``scale`` times too large."""
    chain = worker.chains["unet"]
    loud = LoudRunner(chain.runners[-1], scale)
    chain.runners.insert(0, loud)
    try:
        return worker.handle({"id": "loud", "input": {**REQUEST, "scheduler": "euler"}})
    finally:
        chain.runners.remove(loud)


def test_an_fp16_vae_overflow_is_rerun_on_an_fp32_vae(worker, make_settings, tmp_path):
    """Real overflow: latents of about 1e5 are finite in fp32 and infinite in fp16, and the tiny VAE in
    fp16 decodes them to NaN; the fp32 standby decodes them to the fp32 VAE's image."""
    expected = loud_request(worker, 1e6)
    assert "vae_decoder" not in expected["metrics"]["fallbacks"]
    half, _ = build_chains(
        worker.model, worker.settings, Store(tmp_path / "e"), worker.device, "fp16", components=["vae_decoder"]
    )
    worker.chains["vae_decoder"] = half["vae_decoder"]
    response = loud_request(worker, 1e6)
    assert response["metrics"]["fallbacks"]["vae_decoder"] == "torch fp16: produced NaN/Inf; reran on torch fp32"
    for mine, reference in zip(images_of(response), images_of(expected), strict=True):
        assert np.array_equal(mine, reference)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the worker's fp16 chains run only there")
def test_on_a_gpu_the_fp16_vae_overflow_is_rerun_in_fp32(make_settings):
    worker = Worker(make_settings(device="cuda", backend="torch"))
    assert worker.precision == "fp16"
    chain = worker.chains["vae_decoder"]
    assert chain.runners[-1].precision == "fp16" and chain.fp32_standby is not None
    latent = torch.full((1, 4, 8, 8), 1e5, device=worker.device)
    with torch.inference_mode():
        assert not torch.isfinite(chain.runners[-1]({"latent": latent})["images"]).all()
    response = loud_request(worker, 1e6)
    assert response["status"] == "success", response
    assert response["metrics"]["fallbacks"]["vae_decoder"] == "torch fp16: produced NaN/Inf; reran on torch fp32"
    assert response["metrics"]["precisions"]["vae_decoder"] == "fp16, fp32"
    assert all(image.std() > 0 for image in images_of(response)), "an image, not a black square"
