"""A TCD-LoRA through the per-request ``loras`` path with ``scheduler: tcd``, against diffusers' TCD recipe.

TCD-LoRA files (h1t's TCD-SD15-LoRA and TCD-SDXL-LoRA) are written by diffusers' LoRA training scripts:
``convert_state_dict_to_diffusers`` keys under ``unet.`` (``<module>.lora.down.weight`` and
``lora.up.weight``, no alpha), on the attention projections, feed-forwards, resnet convolutions
(3x3 down factors) and time projections. The file here has that layout with random weights; the
reference is diffusers' ``load_lora_weights`` with ``TCDScheduler.from_config`` and the request's ``eta``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import TCDScheduler, UNet2DConditionModel
from safetensors.torch import save_file

from engine.models.model import load_model
from tests.lora.conftest import PAYLOAD, image_of, make_worker, reference_pipeline
from tests.parity import TOLERANCE

TCD_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)
"""The modules diffusers' consistency-distillation LoRA scripts target (``lora_target_modules``)."""
BACKENDS = ("torch", "onnxruntime")


def write_tcd_lora(model: str, cache_dir: Path, path: Path, rank: int = 4, seed: int = 0) -> Path:
    """A TCD-LoRA for ``model``'s UNet in diffusers' key layout, random factors; convolutions get a down
    factor with the layer's kernel and a 1x1 up factor, as PEFT's ``Conv2d`` LoRA has them."""
    unet = UNet2DConditionModel.from_pretrained(load_model(model, cache_dir).folder, subfolder="unet")
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in unet.named_modules():
        if not name.endswith(TCD_TARGETS) or not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            continue
        out_features, in_features, *kernel = module.weight.shape
        fan_in = in_features * math.prod(kernel)
        down = torch.randn(rank, in_features, *kernel, generator=generator) * 0.3 / fan_in**0.5
        up = torch.randn(out_features, rank, *([1, 1] if kernel else []), generator=generator) * 0.3
        tensors[f"unet.{name}.lora.down.weight"], tensors[f"unet.{name}.lora.up.weight"] = down, up
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module", params=["tiny", "tiny-sdxl"])
def tcd(request, cache_dir, tmp_path_factory):
    model = request.param
    folder = tmp_path_factory.mktemp(f"tcd-{model}")
    file = write_tcd_lora(model, cache_dir, folder / "tcd-lora.safetensors")
    exported = request.getfixturevalue("exported" if model == "tiny" else "exported_sdxl")
    workers = {backend: make_worker(model, cache_dir, exported, folder, backend) for backend in BACKENDS}
    return model, file, workers


def diffusers_tcd(model: str, cache_dir: Path, file: Path | None, steps: int, guidance: float, eta: float):
    """diffusers' TCD-LoRA recipe: ``load_lora_weights``, ``TCDScheduler.from_config``, the call's ``eta``."""
    pipe = reference_pipeline(model, cache_dir)
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    if file is not None:
        pipe.load_lora_weights(str(file))
    image = pipe(
        PAYLOAD["prompt"],
        num_inference_steps=steps,
        guidance_scale=guidance,
        eta=eta,
        width=PAYLOAD["width"],
        height=PAYLOAD["height"],
        generator=torch.Generator().manual_seed(PAYLOAD["seed"]),
    ).images[0]
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize(("steps", "guidance", "eta"), [(4, 0.0, None), (8, 2.0, 0.6)])
def test_a_tcd_lora_request_matches_diffusers_tcd_recipe(tcd, cache_dir, steps, guidance, eta):
    model, file, workers = tcd
    reference = diffusers_tcd(model, cache_dir, file, steps, guidance, 0.3 if eta is None else eta)
    without = diffusers_tcd(model, cache_dir, None, steps, guidance, 0.3 if eta is None else eta)
    assert np.abs(reference - without).max() > 4 * TOLERANCE, "the LoRA must change the image for the test to mean much"
    payload = {**PAYLOAD, "num_inference_steps": steps, "guidance_scale": guidance, "scheduler": "TCD"}
    payload |= {"loras": [{"name": "tcd-lora"}]} | ({} if eta is None else {"eta": eta})
    for backend, worker in workers.items():
        response = worker.handle({"input": payload})
        assert set(response["metrics"]["backends"].values()) == {backend}, response["metrics"]["fallbacks"]
        assert [entry["name"] for entry in response["metrics"]["loras"]] == ["tcd-lora"]
        difference = np.abs(image_of(response) - reference).max()
        assert difference <= TOLERANCE, f"{backend}: {difference}/255 from diffusers"
