"""Tiny SD and SDXL workers on torch, each with diffusers' pipeline for the same folder."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from engine.backends.chain import ChainCalls
from engine.models.family import PromptBatch
from engine.serving.worker import Worker
from engine.settings import Settings


def make(model: str, cls, cache_dir, engine_dir):
    worker = Worker(Settings(model=model, cache_dir=cache_dir, engine_dir=engine_dir, device="cpu", backend="torch"))
    pipe = cls.from_pretrained(
        worker.model.folder, **({"safety_checker": None} if cls is StableDiffusionPipeline else {})
    )
    return worker, pipe


@pytest.fixture(scope="session")
def sd(cache_dir, tmp_path_factory):
    return make("tiny", StableDiffusionPipeline, cache_dir, tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="session")
def sdxl(cache_dir, tmp_path_factory):
    return make("tiny-sdxl", StableDiffusionXLPipeline, cache_dir, tmp_path_factory.mktemp("sdxl"))


def conditioning(worker: Worker, prompt: str, negative: str | None = None, syntax: str = "a1111") -> dict:
    calls = ChainCalls(worker.chains)
    batch = PromptBatch([prompt], None if negative is None else [negative], 1, True, 64, 64, syntax)
    with torch.no_grad():
        return worker.model.family.encode_prompt(
            lambda component, inputs: calls[component](inputs), worker.model.tokenizers, batch, worker.model.config
        )
