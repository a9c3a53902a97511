"""Start-up checks for RunPod's ``register_fitness_check``: a failing one replaces the worker.

Each check tests one thing and raises with a message that says what to fix.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

from engine.models.model import load_model
from engine.settings import Settings

GIB = 2**30


def gpu_visible(settings: Settings) -> None:
    if not settings.requires_gpu:
        return
    if not torch.cuda.is_available():
        raise RuntimeError(f"DEVICE={settings.device} but no CUDA GPU is visible to the worker")
    index = torch.device(settings.device).index or 0
    if index >= torch.cuda.device_count():
        raise RuntimeError(f"DEVICE={settings.device} but only {torch.cuda.device_count()} GPU(s) are visible")


def model_complete(settings: Settings) -> None:
    """The model folder exists and holds every file its family needs (load_model checks)."""
    load_model(settings.model, settings.cache_dir, settings.model_revision, settings.model_cache_dir)


def engine_store_readable(settings: Settings) -> None:
    root = settings.engine_dir
    if root.exists() and not root.is_dir():
        raise RuntimeError(f"ENGINE_DIR {root} is not a folder")
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    if existing is None or not os.access(existing, os.R_OK | os.X_OK):
        raise RuntimeError(f"ENGINE_DIR {root} cannot be read")


def enough_disk_and_memory(settings: Settings) -> None:
    for folder in {settings.cache_dir, settings.engine_dir}:
        existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
        free = shutil.disk_usage(existing).free / GIB
        if free < settings.min_free_disk_gb:
            raise RuntimeError(
                f"{existing} has {free:.1f} GiB free, below MIN_FREE_DISK_GB={settings.min_free_disk_gb}"
            )
    available = psutil.virtual_memory().available / GIB
    if available < settings.min_free_memory_gb:
        raise RuntimeError(
            f"{available:.1f} GiB of memory available, below MIN_FREE_MEMORY_GB={settings.min_free_memory_gb}"
        )


CHECKS: tuple[Callable[[Settings], None], ...] = (
    gpu_visible,
    model_complete,
    engine_store_readable,
    enough_disk_and_memory,
)
