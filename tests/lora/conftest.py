"""LoRA files for the tiny models, written once per module in both layouts."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from engine.models.model import load_model
from engine.serving.worker import Worker
from perf.lora_files import write_lora

PIPELINES = {"tiny": StableDiffusionPipeline, "tiny-sdxl": StableDiffusionXLPipeline}
PAYLOAD = {"prompt": "a red fox in the snow", "seed": 5, "num_inference_steps": 4, "width": 64, "height": 64}


def reference_pipeline(model: str, cache_dir: Path):
    folder = load_model(model, cache_dir).folder
    extra = {"safety_checker": None} if model == "tiny" else {}
    pipe = PIPELINES[model].from_pretrained(folder, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_loras(model: str, cache_dir: Path, folder: Path) -> Path:
    """a: PEFT layout, rank 4, no alpha; b: kohya layout, rank 2, alpha 1; c: kohya, rank 8, alpha 16,
    UNet only."""
    loaded = load_model(model, cache_dir)
    every = ["unet", *loaded.family.text_encoders]
    write_lora(loaded, folder / "a.safetensors", "peft", seed=1, rank=4, components=every)
    write_lora(loaded, folder / "styles" / "b.safetensors", "kohya", seed=2, rank=2, alpha=1, components=every)
    write_lora(loaded, folder / "c.safetensors", "kohya", seed=3, rank=8, alpha=16, components=["unet"])
    return folder


@pytest.fixture(scope="session")
def sd_loras(cache_dir, tmp_path_factory) -> Path:
    return write_loras("tiny", cache_dir, tmp_path_factory.mktemp("loras-sd"))


@pytest.fixture(scope="session")
def sdxl_loras(cache_dir, tmp_path_factory) -> Path:
    return write_loras("tiny-sdxl", cache_dir, tmp_path_factory.mktemp("loras-sdxl"))


def image_of(response: dict) -> np.ndarray:
    assert response["status"] == "success", response
    data = base64.b64decode(response["output"][0]["image"])
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)


def make_worker(model, cache_dir, engine_dir, lora_dir, backend) -> Worker:
    """A CPU worker for ``model`` on ``backend`` with LoRAs from ``lora_dir`` (onnxruntime without a torch
    fallback, so a LoRA it cannot apply fails the test)."""
    from engine.settings import Settings

    return Worker(
        Settings(
            model=model,
            cache_dir=cache_dir,
            engine_dir=engine_dir,
            lora_dir=lora_dir,
            device="cpu",
            backend=backend,
            torch_fallback="off" if backend == "onnxruntime" else "lazy",
        )
    )
