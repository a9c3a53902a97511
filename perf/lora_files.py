"""LoRA files for any model folder, written the way trainers write them, with random factors.

    python -m perf.lora_files MODEL FOLDER   # writes a.safetensors (PEFT) and b.safetensors (kohya)

Two layouts: diffusers/PEFT (``unet.<module>.lora_A.weight``, the text encoders under
``text_model.`` as released checkpoints name them, no alpha) and kohya/A1111
(``lora_unet_<module_with_underscores>.lora_down.weight`` with ``.alpha``; ``lora_te_``
for SD's text encoder, ``lora_te1_``/``lora_te2_`` for SDXL's). The targets are what
trainers target by default: the UNet's attention projections and the text encoders'
attention and MLP layers. Names and shapes come from the model's configs (nothing is
loaded), so a full-size model takes no time. Used by the LoRA benchmark and the tests.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.lora.factors import TEXT_MODEL
from engine.models.model import Model, load_model
from engine.settings import load_settings

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1")


def _kohya_prefix(component: str, text_encoders: Sequence[str]) -> str:
    if component == "unet":
        return "lora_unet"
    if len(text_encoders) == 1:
        return "lora_te"
    return f"lora_te{text_encoders.index(component) + 1}"


def write_lora(
    model: Model,
    path: Path,
    layout: str,
    seed: int,
    rank: int = 4,
    alpha: float | None = None,
    components: Sequence[str] = ("unet", "text_encoder"),
    magnitude: float = 0.3,
) -> Path:
    """A LoRA for ``components`` of ``model`` in ``layout`` (``peft`` or ``kohya``); ``alpha`` only in kohya's."""
    generator = torch.Generator().manual_seed(seed)
    targets = model.family.lora_targets
    tensors = {}
    for component in components:
        target = targets[component]
        wanted = UNET_TARGETS if target.is_unet else TEXT_TARGETS
        shapes = model.parameter_shapes[component]
        for name, shape in shapes.items():
            module = name.removeprefix(target.module_prefix).removesuffix(".weight")
            if len(shape) != 2 or not name.endswith(".weight") or not module.endswith(wanted):
                continue
            if not target.is_unet and not module.startswith(TEXT_MODEL):
                module = TEXT_MODEL + module  # transformers 5 dropped the level checkpoints still name
            out_features, in_features = shape
            down = torch.randn(rank, in_features, generator=generator) * magnitude / in_features**0.5
            up = torch.randn(out_features, rank, generator=generator) * magnitude
            if layout == "peft":
                key = f"{target.prefix}.{module}"
                tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down, up
            else:
                key = f"{_kohya_prefix(component, model.family.text_encoders)}_{module.replace('.', '_')}"
                tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
                tensors[f"{key}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def write_pair(model: Model, folder: Path, rank: int = 16) -> list[Path]:
    """Two LoRAs touching the UNet and every text encoder: ``a`` (PEFT) and ``b`` (kohya, alpha rank/2)."""
    components = ["unet", *model.family.text_encoders]
    return [
        write_lora(model, folder / "a.safetensors", "peft", seed=1, rank=rank, components=components),
        write_lora(model, folder / "b.safetensors", "kohya", seed=2, rank=rank, alpha=rank / 2, components=components),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.lora_files", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a built-in name or a diffusers folder")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    model = load_model(args.model, load_settings().cache_dir)
    for path in write_pair(model, args.folder, args.rank):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
