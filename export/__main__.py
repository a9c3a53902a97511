"""`python -m export`: every component of the configured model into the engine store.

    python -m export --model tiny
    MODEL=/models/sd15 ENGINE_DIR=/runpod-volume/engines python -m export

Safe to run from many processes or hosts at once: each artifact is built once, under
a lock, and published atomically; artifacts already in the store are checked and kept.
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch
from tqdm import tqdm

from engine.errors import WorkerError
from engine.logs import configure_logging
from engine.models import load_model
from engine.settings import Precision, Settings
from engine.store import Store
from engine.worker import resolve_device, resolve_precision
from export.stages import Exporter, StageLog

log = logging.getLogger("export")


def export_precision(precision: Precision, device: torch.device) -> str:
    """Like the worker's, except that fp16 graphs may be made and validated on the CPU too."""
    if precision is Precision.FP16:
        return "fp16"
    return resolve_precision(precision, device)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="overrides MODEL")
    parser.add_argument("--components", nargs="+", help="default: every component of the model's family")
    parser.add_argument("--device", help="overrides DEVICE")
    parser.add_argument("--precision", choices=["auto", "fp32", "fp16"], help="overrides PRECISION")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {name: getattr(args, name) for name in ("model", "device", "precision") if getattr(args, name)}
    settings = Settings(**overrides)
    configure_logging("WARNING" if settings.log_level.upper() == "INFO" else settings.log_level)
    try:
        device = resolve_device(settings.device)
        exporter = Exporter(
            model=load_model(settings.model, settings.cache_dir, settings.model_revision),
            store=Store(settings.engine_dir, settings.lock_stale_s, settings.lock_heartbeat_s),
            device=device,
            precision=export_precision(settings.precision, device),
        )
        components = args.components or list(exporter.model.components)
        unknown = set(components) - set(exporter.model.components)
        if unknown:
            raise WorkerError(f"unknown components {sorted(unknown)}; the model has {exporter.model.components}")
        summary = []
        with tqdm(components, desc="export", unit="component") as bar:
            for component in bar:
                stages = StageLog(on_stage=lambda stage, c=component: bar.set_postfix_str(f"{c}: {stage}"))
                artifact = exporter.onnx(component, stages)
                summary.append((component, artifact, stages.seconds))
    except WorkerError as error:
        print(f"export failed: {error}", file=sys.stderr)
        return 1
    print(f"engine store: {settings.engine_dir}")
    for component, artifact, seconds in summary:
        worst = max((r["max_abs_error"] for r in artifact.manifest.get("parity", [])), default=0.0)
        timing = ", ".join(f"{stage} {value:.1f}s" for stage, value in seconds.items()) or "cached"
        print(f"  {component:<14} {artifact.path.name}  max |onnx - torch| {worst:.2e}  ({timing})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
