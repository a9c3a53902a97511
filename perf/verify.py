"""`python -m perf.verify` (make verify-gpu): the TensorRT chain against PyTorch on a GPU, as one table.

Exports and builds every engine for the configured model, then runs one request on the TensorRT
worker (warmed up, so its CUDA graphs are captured) and on the torch worker at the same precision,
and prints per component: the backend that ran it, its max error against torch on the same inputs,
the CUDA graphs captured and replayed, the LoRA refit check (sets A, B, then A again must give A's
outputs, which must differ from the base's and match torch's), the engine's memory and the time per
call (the denoiser's is its time per step); and a last row for the decoded images. Exits 1 if any
row fails. ``--backend onnxruntime`` runs the same checks where there is no GPU (DEVICE=cpu).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.common.cli import run_command
from engine.common.logs import configure_logging
from engine.models.model import load_model
from engine.serving.worker import Worker
from engine.settings import Backend, Settings, load_settings
from export import __main__ as export_main
from export.validate import TOLERANCES
from perf.agreement import compare_images
from perf.lora_files import write_pair
from perf.probe import Outputs, Replayed, Run, generate, lora_patches, run_recorded

LORA_A = [{"name": "a", "scale": 0.9}, {"name": "b", "scale": 0.5}]
LORA_B = [{"name": "b", "scale": -1.0}]
REFIT_STEPS = ("A", "B", "A again", "base")


@dataclass
class Candidate:
    """The candidate worker's run, and what it held: per component, graphs and engine bytes."""

    run: Run
    refits: Replayed
    graphs: dict[str, tuple[int, int]] = field(default_factory=dict)
    engine_bytes: dict[str, int] = field(default_factory=dict)
    scratch_bytes: int = 0


@dataclass
class Row:
    component: str
    backend: str
    error: str
    captures: str = "-"
    replays: str = "-"
    refit: str = "-"
    engine_mb: str = "-"
    ms_per_call: str = "-"
    failures: list[str] = field(default_factory=list)

    def cells(self) -> list[str]:
        verdict = "ok" if not self.failures else "FAILED: " + "; ".join(self.failures)
        return [
            self.component,
            self.backend,
            self.error,
            self.captures,
            self.replays,
            self.refit,
            self.engine_mb,
            self.ms_per_call,
            verdict,
        ]


HEADER = ["component", "backend", "max error vs torch (allowed)", "graphs captured", "graphs replayed"]
HEADER += ["refit A→B→A", "engine MB", "ms per call (torch)", "result"]


def max_error(candidate: Outputs, reference: Outputs, precision: str) -> tuple[float, float]:
    """The largest |candidate - reference| over the outputs, and what the export's validation allows
    at this precision: atol + rtol * max |reference| (export/validate.py)."""
    tolerance = TOLERANCES[precision]
    error = allowed = 0.0
    for name, want in reference.items():
        want = want.float()
        error = max(error, float((candidate[name].float() - want).abs().max()))
        allowed = max(allowed, tolerance.atol + tolerance.rtol * float(want.abs().max()))
    return error, allowed


def run_candidate(settings: Settings, payload: dict, graphs: bool) -> Candidate:
    worker = Worker(settings)
    try:
        worker.warmup()
        run = generate(worker, payload)
        components = list(run.calls.inputs)
        taken = worker.tensorrt.graph_counts() if graphs else {}
        a, b = lora_patches(worker, LORA_A), lora_patches(worker, LORA_B)
        sets = {"A": a, "B": b, "A again": a, "base": None}
        refits = run_recorded(worker, run.calls.inputs, [c for c in components if c in a], sets)
        engines = {c: sum(e.plan_bytes for e in r.engines) for c, r in worker.tensorrt.runners.items()}
        scratch = worker.tensorrt.scratch.numel() if worker.tensorrt.scratch is not None else 0
        return Candidate(run, refits, taken, engines, scratch)
    finally:
        del worker
        torch.cuda.empty_cache()


def run_reference(settings: Settings, payload: dict, inputs: dict[str, Outputs]) -> tuple[Run, Replayed]:
    worker = Worker(settings.model_copy(update={"backend": Backend.TORCH}))
    try:
        worker.warmup()
        run = generate(worker, payload)
        sets = {"base": None, "A": lora_patches(worker, LORA_A)}
        return run, run_recorded(worker, inputs, list(inputs), sets)
    finally:
        del worker
        torch.cuda.empty_cache()


