"""Random IP-Adapter files for a model, in the layout diffusers' ``load_ip_adapter`` reads (the IP-Adapter
repository's keys), with a small CLIP vision encoder beside them: for the tests and ``perf.ip_adapter``.

    python -m perf.ip_adapter_files MODEL DIR    # DIR/models/{plain,plus,plain-b}.safetensors, DIR/models/image_encoder
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.models.model import Model, load_model
from engine.settings import load_settings

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


def _attention_shapes(model: Model) -> list[tuple[int, int]]:
    """The shape of each cross-attention layer's to_k, in the order diffusers numbers an adapter's layers."""
    unet = model.torch_module("unet", torch.float32, weights=False).unet
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


def write_adapter(model: Model, path: Path, kind: str, seed: int, encoder: Mapping[str, int] = ENCODER) -> Path:
    """A random IP-Adapter for ``model``: ``plain`` (ImageProjection, 4 tokens), ``plus`` (the resampler, 16)
    or ``full`` (Full Face: one token per hidden state of the encoder), its projection reading the widths of
    the CLIP vision ``encoder`` config it goes with."""
    generator = torch.Generator().manual_seed(seed)
    shapes = _attention_shapes(model)
    cross = shapes[0][1]

    def random(*shape: int, std: float = 0.2) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * std

    if kind == "plain":
        embed = encoder["projection_dim"]
        projection = {
            "proj.weight": random(4 * cross, embed),
            "proj.bias": random(4 * cross),
            "norm.weight": 1 + random(cross, std=0.1),
            "norm.bias": random(cross, std=0.1),
        }
    elif kind == "full":  # Full Face: a feed-forward on each hidden state, then a norm
        hidden_size = encoder["hidden_size"]
        projection = {
            "proj.0.weight": random(hidden_size, hidden_size),
            "proj.0.bias": random(hidden_size),
            "proj.2.weight": random(cross, hidden_size),
            "proj.2.bias": random(cross),
            "proj.3.weight": 1 + random(cross, std=0.1),
            "proj.3.bias": random(cross, std=0.1),
        }
    else:
        projection = plus_projection_state(cross, encoder["hidden_size"], generator)
    layers = {}
    for index, (hidden, width) in enumerate(shapes):
        layers[f"{2 * index + 1}.to_k_ip.weight"] = random(hidden, width, std=0.3)
        layers[f"{2 * index + 1}.to_v_ip.weight"] = random(hidden, width, std=0.3)
    tensors = {f"image_proj.{k}": v.contiguous() for k, v in projection.items()}
    tensors |= {f"ip_adapter.{k}": v.contiguous() for k, v in layers.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def write_adapters(model: Model, root: Path) -> Path:
    """``models/plain``, ``models/plus``, ``models/plain-b`` (another plain one) and ``models/full-face``, with
    ``models/image_encoder/`` beside them, as h94/IP-Adapter's ``models/`` folder holds them."""
    write_image_encoder(root / "models" / "image_encoder")
    write_adapter(model, root / "models" / "plain.safetensors", "plain", seed=1)
    write_adapter(model, root / "models" / "plus.safetensors", "plus", seed=2)
    write_adapter(model, root / "models" / "plain-b.safetensors", "plain", seed=3)
    write_adapter(model, root / "models" / "full-face.safetensors", "full", seed=4)
    return root


def main(argv: list[str] | None = None) -> int:
    name, folder = (argv if argv is not None else sys.argv[1:])[:2]
    settings = load_settings(model=name)
    write_adapters(load_model(settings.model, settings.cache_dir), Path(folder))
    print(f"IP-Adapters for {name} in {folder}/models")
    return 0


if __name__ == "__main__":
    sys.exit(main())
