"""`python -m perf.lora`: what switching LoRA sets costs, per backend, on a given model.

    python -m perf.lora --model tiny --backends torch onnxruntime
    python -m perf.lora --model /models/sd15 --lora-dir /runpod-volume/loras --loras a b

Each set is first used once (its first ``lora_ms``: a torch patch, a new onnxruntime
session, a refit), then requests alternate between the two sets (every request switches;
onnxruntime keeps ``LORA_SESSIONS`` sessions, so it switches between cached ones), then
repeat one set (nothing to switch). Prints, per backend, the switch times the worker
reports (``lora_ms``) and the request time with and without a switch, against the
request without LoRAs. Without ``--lora-dir`` two random LoRAs for the model are written to a
temporary folder (rank 16, UNet and text encoders).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from engine.common.cli import run_command
from engine.common.logs import configure_logging
from engine.models.model import load_model
from engine.serving.worker import Worker
from engine.settings import Backend, load_settings
from perf.bench import percentiles
from perf.lora_files import write_pair

BACKENDS = ["torch", "onnxruntime", "tensorrt"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m perf.lora", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="overrides MODEL")
    parser.add_argument("--backends", nargs="+", default=BACKENDS[:2], choices=BACKENDS)
    parser.add_argument("--lora-dir", type=Path, help="default: two random LoRAs written for the model")
    parser.add_argument("--loras", nargs=2, default=["a", "b"], metavar=("A", "B"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--runs", type=int, default=4, help="switches timed (and as many repeats)")
    parser.add_argument("--size", type=int, help="image side; default: the model's native size")
    return parser.parse_args(argv)


def time_requests(worker: Worker, payloads: list[dict], ran: set[str]) -> tuple[list[float], list[float]]:
    """Each request's process time and lora_ms, in ms; the backends that ran go into ``ran``."""
    totals, switches = [], []
    for index, payload in enumerate(payloads):
        response = worker.handle({"id": f"lora-{index}", "input": payload})
        if response["status"] != "success":
            raise RuntimeError(response["error"])
        totals.append(response["metrics"]["process_time"] * 1000)
        switches.append(response["metrics"]["lora_ms"])
        ran.update(f"{c}={b}" for c, b in response["metrics"]["backends"].items())
    return totals, switches


def bench(worker: Worker, base: dict, sets: list[dict], runs: int) -> tuple[dict[str, dict[str, float]], set[str]]:
    ran: set[str] = set()
    time_requests(worker, [base, base], ran)  # warm-up
    _, first_ms = time_requests(worker, sets, ran)  # each set's first use: files read, sessions made
    base_ms, _ = time_requests(worker, [base] * runs, ran)
    switching_ms, switch_ms = time_requests(worker, [sets[index % 2] for index in range(runs)], ran)
    repeated_ms, _ = time_requests(worker, [sets[0]] * runs, ran)
    figures = {
        "first use of a set (lora_ms)": percentiles(first_ms),
        "switch (lora_ms)": percentiles(switch_ms),
        "request, switching": percentiles(switching_ms),
        "request, same set": percentiles(repeated_ms),
        "request, no LoRA": percentiles(base_ms),
    }
    return figures, ran


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings(**({"model": args.model} if args.model else {}))
    configure_logging("ERROR")
    model = load_model(settings.model, settings.cache_dir, settings.model_revision, settings.model_cache_dir)
    with tempfile.TemporaryDirectory(prefix="perf-loras-") as temporary:
        lora_dir = args.lora_dir or Path(temporary)
        if args.lora_dir is None:
            write_pair(model, lora_dir)
        size = args.size or model.config.native_size
        base = {"prompt": "a lighthouse at dusk", "seed": 0, "num_inference_steps": args.steps}
        base |= {"width": size, "height": size}
        sets = [{**base, "loras": [{"name": name, "scale": 0.8}]} for name in args.loras]
        print(f"model {settings.model}, {size}x{size}, {args.steps} steps, {args.runs} runs; p50 / p95 ms")
        columns = "first use of a set | switch | request, switching | request, same set | request, no LoRA"
        print(f"| backend | {columns} | ran on |")
        print("|---|---|---|---|---|---|---|")
        for backend in args.backends:
            print(f"timing {backend}...", file=sys.stderr)
            worker = Worker(settings.model_copy(update={"backend": Backend(backend), "lora_dir": lora_dir}))
            figures, ran = bench(worker, base, sets, args.runs)
            cells = " | ".join(f"{value['p50']:.0f} / {value['p95']:.0f}" for value in figures.values())
            print(f"| {backend} | {cells} | {', '.join(sorted(ran))} |", flush=True)
            del worker
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
