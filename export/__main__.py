"""`python -m export`: every component of the configured model into the engine store.

    python -m export --model tiny
    MODEL=/models/sd15 ENGINE_DIR=/runpod-volume/engines python -m export
    python -m export --controlnets canny depth
    python -m export --ip-adapters models/ip-adapter_sd15 models/ip-adapter-plus_sd15
    python -m export --quantize fp8 --calib-steps 20 --calib-size 512

ControlNets in CONTROLNET_DIR that fit the model are exported too, with the controlled UNet
they feed; IP-Adapters of IP_ADAPTER_DIR when named, with the IP denoiser.

Safe to run from many processes or hosts at once: each artifact is built once, under
a lock, and published atomically; artifacts already in the store are checked and kept.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from engine.backends.tensorrt.runtime import gpu_model, gpu_tag
from engine.common.cli import run_command
from engine.common.errors import RequestError, WorkerError
from engine.common.logs import configure_logging
from engine.devices import resolve_device, resolve_precision, resolve_quantization
from engine.lora.ip_adapters import IpAdapterFiles
from engine.models.controlnet import CONTROLLED_UNET
from engine.models.controlnet_folders import ControlNetFolders, found_controlnets
from engine.models.ip_adapter import ip_denoisers
from engine.models.model import Model, load_model
from engine.settings import Precision, Quantize, Settings, load_settings
from engine.sizes import parse_ranges
from engine.store.artifact import Artifact
from engine.store.store import Store
from export.quantize.recipe import QuantFormat, Recipe, default_prompts_file, read_prompts
from export.quantize.stage import QuantizedExporter
from export.stagelog import StageLog
from export.stages import EngineBuilder, Exporter
from export.tensorrt import BuildOptions

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
    parser.add_argument("--precision", choices=[p.value for p in Precision], help="overrides PRECISION")
    parser.add_argument("--skip-engines", action="store_true", help="ONNX only, even on a GPU")
    parser.add_argument(
        "--quantize",
        choices=[q.value for q in Quantize],
        help="overrides QUANTIZE: the denoiser also as a quantized graph (auto: by the GPU's compute capability)",
    )
    parser.add_argument("--calib-prompts", type=Path, help="calibration prompts, one a line (default: the shipped set)")
    parser.add_argument("--calib-steps", type=int, help="overrides CALIB_STEPS")
    parser.add_argument("--calib-size", type=int, help="overrides CALIB_SIZE")
    parser.add_argument(
        "--controlnets",
        nargs="*",
        metavar="NAME",
        help="ControlNet folders in CONTROLNET_DIR to export, with the controlled UNet (no names: all that fit); "
        "default: all that fit, unless --components is given",
    )
    parser.add_argument(
        "--ip-adapters",
        nargs="+",
        metavar="NAME",
        help="IP-Adapter files in IP_ADAPTER_DIR to export: each one's image encoder and projection, with the "
        "IP denoiser (default: none)",
    )
    return parser.parse_args(argv)


def add_controlnets(model: Model, settings: Settings, names: list[str] | None) -> tuple[list[str], list[str]]:
    """The ControlNet components to export, made part of the model, and a line for each one left out.

    Named ControlNets must fit the model; of the ones found, those that do not are left out."""
    assert settings.controlnet_dir is not None  # Settings fills it in
    folders = ControlNetFolders(settings.controlnet_dir, model)
    if names:
        return [folders.component(name, "--controlnets") for name in names], []
    components, skipped = [], []
    for name in found_controlnets(settings.controlnet_dir):
        try:
            components.append(folders.component(name, "CONTROLNET_DIR"))
        except RequestError as error:
            skipped.append(f"skipped {error}")
    return components, skipped


def engine_builder(settings: Settings, exporter: Exporter, skip: bool) -> tuple[EngineBuilder | None, str]:
    """The TensorRT builder when engines are wanted and possible, else why not."""
    if skip:
        return None, "engines skipped (--skip-engines)"
    if exporter.device.type != "cuda":
        return None, "engines skipped: TensorRT builds need a CUDA GPU"
    options = BuildOptions(
        workspace_bytes=int(settings.engine_workspace_gb * 2**30),
        optimization_level=settings.engine_optimization_level,
        version_compatible=settings.engine_version_compatible,
        refit=settings.engine_refit.value,
    )
    ranges = parse_ranges(settings.engine_profiles, exporter.model.config.native_size, settings.max_images)
    builder = EngineBuilder.create(
        exporter.store,
        gpu_tag(exporter.device),
        ranges,
        options,
        settings.lock_stale_s,
        settings.lock_heartbeat_s,
        max_prompt_chunks=settings.max_prompt_chunks,
        gpu_model=gpu_model(exporter.device),
    )
    tokens = settings.max_prompt_chunks * 75
    return builder, (
        f"engines for {builder.gpu}, TensorRT {builder.tag}, profiles {[r.label for r in ranges]}, "
        f"prompts up to {tokens} tokens"
    )


def stage_summary(stages: StageLog) -> str:
    """Time and peak memory per stage: 'export 36.4s 4.8GiB, optimize 6.9s 0.5GiB, ...'."""
    if set(stages.seconds) <= {"fingerprint"}:
        return "cached"
    parts = []
    for stage, seconds in stages.seconds.items():
        memory = f" {stages.peak_rss_mb[stage] / 1024:.1f}GiB"
        if stage in stages.peak_cuda_mb:
            memory += f" (GPU {stages.peak_cuda_mb[stage] / 1024:.1f}GiB)"
        parts.append(f"{stage} {seconds:.1f}s{memory}")
    return ", ".join(parts)


def summarize(artifact: Artifact) -> str:
    worst = max((r["max_abs_error"] for r in artifact.manifest.get("parity", [])), default=0.0)
    line = f"{artifact.path.name}  max |{artifact.key.kind} - torch| {worst:.2e}"
    quantization = artifact.manifest.get("quantization")
    if not quantization:
        return line
    size = sum(entry["size"] for name, entry in artifact.files.items() if name != "twin.onnx") / 2**30
    calibrated = artifact.manifest.get("stage_seconds", {}).get("calibrate")
    calibration = f"calibrated in {calibrated:.0f}s" if calibrated else "calibration reused"
    against = " (fake-quantized)" if artifact.key.kind == "onnx" else ""
    return f"{line}{against}, {size:.2f} GiB, {calibration}"


def quantized_exporter(settings: Settings, exporter: Exporter, prompts: Path | None) -> QuantizedExporter | None:
    """The exporter of the denoiser's quantized graph that QUANTIZE asks for, or None. Model Optimizer is
    imported only from here on."""
    device = exporter.device
    quantization = resolve_quantization(settings.quantize, device)
    if quantization is None:
        if settings.quantize is not Quantize.NONE:
            print(f"quantize={settings.quantize.value}: no quantized format for this device ({device}); none made")
        return None
    if quantization == "nvfp4" and device.type != "cuda":
        raise WorkerError(
            "quantize=nvfp4 needs a CUDA device: Model Optimizer's NVFP4 quantizer (dynamic 16-element blocks) "
            "runs on CUDA only; export it on the GPU"
        )
    recipe = Recipe(
        QuantFormat(quantization),
        tuple(read_prompts(prompts or default_prompts_file())),
        settings.calib_steps,
        settings.calib_size,
    )
    return QuantizedExporter(exporter.model, exporter.store, device, settings, recipe)


def add_ip_adapters(model: Model, settings: Settings, store: Store, names: list[str], controlled: bool) -> list[str]:
    """The components that serve the named IP-Adapters (each checked against the model), made part of it:
    the IP denoiser for each adapter count up to MAX_IP_ADAPTERS and, with ``controlled`` (ControlNets
    exported too), its controlled variant as well."""
    assert settings.ip_adapter_dir is not None  # Settings fills it in
    files = IpAdapterFiles(settings.ip_adapter_dir, model, settings.max_lora_bytes, store.file_digest)
    adapters = [files.resolve(name, "--ip-adapters") for name in names]
    counts = range(1, max(settings.max_ip_adapters, 1) + 1)
    denoisers = [component for count in counts for component in ip_denoisers(count)[: 2 if controlled else 1]]
    return list(dict.fromkeys([*(c for a in adapters for c in (a.encoder, a.projection)), *denoisers]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: export(args))


def export(args: argparse.Namespace) -> int:
    names = ("model", "device", "precision", "quantize", "calib_steps", "calib_size")
    overrides = {name: getattr(args, name) for name in names if getattr(args, name)}
    settings = load_settings(**overrides)
    configure_logging("WARNING" if settings.log_level.upper() == "INFO" else settings.log_level)
    device = resolve_device(settings.device)
    exporter = Exporter(
        model=load_model(settings.model, settings.cache_dir, settings.model_revision, settings.model_cache_dir),
        store=Store(settings.engine_dir, settings.lock_stale_s, settings.lock_heartbeat_s),
        device=device,
        precision=export_precision(settings.precision, device),
        work_dir=settings.export_work_dir,
    )
    model = exporter.model
    components = args.components or list(model.components)
    unknown = set(components) - set(model.components)
    if unknown:
        raise WorkerError(f"unknown components {sorted(unknown)}; the model has {model.components}")
    controlnets, skipped = [], []
    if args.controlnets is not None or args.components is None:
        controlnets, skipped = add_controlnets(model, settings, args.controlnets)
    if controlnets:
        components += [*controlnets, CONTROLLED_UNET]
    if args.ip_adapters:
        components += add_ip_adapters(model, settings, exporter.store, args.ip_adapters, controlled=bool(controlnets))
    builder, engines_note = engine_builder(settings, exporter, args.skip_engines)
    quantized = quantized_exporter(settings, exporter, args.calib_prompts)
    summary = []
    with tqdm(components, desc="export", unit="component") as bar:
        for component in bar:
            stages = StageLog(on_stage=lambda stage, c=component: bar.set_postfix_str(f"{c}: {stage}"), device=device)
            onnx = exporter.onnx(component, stages)
            engines = [exporter.engine(component, onnx, builder, stages)] if builder else []
            summary.append((component, [onnx, *engines], stages))
        if quantized is not None and model.family.denoiser in components:
            component = model.family.denoiser
            bar.set_postfix_str(f"{component}: {quantized.recipe.format.value}")
            stages = StageLog(device=device)
            onnx = quantized.onnx(component, exporter.component_precision(component), stages)
            engines = [exporter.engine(component, onnx, builder, stages)] if builder else []
            summary.append((f"{component} {quantized.recipe.format.value}", [onnx, *engines], stages))
    print(f"engine store: {settings.engine_dir}\n{engines_note}")
    for line in skipped:
        print(f"  {line}")
    for component, artifacts, stages in summary:
        print(f"  {component:<14} ({stage_summary(stages)})")
        for artifact in artifacts:
            print(f"    {summarize(artifact)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
