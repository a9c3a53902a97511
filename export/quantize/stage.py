"""One quantized component through the stages: calibrate (or restore) -> trace -> optimize -> check -> publish.

The torch side runs as the unquantized export's does, in a child process for a large component:
the module is loaded once, its fp32 outputs kept (to state the quantization's own error),
calibrated by the worker's pipeline or restored from the store's calibration artifact, its
fake-quantized outputs taken as the reference, and traced. The graph is then checked on
onnxruntime against the fake-quantized module (FP8 through its standard-op twin), and the
manifest says what was compared with what.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.backends.onnxruntime import OnnxRuntimeRunner
from engine.backends.quantized import TWIN_FILE
from engine.models.model import Model
from engine.settings import Settings
from engine.spec import Dims
from engine.store.artifact import Artifact
from engine.store.fingerprint import component_fingerprint
from engine.store.keys import ONNX_FILE, calibration_key, quantized_onnx_key
from engine.store.staging import Staging, scratch_folder
from export.onnx import export_dims, export_onnx
from export.optimize import optimize
from export.quantize import calibrate as calibration
from export.quantize import probe
from export.quantize.recipe import Recipe
from export.quantize.twin import cpu_twin
from export.stagelog import StageLog
from export.stages import tool_versions
from export.trace import ISOLATE_FROM_BYTES, load_module, references_for, weight_bytes
from export.validate import Reference, Tolerance, check, compare, validation_dims

log = logging.getLogger(__name__)


QUANTIZED_TOLERANCES = {
    "int8": Tolerance(atol=1e-2, rtol=1e-1, mean_rtol=5e-2),
    "fp8": Tolerance(atol=1e-2, rtol=1.5e-1, mean_rtol=5e-2),
}
"""onnxruntime's Q/DQ graph against the fake-quantized torch module at the outputs, in fractions of the largest
output: a loose bound, which the sharp check of each Q/DQ pair (``export.quantize.probe``) stands behind.