def refit_check(candidate: Candidate, reference: Replayed, component: str, backend: str, precision: str) -> Row:
    """A, B, A again on the candidate: A again gives A's outputs, A differs from the base by more than the
    bound (else the check could not see a refit that did nothing), and A matches torch's A."""
    row = Row(component, backend, "")
    steps = candidate.refits.outputs[component]
    ran = candidate.refits.backends[component]
    elsewhere = sorted({step for step, name in ran.items() if name != backend})
    if elsewhere:
        row.failures.append(f"LoRA steps {', '.join(elsewhere)} ran on {ran[elsewhere[0]]}")
    again, allowed = max_error(steps["A again"], steps["A"], precision)
    moved, _ = max_error(steps["A"], steps["base"], precision)
    torch_a, _ = max_error(steps["A"], reference.outputs[component]["A"], precision)
    row.refit = f"A again Δ{again:.3g}, LoRA moved {moved:.3g}, A vs torch {torch_a:.3g}"
    if again > allowed:
        row.failures.append(f"A after B differs from A by {again:.3g} > {allowed:.3g}")
    if moved <= allowed:
        row.failures.append(f"LoRA A changed the outputs by {moved:.3g}, within the bound {allowed:.3g}")
    if torch_a > allowed:
        row.failures.append(f"LoRA A differs from torch's by {torch_a:.3g} > {allowed:.3g}")
    return row


def rows(
    candidate: Candidate, reference: Run, replayed: Replayed, backend: str, graphs: bool, denoiser: str, steps: int
) -> list[Row]:
    """One row per component the request ran, then the images'."""
    calls = candidate.run.calls
    table = []
    for component in calls.inputs:
        precision = calls.precisions[component].split(", ")[0]
        ran = calls.backends[component]
        row = (
            refit_check(candidate, replayed, component, backend, precision)
            if component in candidate.refits.outputs
            else Row(component, ran, "")
        )
        row.backend = ran
        if ran != backend:
            row.failures.append(f"ran on {ran}, not {backend}: {calls.fallbacks.get(component, '')}")
        error, allowed = max_error(calls.outputs[component], replayed.outputs[component]["base"], precision)
        row.error = f"{error:.3g} ({allowed:.3g})"
        if not error <= allowed:
            row.failures.append(f"max error {error:.3g} > {allowed:.3g}")
        if graphs:
            captured, replays = candidate.graphs.get(component, (0, 0))
            row.captures, row.replays = str(captured), str(replays)
            if component == denoiser and (captured < 1 or replays < steps):
                row.failures.append(f"the denoiser's {steps} steps at the optimum shapes must replay a captured graph")
        if component in candidate.engine_bytes:
            row.engine_mb = f"{candidate.engine_bytes[component] / 2**20:.1f}"
        row.ms_per_call = f"{calls.ms_per_call(component):.2f} ({reference.calls.ms_per_call(component):.2f})"
        table.append(row)
    return [*table, image_row(candidate.run, reference, denoiser)]


def image_row(candidate: Run, reference: Run, denoiser: str) -> Row:
    """The decoded images against torch's, at the bound for the denoiser's precision (perf/agreement.py)."""
    precision = candidate.calls.precisions[denoiser].split(", ")[0]
    diffs = [compare_images(c, r, precision) for c, r in zip(candidate.images, reference.images, strict=True)]
    worst = max(diffs, key=lambda diff: (not diff.passed, diff.max_abs))
    row = Row("images (decoded)", "-", str(worst))
    if not all(diff.passed for diff in diffs):
        row.failures.append("the images differ from torch's beyond the bound (perf/agreement.py)")
    return row


def markdown(table: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join([*lines, *("| " + " | ".join(row.cells()) + " |" for row in table)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.verify", description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["tensorrt", "onnxruntime"], default="tensorrt")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-export", action="store_true", help="use the engine store as it is")
    args = parser.parse_args(argv)
    if args.backend == "tensorrt" and not torch.cuda.is_available():
        print("verify-gpu needs a CUDA GPU (or --backend onnxruntime with DEVICE=cpu)", file=sys.stderr)
        return 2
    if not args.no_export and export_main.main([]) != 0:
        return 1
    configure_logging("WARNING")
    payload = {"prompt": "a photograph of a red fox in the snow", "negative_prompt": "blurry"}
    payload |= {"num_inference_steps": args.steps, "seed": 42, "scheduler": "euler", "num_images": 1}
    with tempfile.TemporaryDirectory() as loras:
        settings = load_settings().model_copy(update={"lora_dir": Path(loras), "backend": Backend(args.backend)})
        model = load_model(settings.model, settings.cache_dir, settings.model_revision, settings.model_cache_dir)
        write_pair(model, Path(loras), rank=4)
        graphs = args.backend == "tensorrt" and settings.cuda_graphs
        candidate = run_candidate(settings, payload, graphs)
        reference, replayed = run_reference(settings, payload, candidate.run.calls.inputs)
    table = rows(candidate, reference, replayed, args.backend, graphs, model.family.denoiser, args.steps)
    print(markdown(table))
    if candidate.scratch_bytes:
        print(f"\nshared TensorRT scratch: {candidate.scratch_bytes / 2**20:.1f} MB")
    failed = [row.component for row in table if row.failures]
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_command(main))
