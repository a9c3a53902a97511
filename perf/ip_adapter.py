"""`python -m perf.ip_adapter`: what an IP-Adapter costs, per backend: first use, switch, and per step.

    python -m perf.ip_adapter --model tiny --backends torch onnxruntime
    python -m perf.ip_adapter --model /models/sd15 --adapter-dir /runpod-volume/ip_adapters \\
        --adapters models/ip-adapter_sd15 models/ip-adapter-plus_sd15

An adapter's first use is timed whole (its components' chains made, the file read, the weights
set); then requests alternate between no adapter and adapter A, so the per-step times (the
denoiser's ``unet_step_ms`` p50) of the plain UNet and the IP denoiser come from the same minutes
of a shared machine; then between A and B, whose ``lora_ms`` is the switch (a torch patch, an
onnxruntime session, a refit). Without ``--adapter-dir``, random adapters for the model (a plain
one and a Plus one, from ``perf.ip_adapter_files``) are written to a temporary folder.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import tempfile
from pathlib import Path

from PIL import Image

from engine.common.cli import run_command
from engine.common.logs import configure_logging
from engine.models.model import load_model
from engine.serving.worker import Worker
from engine.settings import Backend, load_settings
from perf.bench import percentiles
from perf.ip_adapter_files import write_adapters

BACKENDS = ["torch", "onnxruntime", "tensorrt"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m perf.ip_adapter", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="overrides MODEL")
    parser.add_argument("--backends", nargs="+", default=BACKENDS[:2], choices=BACKENDS)
    parser.add_argument("--adapter-dir", type=Path, help="default: random adapters written for the model")
    parser.add_argument("--adapters", nargs=2, default=["models/plain", "models/plus"], metavar=("A", "B"))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--runs", type=int, default=4, help="requests timed of each kind")
    parser.add_argument("--size", type=int, help="image side; default: the model's native size")
    return parser.parse_args(argv)


def picture() -> str:
    image = Image.linear_gradient("L").convert("RGB").resize((320, 256))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def run(worker: Worker, payload: dict) -> dict:
    response = worker.handle({"id": "ip-adapter", "input": payload})
    if response["status"] != "success":
        raise RuntimeError(response["error"])
    return response["metrics"]


def bench(worker: Worker, base: dict, with_a: dict, with_b: dict, runs: int) -> tuple[dict[str, dict], set[str]]:
    ran: set[str] = set()
    run(worker, base)  # warm-up
    first = run(worker, with_a)
    plain_steps, ip_steps, switches = [], [], []
    for _ in range(runs):
        plain_steps.append(run(worker, base)["unet_step_ms"]["p50"])
        metrics = run(worker, with_a)
        ip_steps.append(metrics["unet_step_ms"]["p50"])
        ran.update(f"{c}={b}" for c, b in metrics["backends"].items())
    for index in range(runs):
        switches.append(run(worker, with_b if index % 2 == 0 else with_a)["lora_ms"])
    figures = {
        "first use (request ms)": percentiles([first["process_time"] * 1000]),
        "switch A<->B (lora_ms)": percentiles(switches),
        "step, no adapter": percentiles(plain_steps),
        "step, with A": percentiles(ip_steps),
    }
    return figures, ran


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings(**({"model": args.model} if args.model else {}))
    configure_logging("ERROR")
    model = load_model(settings.model, settings.cache_dir, settings.model_revision)
    with tempfile.TemporaryDirectory(prefix="perf-ip-adapters-") as temporary:
        folder = args.adapter_dir or write_adapters(model, Path(temporary))
        size = args.size or model.config.native_size
        base = {"prompt": "a lighthouse at dusk", "seed": 0, "num_inference_steps": args.steps}
        base |= {"width": size, "height": size}
        image = picture()
        with_a, with_b = ({**base, "ip_adapters": [{"name": name, "image": image}]} for name in args.adapters)
        print(f"model {settings.model}, {size}x{size}, {args.steps} steps, {args.runs} runs; p50 / p95 ms")
        print("| backend | first use | switch | step, no adapter | step, with A | ran on |")
        print("|---|---|---|---|---|---|")
        for backend in args.backends:
            print(f"timing {backend}...", file=sys.stderr)
            worker = Worker(settings.model_copy(update={"backend": Backend(backend), "ip_adapter_dir": folder}))
            figures, ran = bench(worker, base, with_a, with_b, args.runs)
            cells = " | ".join(f"{value['p50']:.1f} / {value['p95']:.1f}" for value in figures.values())
            print(f"| {backend} | {cells} | {', '.join(sorted(ran))} |", flush=True)
            del worker
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
