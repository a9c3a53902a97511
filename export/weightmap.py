"""Matches each initializer of an exported graph to the torch parameter it holds, by content.

NVIDIA's diffusion demo does the same for refitting: hash each parameter (as exported: fp32,
fp16 or bf16, and transposed for matrices) and each initializer of the final graph, and pair
equal hashes. Parameters with the same content (two zero-initialized layers) cannot be told
apart and are unpatchable. Only tensors of two or more dimensions are mapped: the matrices
and convolution kernels LoRAs change. A parameter the map neither maps nor lists as
unpatchable does not reach the graph's outputs (SDXL's first text encoder stops at its
penultimate layer), so a LoRA may change it without changing the graph.

The parameters are hashed where the module is loaded for the trace, the initializers one
at a time from the data file, so neither side needs the other's weights in memory.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from engine.common.dtypes import BY_NAME
from engine.store.weightmap import MappedWeight, WeightMap
from export.weights import data_file_name, fp32_to_bf16, saturating_fp16

CONVERTED = {"fp16": saturating_fp16, "bf16": fp32_to_bf16}
"""How a half graph's weights hold an fp32 parameter."""


@dataclass
class ParameterDigests:
    """What the graph's initializers are matched against."""

    found: dict[str, tuple[str, bool]] = field(default_factory=dict)
    """Content hash -> (parameter name, transposed)."""
    sizes: dict[str, int] = field(default_factory=dict)
    """Parameter name -> element count."""
    ambiguous: set[str] = field(default_factory=set)
    """Parameters whose content another parameter shares: no hash tells them apart."""


def content_digest(values: np.ndarray) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{values.dtype.str}{values.shape}".encode())
    digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()


def parameter_digests(module: torch.nn.Module, precision: str) -> ParameterDigests:
    """The hash of every matrix and kernel parameter as the graph may hold it."""
    digests = ParameterDigests()
    for name, parameter in module.named_parameters():
        if parameter.ndim < 2:
            continue
        digests.sizes[name] = parameter.numel()
        values = parameter.detach().float().cpu().numpy()
        stored = [values, *([CONVERTED[precision](values)] if precision in CONVERTED else [])]
        for variant in stored:  # the conversion is elementwise: a transposed copy converts alike
            for transposed in (False, True) if variant.ndim == 2 else (False,):
                key = content_digest(variant.T if transposed else variant)
                other = digests.found.setdefault(key, (name, transposed))
                if other[0] != name:
                    digests.ambiguous |= {name, other[0]}
    digests.found = {key: match for key, match in digests.found.items() if match[0] not in digests.ambiguous}
    return digests


def _initializer_values(tensor: onnx.TensorProto, folder: Path) -> np.ndarray:
    if not uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    info = ExternalDataInfo(tensor)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    count = int(np.prod(tensor.dims, dtype=np.int64))
    values = np.fromfile(folder / info.location, dtype=dtype, count=count, offset=info.offset or 0)
    return values.reshape(tuple(tensor.dims))


def map_weights(graph_path: Path, digests: ParameterDigests) -> WeightMap:
    """The map of the graph at ``graph_path`` (weights in its one data file), one initializer in memory at a time.

    A parameter is unpatchable where the graph holds it inline (too small to be external data),
    where its content is ambiguous, or where an initializer of its size matched nothing (it may
    be folded into that one). One that is neither mapped nor unpatchable does not reach the graph.
    """
    graph = onnx.load(str(graph_path), load_external_data=False)
    mapped, unpatchable, unmatched_sizes = [], set(digests.ambiguous), set()
    for tensor in graph.graph.initializer:
        if len(tensor.dims) < 2:
            continue
        values = _initializer_values(tensor, graph_path.parent)
        match = digests.found.get(content_digest(values))
        external = uses_external_data(tensor)
        if match is None:
            if external:
                unmatched_sizes.add(values.size)
            continue
        if not external:
            unpatchable.add(match[0])
            continue
        info = ExternalDataInfo(tensor)
        element = next(e.name for e in BY_NAME.values() if np.dtype(e.numpy) == values.dtype)
        mapped.append(
            MappedWeight(
                initializer=tensor.name,
                parameter=match[0],
                transposed=match[1],
                dtype=element,
                shape=tuple(int(d) for d in tensor.dims),
                offset=int(info.offset or 0),
                length=int(info.length or values.nbytes),
            )
        )
    found = {weight.parameter for weight in mapped}
    unpatchable |= {name for name, size in digests.sizes.items() if name not in found and size in unmatched_sizes}
    return WeightMap(data_file_name(graph_path), tuple(mapped), tuple(sorted(unpatchable - found)))
