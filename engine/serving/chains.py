"""The worker's runner chains: built at start-up, extended the first time a request names a
ControlNet or an IP-Adapter, with torch weights loaded where a request would load them anyway.

Every addition is made under one lock, so a chain is built once however many requests name
its component first; chains are only ever added, never replaced.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Collection, Mapping

import torch

from engine.backends.assemble import build_chains, share_adapter_weights, share_torch_weights
from engine.backends.chain import RunnerChain
from engine.backends.torch import LazyTorchRunner
from engine.lora.ip_adapters import Adapter
from engine.models.controlnet import CONTROLLED_UNET
from engine.models.ip_adapter import IP_DENOISERS, IP_PARAMETERS, ip_denoisers
from engine.models.model import Model
from engine.settings import Settings, TorchFallback
from engine.store.store import Store


class ServedChains:
    """One runner chain per component the model serves, and the TensorRT backend they share."""

    def __init__(self, model: Model, settings: Settings, store: Store, device: torch.device, precision: str):
        self.model = model
        self.settings = settings
        self.store = store
        self.device = device
        self.precision = precision
        self._lock = threading.Lock()
        self.chains, self.tensorrt = build_chains(model, settings, store, device, precision)
        self.load_torch_weights(self.chains, (*model.family.text_encoders, model.family.denoiser, "vae_decoder"))

    def load_torch_weights(self, chains: Mapping[str, RunnerChain], needed: Collection[str]) -> None:
        """Loads torch weights now where a request would load them anyway (torch is the first choice for a
        ``needed`` component) or where ``TORCH_FALLBACK=eager`` asks for it."""
        eager = self.settings.torch_fallback is TorchFallback.EAGER
        for component, chain in chains.items():
            for position, runner in enumerate(chain.runners):
                if isinstance(runner, LazyTorchRunner) and (eager or (position == 0 and component in needed)):
                    runner.ensure_loaded()

    def add_controlnets(self, components: list[str], load_now: bool = False) -> None:
        """Runner chains for ControlNets a request is the first to use (or ``load_now``, preloaded, with
        their torch weights), and for the controlled UNet; its torch fallback runs the UNet's own torch
        module, so the weights are not loaded twice."""
        with self._lock:
            missing = [c for c in (*components, CONTROLLED_UNET) if c not in self.chains]
            if not missing:
                return
            chains, engines = build_chains(
                self.model, self.settings, self.store, self.device, self.precision, components=missing
            )
            if CONTROLLED_UNET in chains:
                share_torch_weights(chains[CONTROLLED_UNET], self.chains["unet"], self.model.controlled_unet)
            self.chains.update(chains)
            self.tensorrt.adopt(engines)  # one stream and scratch for all the engines
            self.load_torch_weights(chains, chains if load_now else ())

    def add_ip_adapters(self, adapters: tuple[Adapter, ...], controlled: bool) -> None:
        """Runner chains for the image encoders and projections a request is the first to use, and for the
        IP denoiser with a slot per adapter (its controlled variant too where ControlNets act); their torch
        fallbacks run the UNet's own torch module with the IP processors added."""
        with self._lock:
            wanted = [c for adapter in adapters for c in (adapter.encoder, adapter.projection)]
            denoisers = ip_denoisers(len(adapters))[: 2 if controlled else 1]
            missing = list(dict.fromkeys(c for c in (*wanted, *denoisers) if c not in self.chains))
            if not missing:
                return
            chains, engines = build_chains(
                self.model, self.settings, self.store, self.device, self.precision, components=missing
            )
            for component in set(IP_DENOISERS) & set(chains):
                wrap = functools.partial(self.model.ip_denoiser, component)
                share_adapter_weights(chains[component], self.chains["unet"], wrap, IP_PARAMETERS)
            self.chains.update(chains)
            self.tensorrt.adopt(engines)
