"""`python -m perf.verify` (make verify-gpu): the whole chain on a GPU, in one command.

Exports and builds every engine for the configured model, loads the worker with each
backend, generates the same images, checks TensorRT's against PyTorch's, and prints the
latency table with the TensorRT/PyTorch speedup. Exits non-zero if any step fails.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from engine.common.cli import run_command
from engine.common.logs import configure_logging
from engine.serving.worker import Worker
from engine.settings import Backend, Settings, load_settings
from export import __main__ as export_main
from perf import __main__ as perf_main

MIN_PSNR_DB = 24.0
MAX_MEAN_ABS = 8 / 255
"""TensorRT and PyTorch run fp16 kernels that round differently, and the differences
compound over the denoising steps: images agree in content, not to the last bit."""


@dataclass(frozen=True)
class ImageDiff:
    psnr_db: float
    mean_abs: float

    @property
    def passed(self) -> bool:
        return self.psnr_db >= MIN_PSNR_DB and self.mean_abs <= MAX_MEAN_ABS


def decode(item: dict) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(item["image"]))).convert("RGB")
    return np.asarray(image, dtype=np.float64) / 255.0


def compare_images(candidate: np.ndarray, reference: np.ndarray) -> ImageDiff:
    mse = float(np.mean((candidate - reference) ** 2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)
    return ImageDiff(psnr_db=round(psnr, 2), mean_abs=round(float(np.mean(np.abs(candidate - reference))), 4))


def generate(settings: Settings, backend: Backend, request: dict) -> tuple[list[np.ndarray], dict]:
    worker = Worker(settings.model_copy(update={"backend": backend}))
    try:
        response = worker.handle({"id": f"verify-{backend.value}", "input": request})
        if response["status"] != "success":
            raise SystemExit(f"{backend.value}: {response['error']}")
        return [decode(item) for item in response["output"]], response["metrics"]
    finally:
        del worker
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.verify", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("verify-gpu needs a CUDA GPU", file=sys.stderr)
        return 2
    if export_main.main([]) != 0:
        return 1
    settings = load_settings()
    configure_logging("WARNING")
    request = {
        "prompt": "a photograph of a red fox in the snow",
        "negative_prompt": "blurry",
        "num_inference_steps": args.steps,
        "seed": 42,
        "scheduler": "euler",
        "num_images": 2,
    }
    reference, _ = generate(settings, Backend.TORCH, request)
    candidate, metrics = generate(settings, Backend.TENSORRT, request)
    on_tensorrt = set(metrics["backends"].values()) == {"tensorrt"}
    print(f"tensorrt backends: {metrics['backends']} {metrics['fallbacks'] or ''}")
    diffs = [compare_images(c, r) for c, r in zip(candidate, reference, strict=True)]
    for index, diff in enumerate(diffs):
        verdict = "ok" if diff.passed else "FAILED"
        print(
            f"image {index}: PSNR {diff.psnr_db} dB (>= {MIN_PSNR_DB}), mean |diff| {diff.mean_abs} "
            f"(<= {MAX_MEAN_ABS:.4f}): {verdict}"
        )
    perf_main.main(
        [
            "--backends",
            "torch",
            "onnxruntime",
            "tensorrt",
            "diffusers",
            "--steps",
            str(args.steps),
            "--runs",
            str(args.runs),
        ]
    )
    return 0 if on_tensorrt and all(d.passed for d in diffs) else 1


if __name__ == "__main__":
    sys.exit(run_command(main))
