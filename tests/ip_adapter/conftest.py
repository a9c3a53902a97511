"""Tiny IP-Adapter files for the tiny models: random weights in the layout diffusers' ``load_ip_adapter``
reads (the IP-Adapter repository's keys), with a tiny CLIP vision encoder beside them."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engine.models.model import load_model

ENCODER = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "projection_dim": 24,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
}
"""A CLIP vision encoder at the tiny models' scale: 17 hidden states of width 32, image embeds of 24."""
PLUS_TOKENS = 16
PLUS_WIDTH = 64
"""The Plus resampler's width: diffusers' converter reads one head per 64 channels."""


def write_image_encoder(folder: Path, seed: int = 0) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**ENCODER)).eval().save_pretrained(folder)
    return folder


def _attention_shapes(model: str, cache_dir: Path) -> list[tuple[int, int]]:
    """The shape of each cross-attention layer's to_k, in the order diffusers numbers an adapter's layers."""
    unet = load_model(model, cache_dir).torch_module("unet", torch.float32, weights=False).unet
    names = [name for name in unet.attn_processors if not name.endswith("attn1.processor")]
    modules = dict(unet.named_modules())
    return [tuple(modules[name.removesuffix(".processor")].to_k.weight.shape) for name in names]


def plus_projection_state(cross: int, embed: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random Plus resampler (four blocks, as the IP-Adapter repository's) under the repository's keys."""
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    module = IPAdapterPlusImageProjection(
        embed_dims=embed, output_dims=cross, hidden_dims=PLUS_WIDTH, heads=PLUS_WIDTH // 64, num_queries=PLUS_TOKENS
    )
    state = {}
    for key, value in module.state_dict().items():
        parts = key.split(".")
        if parts[0] != "layers":
            state[key] = value
            continue
        block, rest = parts[1], ".".join(parts[2:])
        renamed = {
            "ln0.weight": "0.norm1.weight",
            "ln0.bias": "0.norm1.bias",
            "ln1.weight": "0.norm2.weight",
            "ln1.bias": "0.norm2.bias",
            "attn.to_q.weight": "0.to_q.weight",
            "attn.to_out.0.weight": "0.to_out.weight",
            "ff.0.weight": "1.0.weight",
            "ff.0.bias": "1.0.bias",
            "ff.1.net.0.proj.weight": "1.1.weight",
            "ff.1.net.2.weight": "1.3.weight",
        }
        if rest in renamed:
            state[f"layers.{block}.{renamed[rest]}"] = value
    for block in range(len(module.layers)):
        attention = module.layers[block].attn
        state[f"layers.{block}.0.to_kv.weight"] = torch.cat([attention.to_k.weight, attention.to_v.weight]).detach()
    return state


def write_adapter(model: str, cache_dir: Path, path: Path, kind: str, seed: int) -> Path:
    """A random IP-Adapter for ``model``: ``plain`` (ImageProjection, 4 tokens) or ``plus`` (the resampler)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = _attention_shapes(model, cache_dir)
    cross = shapes[0][1]

    def random(*shape: int, std: float = 0.2) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * std

    if kind == "plain":
        embed = ENCODER["projection_dim"]
        projection = {
            "proj.weight": random(4 * cross, embed),
            "proj.bias": random(4 * cross),
            "norm.weight": 1 + random(cross, std=0.1),
            "norm.bias": random(cross, std=0.1),
        }
    else:
        projection = plus_projection_state(cross, ENCODER["hidden_size"], generator)
    layers = {}
    for index, (hidden, width) in enumerate(shapes):
        layers[f"{2 * index + 1}.to_k_ip.weight"] = random(hidden, width, std=0.3)
        layers[f"{2 * index + 1}.to_v_ip.weight"] = random(hidden, width, std=0.3)
    tensors = {f"image_proj.{k}": v.contiguous() for k, v in projection.items()}
    tensors |= {f"ip_adapter.{k}": v.contiguous() for k, v in layers.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def write_adapters(model: str, cache_dir: Path, root: Path) -> Path:
    """``models/plain``, ``models/plus`` and ``models/plain-b`` (another plain one), with
    ``models/image_encoder/`` beside them, as h94/IP-Adapter's ``models/`` folder holds them; and a
    UNet LoRA, ``loras/c``, to go with them."""
    from perf.lora_files import write_lora

    write_lora(load_model(model, cache_dir), root / "loras" / "c.safetensors", "kohya", seed=3, rank=8, alpha=16)
    write_image_encoder(root / "models" / "image_encoder")
    write_adapter(model, cache_dir, root / "models" / "plain.safetensors", "plain", seed=1)
    write_adapter(model, cache_dir, root / "models" / "plus.safetensors", "plus", seed=2)
    write_adapter(model, cache_dir, root / "models" / "plain-b.safetensors", "plain", seed=3)
    return root


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
