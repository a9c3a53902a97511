"""`python -m perf.export`: what `make engines` costs for a model: time and peak memory per stage.

    python -m perf.export --model /models/sd15 --precision fp16
    python -m perf.export --model /models/sd15 --components unet --quantize int8 --calib-steps 4 --calib-size 256

Runs `python -m export` as a user would, into a fresh store (nothing cached), then reads
each artifact's manifest and prints per component and stage the seconds and the peak
resident memory (and torch's peak GPU memory on a GPU), with the largest peak against the
component's fp32 weights. Writes the same figures as JSON under the results folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine.common.cli import run_command
from engine.models.model import load_model
from engine.settings import load_settings
from engine.store.store import Store
from export.trace import weight_bytes

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("fingerprint", "load", "reference", "export", "hash weights", "optimize", "weight map", "validate")
"""In the order they run (a large component's load, reference and export run in a child process)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m perf.export", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="overrides MODEL")
    parser.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"], default="auto")
    parser.add_argument("--components", nargs="+", help="default: every component")
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    parser.add_argument("--quantize", choices=["none", "auto", "fp8", "int8", "nvfp4"], default="none")
    parser.add_argument("--calib-prompts", type=Path, help="passed to python -m export")
    parser.add_argument("--calib-steps", type=int, help="passed to python -m export")
    parser.add_argument("--calib-size", type=int, help="passed to python -m export")
    return parser.parse_args(argv)


def quantize_args(args: argparse.Namespace) -> list[str]:
    """The quantization options for `python -m export`."""
    extra = ["--quantize", args.quantize]
    for name in ("calib_prompts", "calib_steps", "calib_size"):
        if getattr(args, name) is not None:
            extra += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return extra


def run_export(
    model: str, precision: str, components: list[str] | None, engine_dir: Path, extra: list[str] = ()
) -> float:
    command = [sys.executable, "-m", "export", "--model", model, "--precision", precision, "--skip-engines", *extra]
    if components:
        command += ["--components", *components]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=dict(os.environ, ENGINE_DIR=str(engine_dir)), check=True)
    return time.perf_counter() - started


def figures(engine_dir: Path, weights: dict[str, int]) -> list[dict]:
    rows = []
    for artifact in Store(engine_dir).find(kind="onnx"):
        manifest = artifact.manifest
        peaks = manifest["stage_peak_rss_mb"]
        component = artifact.key.component
        rows.append(
            {
                "component": component,
                "precision": artifact.key.quantization or artifact.key.precision,
                "weights_mb": round(weights[component] / 2**20, 1),
                "artifact_mb": round(sum(f["size"] for f in artifact.files.values()) / 2**20, 1),
                "seconds": manifest["stage_seconds"],
                "peak_rss_mb": peaks,
                "peak_cuda_mb": manifest.get("stage_peak_cuda_mb", {}),
                "max_abs_error": max((entry["max_abs_error"] for entry in manifest["parity"]), default=float("nan")),
                "validation": manifest["validation"],
            }
        )
    return rows


def print_table(rows: list[dict], wall_s: float) -> None:
    print("\n| component | stage | seconds | peak RSS (GiB) |\n|---|---|---:|---:|")
    for row in rows:
        for stage in sorted(row["seconds"], key=lambda name: (*STAGES, name).index(name)):
            seconds = row["seconds"][stage]
            peak = row["peak_rss_mb"].get(stage, 0.0) / 1024
            gpu = row["peak_cuda_mb"].get(stage)
            memory = f"{peak:.2f}" + (f" (GPU {gpu / 1024:.2f})" if gpu else "")
            print(f"| {row['component']} | {stage} | {seconds:.1f} | {memory} |")
    print()
    largest = max(rows, key=lambda row: row["weights_mb"])
    peak = max(max(row["peak_rss_mb"].values()) for row in rows)
    print(f"wall time {wall_s:.0f} s; peak RSS {peak / 1024:.2f} GiB, {peak / largest['weights_mb']:.2f}x the largest")
    print(f"component's weights ({largest['component']}, {largest['weights_mb'] / 1024:.2f} GiB)")
    for row in rows:
        validation = row["validation"]
        print(
            f"  {row['component']:<14} {row['precision']}  artifact {row['artifact_mb'] / 1024:.2f} GiB, "
            f"max |onnx - torch| {row['max_abs_error']:.2e} at {', '.join(validation.get('shapes', []))} "
            f"({validation.get('compared') or validation['backend'] + ' on ' + validation['device']})"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings(**({"model": args.model} if args.model else {}))
    model = load_model(settings.model, settings.cache_dir, settings.model_revision, settings.model_cache_dir)
    weights = {component: weight_bytes(model, component) for component in model.components}
    with tempfile.TemporaryDirectory(prefix="perf-export-") as engine_dir:
        wall_s = run_export(settings.model, args.precision, args.components, Path(engine_dir), quantize_args(args))
        rows = figures(Path(engine_dir), weights)
    print_table(rows, wall_s)
    folder = args.out / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "export.json"
    path.write_text(json.dumps({"model": settings.model, "wall_s": round(wall_s, 1), "components": rows}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
