"""Fingerprints of a component's weights and config, the part of an artifact key that follows the model.

A component's fingerprint covers every file of the model subfolder it is built from
(config and weights), so swapping the VAE rebuilds the VAE artifacts and nothing else.
Weight files are hashed in full (a merged LoRA changes a few tensors of an
unchanged-size file), once per file version thanks to the store's digest memo.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.models.model import Model


def folder_fingerprint(folder: Path, file_digest: Callable[[Path], str], salt: str = "") -> str:
    """Every file of ``folder``, or ``folder`` alone where it is one file (an IP-Adapter's projection)."""
    digest = hashlib.sha256(salt.encode())
    if folder.is_file():
        digest.update(f"{folder.name}\0{file_digest(folder)}\n".encode())
        return digest.hexdigest()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{path.relative_to(folder)}\0{file_digest(path)}\n".encode())
    return digest.hexdigest()


def component_fingerprint(model: Model, component: str, file_digest: Callable[[Path], str]) -> str:
    return folder_fingerprint(model.component_folder(component), file_digest, salt=f"{model.family.name}/{component}")
