"""`python -m perf`: the same requests through each available backend, against the PyTorch baseline.

    python -m perf --model tiny
    python -m perf --model tiny-flux --backends torch onnxruntime diffusers
    python -m perf --backends torch tensorrt diffusers --runs 10
    python -m perf --model /models/sd15 --controlnet canny    # adds a ControlNet scenario

Prints a Markdown table (p50/p95 end to end and per stage, speedup against torch) and
writes results.json, results.md and chart.png under the results folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from engine.common.cli import run_command
from engine.common.logs import configure_logging
from engine.devices import resolve_device, resolve_precision
from engine.models.model import load_model
from engine.settings import load_settings
from perf import report
from perf.bench import BackendResult, bench_backend, bench_diffusers
from perf.scenarios import controlnet_scenario, default_scenarios

BACKENDS = ["torch", "onnxruntime", "tensorrt"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m perf", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="overrides MODEL")
    parser.add_argument("--backends", nargs="+", default=BACKENDS, choices=[*BACKENDS, "diffusers"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    parser.add_argument(
        "--controlnet", metavar="NAME", help="also time text-to-image steered by this ControlNet of CONTROLNET_DIR"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings(**({"model": args.model} if args.model else {}))
    configure_logging("ERROR")
    model = load_model(settings.model, settings.cache_dir, settings.model_revision, settings.model_cache_dir)
    scenarios = default_scenarios(model, args.steps)
    if args.controlnet:
        scenarios.append(controlnet_scenario(model, args.steps, args.controlnet))
    device = resolve_device(settings.device)
    results: list[BackendResult] = []
    for backend in args.backends:
        print(f"timing {backend}...", file=sys.stderr)
        if backend == "diffusers":
            results.append(bench_diffusers(settings, scenarios, args.warmup, args.runs))
        else:
            results.append(bench_backend(settings, backend, scenarios, args.warmup, args.runs))
    context = {
        "model": settings.model,
        "device": str(device),
        "precision": resolve_precision(settings.precision, device),
        "steps": args.steps,
        "warmup": args.warmup,
        "runs": args.runs,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    folder = args.out / time.strftime("%Y%m%d-%H%M%S")
    paths = report.write(results, folder, context)
    print(paths["markdown"].read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
