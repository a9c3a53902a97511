"""`python -m perf.coldstart`: process start to first image, against a plain diffusers script.

    python -m perf.coldstart --model tiny --backends torch onnxruntime --runs 5

Each run starts fresh processes, as a RunPod cold start does, one after another so that
they alternate: ``import torch`` alone (the floor any PyTorch worker pays); the script a
user would run instead (``DiffusionPipeline.from_pretrained`` on the same model folder,
then one call with the job's prompt, steps and seed); and ``handler.py --test_input`` with
the same job, per backend. Each is timed from its start to its first line on stdout (the
response, the image's size, or the import). onnxruntime runs from cached artifacts: they
are exported first (untimed) when the store lacks them. The worker's modules are compiled to
bytecode first, as the image has them (see the Dockerfile) and as the script's libraries were
when they were installed, so no run compiles its code at start, even where
PYTHONDONTWRITEBYTECODE keeps Python from caching what it compiles. Prints the median wall time of
each, the median of its per-round ratios to the diffusers script (each round's processes run back to
back under the same load, so a busy machine moves both sides of a ratio together), its median CPU
seconds (user and system, child processes included: steadier than wall time on a shared machine), and
the worker's own ``init_ms`` phases from the job's metrics.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from engine.common.cli import run_command
from engine.models.model import resolve_model_folder
from engine.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
JOB = {"input": {"prompt": "a lighthouse at dusk", "num_inference_steps": 4, "seed": 0}}
DIFFUSERS_SCRIPT = """
import sys
import torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
generator = torch.Generator().manual_seed(int(sys.argv[4]))
image = pipe(sys.argv[2], num_inference_steps=int(sys.argv[3]), generator=generator).images[0]
print(f"{image.width}x{image.height}", flush=True)
"""
"""What a user would run instead of the worker: load the folder, make one image."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m perf.coldstart", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="overrides MODEL")
    parser.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"], choices=["torch", "onnxruntime"])
    parser.add_argument("--runs", type=int, default=5)
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Timed:
    """One process: seconds to its first line, that line, and the CPU seconds it and its children used."""

    seconds: float
    line: str
    cpu_seconds: float


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def until_first_line(command: list[str], env: dict[str, str]) -> Timed:
    """Seconds from starting ``command`` to its first line on stdout, and that line. The process's
    exit is not counted in the seconds: a worker does not exit after its first job (and Python's
    teardown of torch and friends takes about a second); its CPU time is whole, teardown included,
    for every process alike."""
    cpu_before = _children_cpu()
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    seconds = time.perf_counter() - started
    _, errors = process.communicate(timeout=900)
    if process.returncode != 0 or not line:
        raise RuntimeError(f"{' '.join(command[:3])} failed: {errors[-2000:]}")
    return Timed(seconds, line, _children_cpu() - cpu_before)


def compile_bytecode(root: Path = ROOT) -> None:
    """The worker's modules compiled to bytecode beside them (``__pycache__``), as the image has them."""
    if not compileall.compile_dir(root / "engine", quiet=1):
        raise RuntimeError(f"the worker's modules under {root / 'engine'} do not compile")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    compile_bytecode()
    settings = load_settings(**({"model": args.model} if args.model else {}))
    env = dict(os.environ, MODEL=settings.model, DEVICE="cpu", WARMUP="0")
    if "onnxruntime" in args.backends:
        export = [sys.executable, "-m", "export", "--model", settings.model, "--skip-engines"]
        subprocess.run(export, cwd=ROOT, env=env, capture_output=True, check=True)
    folder = resolve_model_folder(settings.model, settings.cache_dir, settings.model_revision, settings.model_cache_dir)
    job = JOB["input"]
    script = [sys.executable, "-c", DIFFUSERS_SCRIPT, str(folder), job["prompt"], str(job["num_inference_steps"])]
    script.append(str(job["seed"]))
    floor: list[Timed] = []
    plain: list[Timed] = []
    runs: dict[str, list[Timed]] = {backend: [] for backend in args.backends}
    phases: dict[str, dict[str, float | str]] = {}
    for _ in range(args.runs):
        floor.append(until_first_line([sys.executable, "-c", "import torch; print('imported')"], env))
        plain.append(until_first_line(script, env))
        for backend in args.backends:
            command = [sys.executable, "handler.py", "--test_input", json.dumps(JOB)]
            timed = until_first_line(command, {**env, "BACKEND": backend, "TORCH_FALLBACK": "lazy"})
            runs[backend].append(timed)
            phases[backend] = json.loads(timed.line)["metrics"]["init_ms"]
    print(f"model {settings.model}, {args.runs} runs, median seconds from a fresh process's start to its first image")
    print("| process | seconds | ratio to the script, median of rounds | CPU seconds | init_ms phases (last run) |")
    print("|---|---|---|---|---|")
    rows = {"python -c 'import torch'": floor, "diffusers from_pretrained + one call": plain}
    rows.update({f"handler.py --test_input, {backend}": timed for backend, timed in runs.items()})
    for label, timed in rows.items():
        ratio = statistics.median(t.seconds / p.seconds for t, p in zip(timed, plain, strict=True))
        backend = label.rpartition(", ")[2]
        detail = ", ".join(
            f"{k} {v:.0f}"
            for k, v in phases.get(backend, {}).items()
            if isinstance(v, float) and not k.startswith("store_read")
        )
        seconds = statistics.median(t.seconds for t in timed)
        cpu = statistics.median(t.cpu_seconds for t in timed)
        print(f"| {label} | {seconds:.2f} | {ratio:.2f} | {cpu:.2f} | {detail} |")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main))
