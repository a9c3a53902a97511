"""IP-Adapter files a request names, checked like LoRA files, and the weight patch each makes of the IP denoiser.

A name is a safetensors file under ``IP_ADAPTER_DIR`` (subfolders allowed, never outside it; pickle
formats refused), in diffusers' ``load_ip_adapter`` layout, with the CLIP image encoder it was
trained with in an ``image_encoder/`` folder beside it (as diffusers' default ``image_encoder_folder``
finds it, h94/IP-Adapter's ``models/`` and ``sdxl_models/`` layouts). Its header is checked before
the file is read, then its layout and shapes against the model's UNet and the encoder, so a file no
backend could use is a request error naming the entry. A checked adapter becomes components of the
model (its projection, its encoder, the IP denoiser), served by runner chains like any other.

The adapter's ``to_k_ip``/``to_v_ip`` matrices reach the IP denoiser as a patch, as a LoRA's do: the
patch sets each to the file's value (base + delta from the base the graph holds), together with the
request's LoRAs on the UNet's own weights, so one runner holds one adapter and one LoRA set at a time.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.common.errors import RequestError
from engine.lora.files import FileDigests, named_file
from engine.lora.headers import HeaderError, check_safetensors
from engine.lora.library import WeightPatch
from engine.models.ip_adapter import (
    AdapterLayout,
    adapter_layout,
    adapter_weights,
    placeholder,
    slot_weights,
    split_state,
)
from engine.models.model import WEIGHT_SUFFIXES, Model
from engine.store.fingerprint import folder_fingerprint

log = logging.getLogger(__name__)

ENCODER_FOLDER = "image_encoder"
KEPT_FILES = 2
"""Adapter files kept read in memory (the IP matrices of SD 1.5's are 44 MB in fp16, SDXL's 0.7 GB)."""


@dataclass(frozen=True)
class Adapter:
    """A checked adapter file and the components that serve it."""

    name: str
    sha256: str
    layout: AdapterLayout
    encoder: str
    """The image encoder's component."""
    projection: str
    """The adapter's projection's component."""
    weights: dict[str, torch.Tensor]
    """The IP denoiser's parameters this adapter sets (its ``to_k_ip``/``to_v_ip``), in the first slot."""


@dataclass(frozen=True)
class AdapterPatch:
    """An IP denoiser's weights for one request: each adapter's IP matrices, in its slot, and the UNet's
    LoRA patch."""

    key: str
    weights: dict[str, torch.Tensor]
    """Every slot's IP matrices under the IP denoiser's parameter names."""
    lora: WeightPatch | None = None

    @property
    def names(self) -> list[str]:
        return [*(self.lora.names if self.lora is not None else ()), *self.weights]

    def delta(self, name: str, device: torch.device) -> torch.Tensor:
        """A LoRA's delta, or for an IP matrix the file's value less the placeholder base."""
        if name in self.weights:
            value = self.weights[name].to(device=device, dtype=torch.float32)
            return value - placeholder(name, tuple(value.shape)).to(device)
        assert self.lora is not None
        return self.lora.delta(name, device)


def adapter_patch(adapters: Sequence[Adapter], lora: WeightPatch | None) -> AdapterPatch:
    """The patch of the IP denoiser with one slot per adapter, the ``slot``-th adapter in the ``slot``-th."""
    named = "/".join([*(adapter.sha256 for adapter in adapters), lora.key if lora is not None else ""])
    weights = {name: value for slot, a in enumerate(adapters) for name, value in slot_weights(a.weights, slot).items()}
    return AdapterPatch(hashlib.sha256(named.encode()).hexdigest()[:16], weights, lora)


class IpAdapterFiles:
    """The IP-Adapters in ``root`` for one model: each name resolved, checked and read once."""

    def __init__(self, root: Path, model: Model, max_bytes: int, file_digest: Callable[[Path], str] | None = None):
        """``file_digest`` hashes files once per version; the worker passes its store's, whose memo the
        artifact keys use too, so an encoder's weights are not hashed twice."""
        self.root = root
        self.model = model
        self.max_bytes = max_bytes
        self._read: OrderedDict[tuple[str, str], Adapter] = OrderedDict()
        self._digest = file_digest or FileDigests().of
        self._lock = threading.Lock()

    def resolve(self, name: str, field: str) -> Adapter:
        """The adapter ``name`` names, checked against the model; a RequestError under ``field`` otherwise."""
        family = self.model.family
        if not family.ip_adapters:
            raise RequestError(f"{field}: IP-Adapters are not supported for {family.name} models")
        target = named_file(self.root, name, field, "IP-Adapter")
        try:
            check_safetensors(target, self.max_bytes)
        except HeaderError as error:
            raise RequestError(f"{field}: {name!r} is {str(error).replace('LoRA', 'IP-Adapter')}") from None
        sha256 = self._digest(target)
        encoder = target.parent / ENCODER_FOLDER
        if not (encoder / "config.json").is_file() or not any(p.suffix in WEIGHT_SUFFIXES for p in encoder.iterdir()):
            missing = f"no image encoder (a CLIP vision folder named {ENCODER_FOLDER}/ beside it)"
            raise RequestError(f"{field}: {name!r}: {missing}")
        # The encoder's files are part of the adapter's identity: one replaced beside an unchanged file is
        # another encoder, never the old one's runners.
        key = (sha256, folder_fingerprint(encoder, self._digest))
        with self._lock:
            if key in self._read:
                self._read.move_to_end(key)
                return self._read[key]
        adapter = self._read_adapter(name, target, key, encoder, field)
        with self._lock:
            self._read[key] = adapter
            while len(self._read) > KEPT_FILES:
                self._read.popitem(last=False)
        return adapter

    def _read_adapter(self, name: str, path: Path, key: tuple[str, str], encoder: Path, field: str) -> Adapter:
        from safetensors.torch import load_file

        sha256, encoder_digest = key

        named = f"{field}: {name!r}"
        try:
            state = split_state(load_file(str(path)))
            layout = adapter_layout(state)
        except (ValueError, OSError) as error:
            raise RequestError(f"{named}: {error}") from None
        problems = self.model.ip_adapter_mismatches(layout, state["ip_adapter"], encoder)
        if problems:
            raise RequestError(f"{named}: made for another model than this {self.model.family.name} one: {problems}")
        if not all(torch.isfinite(value).all() for part in state.values() for value in part.values()):
            raise RequestError(f"{named}: holds NaN or Inf values")
        relative = path.relative_to(self.root.resolve()).with_suffix("").as_posix()
        with self._lock:  # the model's specs change: one adapter at a time
            encoder_component, projection = self.model.add_ip_adapter(
                relative, path, sha256, encoder, encoder_digest, layout
            )
        weights = adapter_weights(state["ip_adapter"], self.model.ip_layers)
        return Adapter(name, sha256, layout, encoder_component, projection, weights)