Both sides hold the same quantizers with the same scales and clamp alike; INT8 weights are rounded as the
graph rounds them before either is made (``round_weights_as_exported``: ModelOpt's fake quantization put
4 of the tiny UNet's 878,592 weights a step off). What remains is single activations within a rounding
error of a step boundary (the operations before a quantizer round differently by 1e-7 to 2e-6), which land
one step apart, and the network carries the step to every output element: a fraction or mean of the
outputs cannot tell such a value from a quantizer a few percent off. Measured, max and mean |diff| over
max |output| at the three validation shapes, worst shape: tiny UNet INT8 3.3e-2 and 3.6e-3 (one shape
agrees to 5e-7), FP8 5.6e-2 and 5.8e-3; tiny SDXL UNet INT8 3.5e-2 and 3.4e-3, FP8 9.5e-2 and 8.7e-3;
tiny SD3 and Flux transformers at most 1.4e-3 and 4e-6. With one activation quantizer's scale 5% off,
or one Q/DQ pair left out (each of the tiny UNet's 66 in turn), its outputs move by as much (worst-shape
mean 4.7e-3 to 1.1e-2 INT8, 7.5e-3 to 2.2e-2 FP8; max 2.6e-2 to 1.4e-1): within these bounds in all 264
cases, and the pairs' check fails each (91% to 100% of the values apart; no pair). Full-size SD 1.5
UNet (random weights, outputs of about 1.2 to 1.4): INT8 max 6.2e-2, mean 1.2e-2 (82 of 130.7 M values
a step apart in the pairs' check); FP8, measured before this check and LayerNorm's inputs were
unquantized, max 1.3e-1, mean 2.1e-2. So: max within 1e-2 + 10% (INT8) or 15% (FP8), mean within 5%,
which only a whole output off fails."""


@contextmanager
def working_folder(folder: Path) -> Iterator[None]:
    """Runs in ``folder``: graph folding of an FP8 graph leaves onnx's uuid-named external data files in the
    working directory, and here they go with the scratch folder."""
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


@dataclass
class QuantizedTrace:
    references: list[Reference]
    """The fake-quantized module's outputs: what the graph is checked against."""
    fp32_error: float
    """max |fake-quantized - fp32| over the references: the quantization's own error."""
    quantizers: int
    input_quantizers: dict[str, torch.nn.Module]
    """Copies of the module's enabled input quantizers, for checking the graph's Q/DQ pairs one by one."""
    calibrated: bool
    """False when the statistics were restored from the store."""
    stages: StageLog


def quantized_trace(
    model: Model,
    component: str,
    device: str,
    dims: list[Dims],
    raw: Path,
    settings: Settings,
    recipe: Recipe,
    calibration_file: Path,
) -> QuantizedTrace:
    """Calibrates (saving to ``calibration_file``) or, where that file exists, restores from it; then
    references at ``dims`` and the raw graph at ``raw``."""
    stages = StageLog(device=torch.device(device))
    with stages.stage("load"):
        module = load_module(model, component, torch.device(device))
    with stages.stage("reference fp32"):
        fp32 = references_for(model, component, module, dims)
    restored = calibration_file.exists()
    if restored:
        with stages.stage("restore calibration"):
            module = calibration.restore(module, calibration_file)
    else:
        with stages.stage("calibrate"):
            calibration.calibrate(module, recipe, calibration.pipeline_loop(settings, recipe, component))
            calibration.save(module, calibration_file.parent)
    with stages.stage("reference"):
        calibration.round_weights_as_exported(module)
        references = references_for(model, component, module, dims)
    with stages.stage("export"):
        export_onnx(module, model.specs[component], export_dims(model), raw)
    error = max(
        float((quantized.outputs[name] - exact.outputs[name]).abs().max())
        for quantized, exact in zip(references, fp32, strict=True)
        for name in exact.outputs
    )
    count = calibration.quantizer_count(module)
    return QuantizedTrace(references, error, count, probe.input_quantizers(module), not restored, stages)


def run_trace(model: Model, component: str, *args) -> QuantizedTrace:
    """``quantized_trace``, in a child process when the component is large (see ``export.trace``)."""
    if weight_bytes(model, component) < ISOLATE_FROM_BYTES:
        return quantized_trace(model, component, *args)
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as child:
        return child.submit(quantized_trace, model, component, *args).result()


@dataclass
class QuantizedExporter:
    """Quantized graphs of a model's components into the store, each with its calibration artifact."""

    model: Model
    store: object
    device: torch.device
    settings: Settings
    recipe: Recipe

    def onnx(self, component: str, precision: str, stages: StageLog) -> Artifact:
        spec = self.model.specs[component]
        quant = self.recipe.format.value
        with stages.stage("fingerprint"):
            fingerprint = component_fingerprint(self.model, component, self.store.file_digest)
        key = quantized_onnx_key(spec, fingerprint, precision, quant, self.recipe.digest)
        calibration_artifact = calibration_key(spec, fingerprint, quant, self.recipe.digest)

        def build(staging: Staging) -> None:
            cpu = torch.device("cpu")
            with scratch_folder(self.settings.export_work_dir) as raw_dir:
                found = self.store.get(calibration_artifact)
                calibration_file = raw_dir / calibration.CALIBRATION_FILE
                if found is not None:
                    found.verify()
                    shutil.copyfile(found.file(calibration.CALIBRATION_FILE), calibration_file)
                dims = validation_dims(self.model, cpu)
                stages.on_stage("quantize")
                traced = run_trace(
                    self.model, component, str(self.device), dims, raw_dir / ONNX_FILE,
                    self.settings, self.recipe, calibration_file,
                )  # fmt: skip
                stages.merge(traced.stages)
                if traced.calibrated:
                    self.publish_calibration(calibration_artifact, calibration_file, traced, stages)
                with stages.stage("optimize"), working_folder(raw_dir):
                    graph = optimize(raw_dir / ONNX_FILE, staging.path / ONNX_FILE, spec, precision)
            with stages.stage("validate"):
                parity, quantizers = self.validate(component, staging.path, precision, traced)
            staging.info.update(
                model=self.model.name,
                quantization={
                    "format": quant,
                    "recipe": self.recipe.to_json(),
                    "recipe_hash": self.recipe.digest,
                    "calibration": calibration_artifact.dirname,
                    "calibrated_here": traced.calibrated,
                    "quantizers": traced.quantizers,
                    "max_abs_error_vs_fp32_torch": traced.fp32_error,
                },
                graph=asdict(graph),
                parity=parity,
                validation=self.validation_record(quant, traced.references, quantizers),
                tools=tool_versions(),
                **stages.report(),
            )

        return self.store.ensure(key, build)

    def validate(
        self, component: str, folder: Path, precision: str, traced: QuantizedTrace
    ) -> tuple[list[dict], dict | None]:
        """The graph (or its twin) on onnxruntime's CPU provider against the fake-quantized module: its outputs, and
        each Q/DQ pair against the module's quantizer (``export.quantize.probe``). Nothing where no twin exists
        (NVFP4's ``trt::`` ops: its engine is checked against torch on the GPU instead)."""
        spec = self.model.specs[component]
        try:
            graph = cpu_twin(folder / ONNX_FILE, folder / TWIN_FILE)
        except ValueError as error:
            log.warning("%s: not checked on onnxruntime: %s", component, error)
            return [], None
        tolerance = QUANTIZED_TOLERANCES[self.recipe.format.value]
        candidate = OnnxRuntimeRunner(spec, graph, precision, torch.device("cpu"))
        parity = check(spec, "onnxruntime", compare(spec, traced.references, candidate, precision, tolerance))
        del candidate  # the pairs' check loads the graph again: one session at a time
        pairs = probe.compare_quantizers(spec, graph, precision, traced.references, traced.input_quantizers)
        return parity, probe.check_quantizers(spec, pairs)

    @staticmethod
    def validation_record(quant: str, references: list[Reference], quantizers: dict | None) -> dict:
        if quant == "nvfp4":
            return {"backend": None, "compared": "nothing on onnxruntime: no standard twin of TensorRT's FP4 ops"}
        how = "the graph as exported" if quant == "int8" else "its twin with opset-21 float8 Q/DQ ops"
        tolerance = QUANTIZED_TOLERANCES[quant]
        return {
            "backend": "onnxruntime",
            "device": "cpu",
            "shapes": [r.shape for r in references],
            "compared": f"{how} against the fake-quantized torch module (ModelOpt), fp32 inputs",
            "outputs": (
                f"max |diff| <= {tolerance.atol:g} + {tolerance.rtol:g} x max |torch| and "
                f"mean |diff| <= {tolerance.mean_rtol:g} x max |torch|, each output at each shape"
            ),
            "quantizer_pairs": (
                "each Q/DQ pair against its quantizer in the module, both given the values the graph quantizes "
                f"at each shape: one pair per enabled input quantizer, and at most max({probe.APART_AT_LEAST}, "
                f"{probe.APART_FRACTION:g} x values) of a tensor's values more than {probe.APART:g} x its largest apart"
            ),
            "quantizer_check": quantizers,
            "weights": (
                "rounded as the graph rounds them, round(w / scale), before both were made"
                if quant == "int8"
                else "as calibrated"
            ),
        }

    def publish_calibration(self, key, calibration_file: Path, traced: QuantizedTrace, stages: StageLog) -> None:
        def build(staging: Staging) -> None:
            shutil.copyfile(calibration_file, staging.path / calibration.CALIBRATION_FILE)
            staging.info.update(
                model=self.model.name,
                recipe=self.recipe.to_json(),
                quantizers=traced.quantizers,
                calibrate_seconds=traced.stages.seconds.get("calibrate"),
            )

        self.store.ensure(key, build)
