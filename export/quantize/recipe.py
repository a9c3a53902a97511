"""What a quantized export is made from: the format, ModelOpt's configuration, and the calibration recipe.

The configurations follow Model Optimizer's diffusers example (``examples/diffusers/quantization`` in
NVIDIA/TensorRT-Model-Optimizer, now NVIDIA/Model-Optimizer: ``config.py``'s ``FP8_DEFAULT_CONFIG`` and
``NVFP4_DEFAULT_CONFIG``, ``quantize.py``'s int8 path with ``mtq.INT8_SMOOTHQUANT_CFG``, ``utils.py``'s
``filter_func_default`` and ``check_conv_and_mha``): weights and inputs of Linear and Conv layers
quantized, outputs not, attention's matmuls and softmax left in the export precision (the example
quantizes them only with ``--quantize-mha``), and the layers its filter names (time embeddings, the
first and last convolutions, shortcuts, added and positional embeddings, context embedders, the output
norm) left unquantized. Here the filter is part of the configuration, so calibration never sees those
layers (the example disables them after calibrating, which for SmoothQuant leaves their weights
rescaled).

LayerNorm inputs stay unquantized (``NORM_INPUTS``). The example's ``*input_quantizer`` pattern
was written when ModelOpt gave LayerNorm no quantizers; 0.47 registers ``nn.LayerNorm`` (for
its output quantizer, which FP8 attention fusion uses), so the same pattern would put a Q/DQ
pair before every transformer block's ``norm1``/``norm2``/``norm3`` (Flux and SD3: ``norm1.norm``,
``norm2``, ``norm*_context``). ModelOpt's own example that knows of the registration
(``examples/torch_onnx/torch_quant_to_onnx.py``, ``_FP8_MHA_OVERRIDE``) disables LayerNorm input
quantizers, and a Q/DQ pair before a normalization feeds no quantized GEMM or convolution in
TensorRT: it adds rounding, not speed.

The recipe's hash (prompts, steps, size, seed, ModelOpt's version and the configuration) is part
of the artifact key: two recipes never share an artifact.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from importlib.metadata import PackageNotFoundError, version
from importlib.resources import files
from pathlib import Path
from typing import Any

from engine.common.errors import WorkerError


class QuantFormat(str, Enum):
    FP8 = "fp8"
    INT8 = "int8"
    NVFP4 = "nvfp4"


UNQUANTIZED = (
    "*time_emb_proj*",
    "*time_embedding*",
    "*conv_in*",
    "*conv_out*",
    "*conv_shortcut*",
    "*add_embedding*",
    "*pos_embed*",
    "*time_text_embed*",
    "*context_embedder*",
    "*norm_out*",
    "*x_embedder*",
)
"""Model Optimizer's ``filter_func_default``: the layers its diffusers example leaves unquantized."""

NORM_INPUTS = {"quantizer_name": "*input_quantizer", "parent_class": "nn.LayerNorm", "enable": False}
"""LayerNorm's input quantizers, off (see the module's docstring)."""

SMOOTHQUANT_ALPHA = 0.8
"""The SmoothQuant migration strength of ModelOpt's ``INT8_SMOOTHQUANT_CFG`` and of the example's int8 SDXL runs."""

BITS: dict[QuantFormat, dict[str, Any]] = {
    QuantFormat.FP8: {"num_bits": (4, 3), "axis": None},
    QuantFormat.NVFP4: {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}},
}


def modelopt_config(quant_format: QuantFormat) -> dict[str, Any]:
    """The ``mtq.quantize`` configuration for a format, in ModelOpt 0.47's list form."""
    if quant_format is QuantFormat.INT8:
        weight, activation = {"num_bits": 8, "axis": 0}, {"num_bits": 8, "axis": None}
        algorithm: Any = {"method": "smoothquant", "alpha": SMOOTHQUANT_ALPHA}
    else:
        weight, activation = dict(BITS[quant_format]), dict(BITS[quant_format])
        algorithm = "max"
    entries = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "cfg": weight},
        {"quantizer_name": "*input_quantizer", "cfg": activation},
        NORM_INPUTS,
        *({"quantizer_name": f"{pattern}", "enable": False} for pattern in UNQUANTIZED),
    ]
    if quant_format is QuantFormat.NVFP4:  # the example's check_conv_and_mha: FP4 for Linear layers only
        entries.append({"quantizer_name": "*", "parent_class": "nn.Conv2d", "enable": False})
    return {"quant_cfg": entries, "algorithm": algorithm}


def default_prompts_file() -> Path:
    return Path(str(files("export.quantize") / "prompts.txt"))


def read_prompts(path: Path) -> list[str]:
    """One prompt a line; blank lines and lines starting with # are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise WorkerError(f"--calib-prompts: cannot read {path}: {error}") from error
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise WorkerError(f"--calib-prompts: {path} holds no prompt (one a line)")
    return prompts


def modelopt_version() -> str:
    try:
        return version("nvidia-modelopt")
    except PackageNotFoundError:
        raise WorkerError(
            "quantizing needs NVIDIA Model Optimizer: pip install '.[quantize]' (nvidia-modelopt)"
        ) from None


@dataclass(frozen=True)
class Recipe:
    """Everything calibration's statistics depend on."""

    format: QuantFormat
    prompts: tuple[str, ...]
    steps: int
    size: int
    seed: int = 0
    modelopt: str = field(default_factory=modelopt_version)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise WorkerError(f"--calib-steps: {self.steps} must be at least 1")
        if self.size < 64 or self.size % 8:
            raise WorkerError(f"--calib-size: {self.size} must be a multiple of 8, at least 64")

    @property
    def config(self) -> dict[str, Any]:
        return modelopt_config(self.format)

    def to_json(self) -> dict[str, Any]:
        config = json.loads(json.dumps(self.config))  # block sizes are keyed by axis: -1 becomes "-1"
        return asdict(self) | {"format": self.format.value, "config": config}

    @property
    def digest(self) -> str:
        canonical = json.dumps(self.to_json(), sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]
