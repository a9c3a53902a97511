"""Tiny IP-Adapter files for the tiny models (``perf.ip_adapter_files``), written once per session."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from engine.models.model import load_model
from perf.ip_adapter_files import write_adapter as perf_adapter
from perf.ip_adapter_files import write_adapters as perf_adapters
from perf.lora_files import write_lora


def write_adapters(model: str, cache_dir: Path, root: Path) -> Path:
    """perf's adapters (``models/plain``, ``models/plus``, ``models/plain-b`` and their encoder), and a UNet
    LoRA, ``loras/c``, to go with them."""
    loaded = load_model(model, cache_dir)
    write_lora(loaded, root / "loras" / "c.safetensors", "kohya", seed=3, rank=8, alpha=16)
    return perf_adapters(loaded, root)


def write_adapter(model: str, cache_dir: Path, path: Path, kind: str, seed: int) -> Path:
    return perf_adapter(load_model(model, cache_dir), path, kind, seed)


@pytest.fixture(scope="session")
def sd_adapters(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_adapters("tiny", cache_dir, tmp_path_factory.mktemp("ip-sd"))


@pytest.fixture(scope="session")
def sdxl_adapters(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_adapters("tiny-sdxl", cache_dir, tmp_path_factory.mktemp("ip-sdxl"))


def image_prompt(seed: int = 0, size: int = 80) -> Image.Image:
    """A smooth random picture, not square, so CLIP's resize and center crop both act."""
    generator = torch.Generator().manual_seed(seed)
    small = (torch.rand(3, 5, 7, generator=generator) * 255).to(torch.uint8)
    return Image.fromarray(small.permute(1, 2, 0).numpy()).resize((size + 16, size), Image.BICUBIC)


def to_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def load_adapters(pipe: Any, root: Path, subfolder: str, names: str | list[str], scale: Any) -> Any:
    """diffusers' pipeline with IP-Adapters loaded as a user loads them (one name, or a list of them), at
    ``scale`` (what ``set_ip_adapter_scale`` takes). ``load_ip_adapter`` sets up CLIP's processor at the
    encoder's size only where the pipeline has no feature extractor of its own, so that goes first."""
    pipe.set_progress_bar_config(disable=True)
    pipe.feature_extractor = None
    files = [f"{name}.safetensors" for name in names] if isinstance(names, list) else f"{names}.safetensors"
    pipe.load_ip_adapter(str(root), subfolder=subfolder, weight_name=files)
    pipe.set_ip_adapter_scale(scale)
    return pipe
