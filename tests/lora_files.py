"""LoRA files written the way trainers write them, for models built from configs.

Two layouts: diffusers/PEFT (``unet.<module>.lora_A.weight``, the text encoders under
``text_model.`` as real checkpoints have them, no alpha) and kohya/A1111
(``lora_unet_<module_with_underscores>.lora_down.weight`` with ``.alpha``; ``lora_te_``
for SD's text encoder, ``lora_te1_``/``lora_te2_`` for SDXL's). The factors are random
from a seed, at the given rank, so each file changes the image visibly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1")
KOHYA_TEXT_PREFIXES = {"text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
SDXL_KOHYA_TEXT_PREFIXES = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def _linear_layers(module: torch.nn.Module, targets: Sequence[str]) -> list[tuple[str, torch.nn.Linear]]:
    return [
        (name, layer)
        for name, layer in module.named_modules()
        if isinstance(layer, torch.nn.Linear) and name.endswith(tuple(targets))
    ]


def _modules(pipe, text_encoders: Sequence[str]) -> list[tuple[str, str, torch.nn.Module, Sequence[str]]]:
    """(component, name prefix the file uses, module, target layer names) for each part of the file.

    Checkpoints name CLIP's layers under ``text_model.``; transformers 5 drops that level from
    ``CLIPTextModel`` (not from ``CLIPTextModelWithProjection``), so it is added where missing.
    """
    parts = [("unet", "", pipe.unet, UNET_TARGETS)]
    for name in text_encoders:
        module = getattr(pipe, name)
        parts.append((name, "" if hasattr(module, "text_model") else "text_model.", module, TEXT_TARGETS))
    return parts


def write_lora(
    pipe,
    path: Path,
    layout: str,
    seed: int,
    rank: int = 4,
    alpha: float | None = None,
    text_encoders: Sequence[str] = ("text_encoder",),
    magnitude: float = 0.3,
) -> Path:
    """A LoRA for ``pipe``'s UNet attention and the named text encoders, in ``layout`` (peft or kohya)."""
    generator = torch.Generator().manual_seed(seed)
    kohya_text = SDXL_KOHYA_TEXT_PREFIXES if "text_encoder_2" in text_encoders else KOHYA_TEXT_PREFIXES
    tensors = {}
    for component, inner_prefix, module, targets in _modules(pipe, text_encoders):
        for name, layer in _linear_layers(module, targets):
            down = torch.randn(rank, layer.in_features, generator=generator) * magnitude / layer.in_features**0.5
            up = torch.randn(layer.out_features, rank, generator=generator) * magnitude
            if layout == "peft":
                key = f"{component}.{inner_prefix}{name}"
                tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = down, up
            else:
                prefix = "lora_unet" if component == "unet" else kohya_text[component]
                key = f"{prefix}_{(inner_prefix + name).replace('.', '_')}"
                tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
                tensors[f"{key}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
