"""Which ONNX initializer holds which torch parameter: the map a LoRA patch is applied through.

The export writes it beside the graph (``weights.json``), matched by content once, so the
worker never guesses from names: torch's exporter renames and transposes what it folds
(a Linear's weight becomes ``onnx::MatMul_123``, transposed). At run time the map gives,
for each parameter a LoRA changes, the initializers to replace and where their base
values lie in the graph's data file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from engine.common.dtypes import BY_NAME, from_numpy

WEIGHT_MAP_FILE = "weights.json"
FORMAT = 1


@dataclass(frozen=True)
class MappedWeight:
    initializer: str
    parameter: str
    """The parameter's name in the component's torch module (``unet.down_blocks.0...to_q.weight``)."""
    transposed: bool
    dtype: str
    shape: tuple[int, ...]
    offset: int
    """Where its bytes start in the data file."""
    length: int


@dataclass(frozen=True)
class WeightMap:
    data_file: str
    weights: tuple[MappedWeight, ...]
    unpatchable: tuple[str, ...] = ()
    """Parameters the graph holds in a form the map cannot patch: inline, ambiguous, or maybe folded."""
    folder: Path | None = field(default=None, compare=False)
    """Where the graph and its data file are, once read from an artifact."""

    @cached_property
    def by_parameter(self) -> dict[str, list[MappedWeight]]:
        found: dict[str, list[MappedWeight]] = {}
        for weight in self.weights:
            found.setdefault(weight.parameter, []).append(weight)
        return found

    @cached_property
    def by_initializer(self) -> dict[str, MappedWeight]:
        return {weight.initializer: weight for weight in self.weights}

    def cannot_patch(self, parameters: Iterable[str]) -> list[str]:
        """Those of ``parameters`` this graph's weights cannot be patched for. One the map neither maps
        nor lists as unpatchable does not reach the graph's outputs, and needs no patch."""
        return [name for name in parameters if name in set(self.unpatchable)]

    def write(self, folder: Path) -> None:
        record = {"format": FORMAT, "data_file": self.data_file, "unpatchable": list(self.unpatchable)}
        record["weights"] = [asdict(weight) for weight in self.weights]
        (folder / WEIGHT_MAP_FILE).write_text(json.dumps(record))

    @classmethod
    def read(cls, folder: Path) -> WeightMap:
        """The map of the artifact in ``folder``; ValueError when it is not one this worker reads."""
        try:
            record = json.loads((folder / WEIGHT_MAP_FILE).read_text())
            if record.get("format") != FORMAT:
                raise ValueError(f"format {record.get('format')}, this worker reads {FORMAT}")
            weights = tuple(MappedWeight(**{**entry, "shape": tuple(entry["shape"])}) for entry in record["weights"])
            return cls(record["data_file"], weights, tuple(record["unpatchable"]), folder)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"{folder.name}/{WEIGHT_MAP_FILE} is unreadable: {error}") from None

    def base_value(self, weight: MappedWeight) -> np.ndarray:
        """The initializer's bytes as exported, read from the data file."""
        if self.folder is None:
            raise ValueError("a weight map not read from an artifact has no data file")
        dtype = np.dtype(BY_NAME[weight.dtype].numpy)
        count = weight.length // dtype.itemsize
        values = np.fromfile(self.folder / self.data_file, dtype=dtype, count=count, offset=weight.offset)
        return values.reshape(weight.shape)

    def patched_value(self, weight: MappedWeight, delta: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """The initializer's value for a patch, on ``device``: base + delta computed in fp32 and cast back
        to the initializer's type (saturating in fp16, as the export converts), or the base value when
        ``delta`` is None. Every backend that patches through the map computes it here."""
        base = from_numpy(self.base_value(weight)).to(device)
        if delta is None:
            return base.contiguous()
        merged = base.float() + (delta.T if weight.transposed else delta).reshape(base.shape).to(device)
        if base.dtype == torch.float16:
            limit = torch.finfo(torch.float16).max
            merged = merged.clamp(-limit, limit)
        return merged.to(base.dtype).contiguous()
