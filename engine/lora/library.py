"""From a request's ``loras`` to one weight patch per component: base + sum of scale x delta.

Each file is read once (kept within a byte budget, least recently used out) and checked
against the model before anything is applied, so a bad entry fails the request with its
field named and every backend keeps the weights it has. A patch is identified by its key: the same files at
the same scales give the same key, and a backend whose weights already carry that key
does nothing. A file refused by those checks is remembered by its sha256 (and a download by
its URL) for a while, so a client retrying it costs no new read.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.common.errors import Problems, RequestError
from engine.common.logs import redact_urls
from engine.lora.factors import LoraWeights, LowRank, read_lora
from engine.lora.files import LoraFile, LoraFiles, Refusals, shown
from engine.models.model import Model
from engine.request.entries import LoraEntry


@dataclass(frozen=True)
class WeightPatch:
    """One component's LoRA set: the parameters it changes, each by a sum of scaled low-rank deltas."""

    key: str
    terms: dict[str, tuple[tuple[float, LowRank], ...]]

    @property
    def names(self) -> list[str]:
        return list(self.terms)

    def delta(self, name: str, device: torch.device) -> torch.Tensor:
        """The fp32 delta of one parameter, always summed in the same order (so the same bytes every time)."""
        total = None
        for scale, low_rank in self.terms[name]:
            term = low_rank.delta(device) * scale
            total = term if total is None else total + term
        assert total is not None
        return total


@dataclass(frozen=True)
class LoraSelection:
    """What a request's ``loras`` resolve to: the files, and a patch for each component they change."""

    applied: tuple[tuple[LoraFile, float], ...]
    patches: dict[str, WeightPatch]

    def metrics(self) -> list[dict[str, Any]]:
        """Each file as the request named it, a URL without its user info or query (where signed links
        carry their tokens), with its sha256 and scale."""
        return [
            {"name": redact_urls(file.label), "sha256": file.sha256, "scale": scale} for file, scale in self.applied
        ]


NO_LORAS = LoraSelection((), {})


def weights_bytes(weights: LoraWeights) -> int:
    """The memory a read file's factors hold."""
    return sum(
        low_rank.down.nbytes + low_rank.up.nbytes
        for factors in weights.components.values()
        for low_rank in factors.values()
    )


class LoraLibrary:
    """Resolves and reads LoRA files for one model, keeping those read last within ``cache_bytes``."""

    def __init__(self, files: LoraFiles, model: Model, cache_bytes: int = 2 * 10**9):
        self.files = files
        self.model = model
        self.cache_bytes = cache_bytes
        self.refused = Refusals()
        self._read: OrderedDict[str, tuple[LoraWeights, int]] = OrderedDict()
        self._lock = threading.Lock()

    def select(self, entries: Sequence[LoraEntry]) -> LoraSelection:
        """Every entry resolved and read; one RequestError names every bad one."""
        if not entries:
            return NO_LORAS
        if not self.model.family.lora_targets:
            raise RequestError(f"loras: the {self.model.family.name} family does not support LoRA")
        problems = Problems()
        applied = []
        weights = []
        for index, entry in enumerate(entries):
            field = f"loras[{index}].{'name' if entry.name is not None else 'url'}"
            file = (
                problems.check(self.files.by_name, entry.name, field)
                if entry.name is not None
                else problems.check(self.files.by_url, entry.url or "", field, [earlier.path for earlier, _ in applied])
            )
            read = problems.check(self._weights, file, field) if file is not None else None
            if file is not None and read is not None:
                weights.append((entry.scale, read))
                applied.append((file, entry.scale))
        problems.raise_any()
        patches = {}
        for component in self.model.family.lora_targets:
            terms: dict[str, list[tuple[float, LowRank]]] = {}
            used = []
            for scale, lora in weights:
                factors = lora.components.get(component, {})
                for name, low_rank in factors.items():
                    terms.setdefault(name, []).append((scale, low_rank))
                if factors:
                    used.append((lora.sha256, scale))
            if terms:
                key = hashlib.sha256(json.dumps([component, used]).encode()).hexdigest()[:16]
                patches[component] = WeightPatch(key, {name: tuple(values) for name, values in terms.items()})
        return LoraSelection(tuple(applied), patches)

    def _weights(self, file: LoraFile, field: str) -> LoraWeights:
        with self._lock:
            cached = self._read.get(file.sha256)
            if cached is not None:
                self._read.move_to_end(file.sha256)
                return cached[0]
        named = f"{field}: {shown(file.label)}: "
        rule = self.refused.get(file.sha256)
        if rule is not None:
            raise RequestError(f"{named}{rule}")
        family = self.model.family
        try:
            weights = read_lora(
                file.path,
                file.label,
                file.sha256,
                family.lora_loader,
                family.lora_targets,
                self.model.parameter_shapes,
                self.model.config.configs["unet"],
                field,
            )
        except RequestError as error:
            rule = str(error).removeprefix(named)
            self.refused.add(file.sha256, rule)
            if file.from_url:
                self.files.refuse_url(file.label, f"{shown(file.label)}: {rule}")
            raise
        self._keep(file.sha256, weights)
        return weights

    def _keep(self, sha256: str, weights: LoraWeights) -> None:
        """Caches a read file, least recently used out until the cache is within ``cache_bytes``
        (a file larger than that alone is not kept)."""
        size = weights_bytes(weights)
        with self._lock:
            self._read[sha256] = (weights, size)
            total = sum(size for _, size in self._read.values())
            while total > self.cache_bytes:
                _, (_, evicted) = self._read.popitem(last=False)
                total -= evicted
